/* fdbox-call: one Varlink call to fdboxd, with libc only.
 *
 * Why this exists: the seal before a kexec is on the blackout path (every VM is
 * already paused), and starting a Python interpreter there costs tens of
 * milliseconds on a host and seconds in a TCG guest. fdboxd is already running,
 * so the seal step only has to ask it: this program connects, sends one call and
 * waits for its last reply. The system bus is not an option at that point
 * (dbus.service is stopped with shutdown.target, before fdbox-seal.service runs)
 * and varlinkctl exists only from systemd 255 on.
 *
 *   fdbox-call [--socket PATH] [--more] [--quiet] METHOD [PARAMETERS]
 *
 * PARAMETERS is a JSON object (default {}), sent as is: fdboxd checks it. Every
 * reply is printed to stdout as one line (with --more, fdboxd's progress replies
 * too), unless --quiet. Before sending anything the server's SO_PEERCRED must be
 * root or the caller, as fdboxd.client checks it.
 *
 * Exit status, as fdboxctl's: 0 the call succeeded; 10-19 one per fdbox error name
 * (FDBOX_ERRORS below, in fdboxd/errors.py's order, checked by a test); 1 any other
 * error reply, a protocol error or a lost connection; 2 a bad command line.
 *
 * Only what is needed to find the reply's top-level "error" and "continues" is
 * parsed; the rest of the JSON is skipped, not interpreted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/fdbox/fdboxd.sock"
#define EXIT_UNEXPECTED 1
#define EXIT_USAGE 2
#define EXIT_ERROR_BASE 10
#define ERROR_PREFIX "io.fdbox.Store."
#define MAX_REPLY (64u << 20)

/* fdboxd/errors.py:ERROR_NAMES, in order: exit code EXIT_ERROR_BASE + index. */
static const char *const FDBOX_ERRORS[] = {
	"NotFound", "AlreadyExists", "InvalidName", "UnsupportedType", "Sealed",
	"NotSealed", "PermissionDenied", "LimitExceeded", "BackendUnavailable",
	"InvalidRequest",
};

static const char *prog = "fdbox-call";

static void usage(FILE *f)
{
	fprintf(f, "usage: %s [--socket PATH] [--more] [--quiet] METHOD [PARAMETERS]\n"
		   "One Varlink call to fdboxd (default socket " DEFAULT_SOCKET ").\n"
		   "Exit: 0 ok, 1 unexpected, 2 usage, 10-19 fdbox errors:", prog);
	for (size_t i = 0; i < sizeof FDBOX_ERRORS / sizeof *FDBOX_ERRORS; i++)
		fprintf(f, " %zu %s", EXIT_ERROR_BASE + i, FDBOX_ERRORS[i]);
	fputc('\n', f);
}

/* ---- JSON: skip values, find two top-level keys ---------------------------- */

static const char *skip_ws(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	return p;
}

/* p at '"'; returns just past the closing quote, or NULL. */
static const char *skip_string(const char *p)
{
	for (p++; *p; p++) {
		if (*p == '\\') {
			if (!*++p)
				return NULL;
		} else if (*p == '"') {
			return p + 1;
		}
	}
	return NULL;
}

static const char *skip_value(const char *p, int depth)
{
	p = skip_ws(p);
	if (depth > 64)
		return NULL;
	if (*p == '"')
		return skip_string(p);
	if (*p == '{' || *p == '[') {
		char close = *p == '{' ? '}' : ']';
		p = skip_ws(p + 1);
		if (*p == close)
			return p + 1;
		for (;;) {
			if (close == '}') {
				if (*p != '"' || !(p = skip_string(p)))
					return NULL;
				p = skip_ws(p);
				if (*p++ != ':')
					return NULL;
			}
			if (!(p = skip_value(p, depth + 1)))
				return NULL;
			p = skip_ws(p);
			if (*p == close)
				return p + 1;
			if (*p++ != ',')
				return NULL;
			p = skip_ws(p);
		}
	}
	/* number, true, false, null */
	const char *start = p;
	while (*p && strchr("+-.0123456789eEtruefalsn", *p))
		p++;
	return p == start ? NULL : p;
}

struct reply {
	char error[128];	/* top-level "error", "" when there is none */
	bool continues;		/* top-level "continues": true */
};

/* Parse the top level of one reply object; false if it is not one. */
static bool parse_reply(const char *msg, struct reply *r)
{
	const char *p = skip_ws(msg);
	memset(r, 0, sizeof *r);
	if (*p++ != '{')
		return false;
	p = skip_ws(p);
	if (*p == '}')
		return true;
	for (;;) {
		const char *key = p, *end, *val;
		if (*p != '"' || !(end = skip_string(p)))
			return false;
		p = skip_ws(end);
		if (*p++ != ':')
			return false;
		val = skip_ws(p);
		if (!(p = skip_value(val, 1)))
			return false;
		size_t klen = (size_t)(end - key);
		if (klen == 7 && !memcmp(key, "\"error\"", 7)) {
			size_t n = (size_t)(p - val) - 2;
			if (*val != '"')
				return false;
			if (n >= sizeof r->error || memchr(val + 1, '\\', n))
				return false;
			memcpy(r->error, val + 1, n);
			r->error[n] = 0;
		} else if (klen == 11 && !memcmp(key, "\"continues\"", 11)) {
			r->continues = !strncmp(val, "true", 4);
		}
		p = skip_ws(p);
		if (*p == '}')
			return true;
		if (*p++ != ',')
			return false;
		p = skip_ws(p);
	}
}

