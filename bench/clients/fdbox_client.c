/* fdboxd's side of the benchmark: raw Varlink over AF_UNIX with libc only.
 *
 * One JSON object + NUL per message, fds as SCM_RIGHTS on the sendmsg() that carries
 * the first byte; a reply is read up to its NUL, its fds collected from every recvmsg().
 * Replies are checked for "error" and for the fd count, nothing else is parsed.
 */
#include "harness.h"
#include <sys/socket.h>
#include <sys/un.h>

#define MAXFDS 253

static int sock = -1;
static char *rbuf;
static size_t rcap;

static void op_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	strncpy(sa.sun_path, path, sizeof sa.sun_path - 1);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0)
		die("connect to fdboxd");
	rcap = 1 << 16;
	rbuf = malloc(rcap);
}

static void send_msg(const char *msg, size_t len, const int *fds, int nfds)
{
	union { char buf[CMSG_SPACE(MAXFDS * sizeof(int))]; struct cmsghdr align; } u;
	struct iovec iov = { (void *)msg, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds) {
		mh.msg_control = u.buf;
		mh.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
		memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
	}
	ssize_t n = sendmsg(sock, &mh, MSG_NOSIGNAL);
	if (n < 0)
		die("sendmsg");
	while ((size_t)n < len) { /* the rest, without fds */
		ssize_t m = write(sock, msg + n, len - n);
		if (m <= 0)
			die("write");
		n += m;
	}
}

/* Read one reply; close the fds that came with it; return how many there were. */
static int recv_reply(void)
{
	size_t len = 0;
	int nfds = 0;
	for (;;) {
		union { char buf[CMSG_SPACE(MAXFDS * sizeof(int))]; struct cmsghdr align; } u;
		if (rcap - len < 1 << 16)
			rbuf = realloc(rbuf, rcap *= 2);
		struct iovec iov = { rbuf + len, rcap - len };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
				     .msg_controllen = sizeof u.buf };
		ssize_t n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
		if (n <= 0)
			die("recvmsg from fdboxd");
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
				int k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				int *f = (int *)CMSG_DATA(c);
				for (int i = 0; i < k; i++)
					close(f[i]);
				nfds += k;
			}
		}
		len += n;
		if (rbuf[len - 1] == '\0')
			break;
	}
	if (!strncmp(rbuf, "{\"error\"", 8)) {
		fprintf(stderr, "fdboxd: %s\n", rbuf);
		exit(1);
	}
	return nfds;
}

static char msg[1 << 16];

static void call(const int *fds, int nfds, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void call(const int *fds, int nfds, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int len = vsnprintf(msg, sizeof msg - 1, fmt, ap);
	va_end(ap);
	send_msg(msg, len + 1, fds, nfds);
}

static void op_store(const char *box, const char *name, int fd)
{
	call(&fd, 1, "{\"method\":\"io.fdbox.Store.Put\",\"parameters\":{\"box\":\"%s\",\"name\":\"%s\",\"fd\":0}}", box, name);
	recv_reply();
}

static void op_retrieve(const char *box, const char *name)
{
	call(NULL, 0, "{\"method\":\"io.fdbox.Store.Get\",\"parameters\":{\"box\":\"%s\",\"name\":\"%s\"}}", box, name);
	if (recv_reply() != 1)
		die("Get returned no fd");
}

static void op_delete(const char *box, const char *name)
{
	call(NULL, 0, "{\"method\":\"io.fdbox.Store.Remove\",\"parameters\":{\"box\":\"%s\",\"name\":\"%s\"}}", box, name);
	recv_reply();
}

static void op_store_many(const char *box, int n, int fd)
{
	int fds[MAXFDS];
	if (n > MAXFDS)
		die("too many for one PutMany");
	int len = snprintf(msg, sizeof msg, "{\"method\":\"io.fdbox.Store.PutMany\",\"parameters\":{\"box\":\"%s\",\"entries\":[", box);
	for (int i = 0; i < n; i++) {
		fds[i] = fd;
		len += snprintf(msg + len, sizeof msg - len, "%s{\"name\":\"e%d\",\"fd\":%d}", i ? "," : "", i, i);
	}
	len += snprintf(msg + len, sizeof msg - len, "]}}");
	send_msg(msg, len + 1, fds, n);
	recv_reply();
}

static void op_get_box(const char *box, int n)
{
	call(NULL, 0, "{\"method\":\"io.fdbox.Store.GetBox\",\"parameters\":{\"box\":\"%s\"}}", box);
	if (recv_reply() != n)
		die("GetBox returned the wrong number of fds");
}

static void op_take_box(const char *box, int n)
{
	op_get_box(box, n);
}

static void op_list(int expect)
{
	(void)expect;
	call(NULL, 0, "{\"method\":\"io.fdbox.Store.List\",\"parameters\":{}}");
	recv_reply();
}
