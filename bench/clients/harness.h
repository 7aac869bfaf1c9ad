/* The workloads bench/s6_compare.py runs, written once for both daemons.
 *
 * A client file defines the seven operations below for its daemon and includes this
 * file; main() runs one mode and prints "key=value" pairs on one line. Both clients
 * therefore do exactly the same work, and only the protocol differs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* One connection per process. Every op returns 0 on success, exits on failure. */
static void op_connect(const char *path);
static void op_store(const char *box, const char *name, int fd);   /* fdbox Put / s6 store */
static void op_retrieve(const char *box, const char *name);        /* a new fd, closed */
static void op_delete(const char *box, const char *name);          /* fdbox Remove / s6 delete */
static void op_store_many(const char *box, int n, int fd);         /* names e0..e(n-1) */
static void op_get_box(const char *box, int n);                    /* n fds back in one go */
static void op_take_box(const char *box, int n);                   /* e0..e(n-1) back: fdbox GetBox / s6 n retrieves */
static void op_list(int expect);                                   /* every entry held */

static void die(const char *what)
{
	fprintf(stderr, "bench client: %s: %s\n", what, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p)
{
	qsort(v, n, sizeof *v, cmp_double);
	size_t i = (size_t)(p * (n - 1) + 0.5);
	return v[i];
}

static int bench_memfd(void)
{
	int fd = memfd_create("bench", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, 4096) < 0)
		die("memfd");
	return fd;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s SOCKET pairs SECONDS | box64 REPEAT | fill BOXES PER_BOX [FIRST] |"
				" putremove N | list N EXPECT | conc CLIENTS OPS | vms VMS ENTRIES\n", argv[0]);
		return 2;
	}
	const char *path = argv[1], *mode = argv[2];
	long a = atol(argv[3]), b = argc > 4 ? atol(argv[4]) : 0;
	int fd = bench_memfd();
	signal(SIGPIPE, SIG_IGN);

	if (!strcmp(mode, "conc")) {
		/* a children, b ops each (store, retrieve, delete in turn), latency of every op */
		size_t n = (size_t)a * b;
		double *lat = mmap(NULL, n * sizeof *lat, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		int go[2];
		if (lat == MAP_FAILED || pipe(go) < 0)
			die("setup");
		for (long c = 0; c < a; c++) {
			pid_t pid = fork();
			if (pid < 0)
				die("fork");
			if (pid == 0) {
				char box[32], rd;
				snprintf(box, sizeof box, "conc%ld", c);
				close(go[1]);
				op_connect(path);
				if (read(go[0], &rd, 1) < 0)
					_exit(1);
				for (long i = 0; i < b; i++) {
					double t = now();
					switch (i % 3) {
					case 0: op_store(box, "e", fd); break;
					case 1: op_retrieve(box, "e"); break;
					case 2: op_delete(box, "e"); break;
					}
					lat[c * b + i] = now() - t;
				}
				_exit(0);
			}
		}
		close(go[0]);
		usleep(300000); /* every child connected */
		double t0 = now();
		close(go[1]); /* EOF: all start at once */
		int st, bad = 0;
		while (wait(&st) > 0)
			bad |= !WIFEXITED(st) || WEXITSTATUS(st);
		double el = now() - t0;
		if (bad)
			return 1;
		printf("p50_us=%.1f p99_us=%.1f ops_per_s=%.0f\n", pct(lat, n, 0.5) * 1e6,
		       pct(lat, n, 0.99) * 1e6, n / el);
		return 0;
	}

	if (!strcmp(mode, "vms")) {
		/* a VMs, each its own connection and a box of b entries, all take theirs back at
		 * once: the time from "go" until each VM has all its fds (a resume after kexec) */
		double *end = mmap(NULL, a * sizeof *end, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		int go[2], ready[2];
		if (end == MAP_FAILED || pipe(go) < 0 || pipe(ready) < 0)
			die("setup");
		for (long c = 0; c < a; c++) {
			pid_t pid = fork();
			if (pid < 0)
				die("fork");
			if (pid == 0) {
				char box[32], rd;
				snprintf(box, sizeof box, "vms%ld", c);
				close(go[1]);
				close(ready[0]);
				op_connect(path);
				op_store_many(box, (int)b, fd);
				if (write(ready[1], "r", 1) != 1 || read(go[0], &rd, 1) < 0)
					_exit(1);
				op_take_box(box, (int)b);
				end[c] = now();
				_exit(0);
			}
		}
		close(go[0]);
		close(ready[1]);
		char rd;
		for (long c = 0; c < a; c++)
			if (read(ready[0], &rd, 1) != 1)
				die("a VM did not get ready");
		double t0 = now();
		close(go[1]); /* EOF: all start at once */
		int st, bad = 0;
		while (wait(&st) > 0)
			bad |= !WIFEXITED(st) || WEXITSTATUS(st);
		if (bad)
			return 1;
		double wall = 0;
		for (long c = 0; c < a; c++) {
			end[c] -= t0;
			if (end[c] > wall)
				wall = end[c];
		}
		double p50 = pct(end, a, 0.5), p99 = pct(end, a, 0.99);
		op_connect(path); /* leave the daemon as it was */
		for (long c = 0; c < a; c++) {
			char box[32], name[24];
			snprintf(box, sizeof box, "vms%ld", c);
			for (long i = 0; i < b; i++) {
				snprintf(name, sizeof name, "e%ld", i);
				op_delete(box, name);
			}
		}
		printf("wall_ms=%.2f p50_ms=%.2f p99_ms=%.2f\n", wall * 1e3, p50 * 1e3, p99 * 1e3);
		return 0;
	}

	op_connect(path);
	if (!strcmp(mode, "pairs")) {
		long n = 0;
		double t0 = now(), t, secs = atof(argv[3]);
		while ((t = now()) - t0 < secs) {
			op_store("pairs", "e", fd);
			op_retrieve("pairs", "e");
			op_delete("pairs", "e");
			n++;
		}
		printf("pairs_per_s=%.0f us_per_pair=%.1f pairs=%ld\n", n / (t - t0), (t - t0) / n * 1e6, n);
	} else if (!strcmp(mode, "box64")) {
		double *v = calloc(a, sizeof *v);
		op_store_many("box64", 64, fd);
		for (long i = 0; i < a; i++) {
			double t = now();
			op_get_box("box64", 64);
			v[i] = now() - t;
		}
		double med = pct(v, a, 0.5);
		printf("median_us=%.1f min_us=%.1f\n", med * 1e6, v[0] * 1e6);
		for (int i = 0; i < 64; i++) {
			char name[16];
			snprintf(name, sizeof name, "e%d", i);
			op_delete("box64", name);
		}
	} else if (!strcmp(mode, "fill")) {
		/* a boxes of b entries, named from vm<first> on (argument 5, default 0) */
		long first = argc > 5 ? atol(argv[5]) : 0;
		double t = now();
		for (long i = first; i < first + a; i++) {
			char box[32];
			snprintf(box, sizeof box, "vm%ld", i);
			op_store_many(box, (int)b, fd);
		}
		printf("seconds=%.2f\n", now() - t);
	} else if (!strcmp(mode, "putremove")) {
		double *v = calloc(a, sizeof *v);
		for (long i = 0; i < a; i++) {
			double t = now();
			op_store("vm0", "extra", fd);
			op_delete("vm0", "extra");
			v[i] = now() - t;
		}
		printf("median_us=%.1f p99_us=%.1f\n", pct(v, a, 0.5) * 1e6, pct(v, a, 0.99) * 1e6);
	} else if (!strcmp(mode, "list")) {
		double *v = calloc(a, sizeof *v);
		for (long i = 0; i < a; i++) {
			double t = now();
			op_list((int)b);
			v[i] = now() - t;
		}
		double med = pct(v, a, 0.5);
		printf("median_ms=%.2f min_ms=%.2f\n", med * 1e3, v[0] * 1e3);
	} else {
		fprintf(stderr, "unknown mode %s\n", mode);
		return 2;
	}
	return 0;
}