static int exit_code_of(const char *error)
{
	size_t plen = strlen(ERROR_PREFIX);
	if (strncmp(error, ERROR_PREFIX, plen))
		return EXIT_UNEXPECTED;
	for (size_t i = 0; i < sizeof FDBOX_ERRORS / sizeof *FDBOX_ERRORS; i++)
		if (!strcmp(error + plen, FDBOX_ERRORS[i]))
			return EXIT_ERROR_BASE + (int)i;
	return EXIT_UNEXPECTED;
}

/* ---- the socket ------------------------------------------------------------ */

static int connect_checked(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct ucred cred;
	socklen_t len = sizeof cred;
	int fd;

	if (strlen(path) >= sizeof sa.sun_path) {
		fprintf(stderr, "%s: socket path too long: %s\n", prog, path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
		fprintf(stderr, "%s: cannot connect to %s: %s\n", prog, path, strerror(errno));
		goto fail;
	}
	/* Like fdboxd.client: a server that is neither root nor us gets nothing. */
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		fprintf(stderr, "%s: SO_PEERCRED: %s\n", prog, strerror(errno));
		goto fail;
	}
	if (cred.uid != 0 && cred.uid != getuid()) {
		fprintf(stderr, "%s: %s is served by uid %u, neither root nor us: refusing\n",
			prog, path, (unsigned)cred.uid);
		goto fail;
	}
	return fd;
fail:
	if (fd >= 0)
		close(fd);
	return -1;
}

static bool send_all(int fd, const char *buf, size_t len)
{
	while (len) {
		ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return false;
		buf += n;
		len -= (size_t)n;
	}
	return true;
}

struct reader {
	char *buf;
	size_t len, cap;
};

/* Next NUL-terminated message into *msg (valid until the next call), or NULL.
 * fds are never expected here; any that arrive are closed. */
static char *next_message(int fd, struct reader *rd, size_t *consumed)
{
	if (*consumed) {
		memmove(rd->buf, rd->buf + *consumed, rd->len - *consumed);
		rd->len -= *consumed;
		*consumed = 0;
	}
	for (;;) {
		char *nul = memchr(rd->buf, 0, rd->len);
		if (nul) {
			*consumed = (size_t)(nul - rd->buf) + 1;
			return rd->buf;
		}
		if (rd->cap - rd->len < 4096) {
			if (rd->cap >= MAX_REPLY)
				return NULL;
			rd->cap = rd->cap ? rd->cap * 2 : 65536;
			if (!(rd->buf = realloc(rd->buf, rd->cap)))
				return NULL;
		}
		union { char b[CMSG_SPACE(253 * sizeof(int))]; struct cmsghdr align; } u;
		struct iovec iov = { rd->buf + rd->len, rd->cap - rd->len };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
				     .msg_control = u.b, .msg_controllen = sizeof u.b };
		ssize_t n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return NULL;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
				for (int *f = (int *)CMSG_DATA(c);
				     (char *)(f + 1) <= (char *)c + c->cmsg_len; f++)
					close(*f);
		rd->len += (size_t)n;
	}
}

int main(int argc, char **argv)
{
	const char *socket_path = DEFAULT_SOCKET, *method = NULL, *params = "{}";
	bool more = false, quiet = false;
	int i;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--socket") && i + 1 < argc) {
			socket_path = argv[++i];
		} else if (!strncmp(argv[i], "--socket=", 9)) {
			socket_path = argv[i] + 9;
		} else if (!strcmp(argv[i], "--more")) {
			more = true;
		} else if (!strcmp(argv[i], "--quiet")) {
			quiet = true;
		} else if (!strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		} else if (argv[i][0] == '-') {
			fprintf(stderr, "%s: unknown option %s\n", prog, argv[i]);
			usage(stderr);
			return EXIT_USAGE;
		} else {
			break;
		}
	}
	if (i >= argc || argc - i > 2) {
		usage(stderr);
		return EXIT_USAGE;
	}
	method = argv[i];
	if (argc - i == 2)
		params = argv[i + 1];
	for (const char *c = method; *c; c++)
		if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.", *c)) {
			fprintf(stderr, "%s: bad method name %s\n", prog, method);
			return EXIT_USAGE;
		}
	const char *end = skip_value(params, 1);
	if (skip_ws(params)[0] != '{' || !end || *skip_ws(end)) {
		fprintf(stderr, "%s: PARAMETERS must be one JSON object: %s\n", prog, params);
		return EXIT_USAGE;
	}

	int fd = connect_checked(socket_path);
	if (fd < 0)
		return EXIT_UNEXPECTED;

	char *msg;
	if (asprintf(&msg, "{\"method\":\"%s\",\"parameters\":%s%s}", method, params,
		     more ? ",\"more\":true" : "") < 0)
		return EXIT_UNEXPECTED;
	if (!send_all(fd, msg, strlen(msg) + 1)) {
		fprintf(stderr, "%s: send: %s\n", prog, strerror(errno));
		return EXIT_UNEXPECTED;
	}
	free(msg);

	struct reader rd = { 0 };
	size_t consumed = 0;
	for (;;) {
		struct reply r;
		char *m = next_message(fd, &rd, &consumed);
		if (!m) {
			fprintf(stderr, "%s: connection closed before the last reply\n", prog);
			return EXIT_UNEXPECTED;
		}
		if (!parse_reply(m, &r)) {
			fprintf(stderr, "%s: malformed reply\n", prog);
			return EXIT_UNEXPECTED;
		}
		if (!quiet) {
			puts(m);
			fflush(stdout);
		}
		if (r.error[0]) {
			if (quiet)
				fprintf(stderr, "%s: %s: %s\n", prog, method, m);
			return exit_code_of(r.error);
		}
		if (!r.continues)
			return 0;
	}
}
