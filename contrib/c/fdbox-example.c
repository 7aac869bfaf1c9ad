// SPDX-License-Identifier: MIT
/*
 * fdbox-example: put a memfd into fdboxd and get it back, in plain C.
 *
 * A VMM author can copy this file. It needs no JSON library: the requests are
 * written by hand, and the replies are only searched for the few things we need.
 * The protocol is Varlink over an AF_UNIX stream socket:
 *
 *   - each message is one JSON object followed by a NUL byte;
 *   - fds travel as SCM_RIGHTS on the sendmsg() that carries the message's first
 *     byte, and a parameter "fd": N is the index into that message's fd array;
 *   - a failure is a reply with "error": "io.fdbox.Store.<Name>", never a hangup.
 *
 * Usage:
 *   fdbox-example put SOCKET BOX NAME [SIZE]   memfd of SIZE bytes (default 1 MiB)
 *                                               filled with a pattern, stored as BOX/NAME
 *   fdbox-example get SOCKET BOX NAME          fetch BOX/NAME and verify the pattern
 *
 * Box and entry names must match the fdbox name rules ([A-Za-z0-9][A-Za-z0-9._@+-]*,
 * entry names also '=' and ','), so they never need JSON escaping; we check that.
 *
 * Exit status: 0 ok, 1 usage or system error, 2 the daemon answered with an error,
 * 3 the bytes that came back are not the ones that went in.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_REPLY (1 << 20)	/* fdboxd's own message size limit */

/* Byte i of the test pattern: position-dependent, so a shifted copy fails. */
static unsigned char pattern_byte(uint64_t i)
{
	return (unsigned char)((i * 31 + (i >> 12)) & 0xff);
}

static int name_ok(const char *s)
{
	if (!*s || strlen(s) > 255)
		return 0;
	for (const char *p = s; *p; p++)
		if (!(('a' <= *p && *p <= 'z') || ('A' <= *p && *p <= 'Z') ||
		      ('0' <= *p && *p <= '9') || strchr("._@+-=,", *p)))
			return 0;
	return 1;
}

static int connect_to(const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int s;

	if (strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "socket path too long: %s\n", path);
		return -1;
	}
	strcpy(addr.sun_path, path);
	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		fprintf(stderr, "connect %s: %s\n", path, strerror(errno));
		if (s >= 0)
			close(s);
		return -1;
	}
	return s;
}

/* Send msg including its terminating NUL; fd (if >= 0) rides on the first sendmsg. */
static int send_message(int s, const char *msg, int fd)
{
	size_t len = strlen(msg) + 1, off = 0;
	char cbuf[CMSG_SPACE(sizeof(int))];

	while (off < len) {
		struct iovec iov = { .iov_base = (char *)msg + off, .iov_len = len - off };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
		ssize_t n;

		if (off == 0 && fd >= 0) {
			struct cmsghdr *c;

			memset(cbuf, 0, sizeof(cbuf));
			mh.msg_control = cbuf;
			mh.msg_controllen = sizeof(cbuf);
			c = CMSG_FIRSTHDR(&mh);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int));
			memcpy(CMSG_DATA(c), &fd, sizeof(int));
		}
		n = sendmsg(s, &mh, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("sendmsg");
			return -1;
		}
		off += (size_t)n;
	}
	return 0;
}

/*
 * Read one reply (up to its NUL) into buf. Replies may arrive in pieces; fds
 * arrive with the reply's first bytes. *fd_out gets the first fd received (or
 * -1); any further fds are closed, since our calls expect at most one.
 */
static int recv_reply(int s, char *buf, size_t size, int *fd_out)
{
	size_t len = 0;

	*fd_out = -1;
	for (;;) {
		char cbuf[CMSG_SPACE(4 * sizeof(int))];
		struct iovec iov = { .iov_base = buf + len, .iov_len = size - 1 - len };
		struct msghdr mh = {
			.msg_iov = &iov, .msg_iovlen = 1,
			.msg_control = cbuf, .msg_controllen = sizeof(cbuf),
		};
		ssize_t n;

		if (len == size - 1) {
			fprintf(stderr, "reply too large\n");
			return -1;
		}
		n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("recvmsg");
			return -1;
		}
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
			if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
				continue;
			size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (size_t i = 0; i < nfds; i++) {
				int fd;

				memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
				if (*fd_out < 0)
					*fd_out = fd;
				else
					close(fd);
			}
		}
		if (n == 0) {
			fprintf(stderr, "fdboxd closed the connection\n");
			return -1;
		}
		len += (size_t)n;
		/* We send one request at a time, so the reply ends at the first NUL. */
		if (memchr(buf, '\0', len))
			return 0;
	}
}

/*
 * Whether the object in json has a top-level key "key". A tiny scanner rather than
 * strstr(): the string "error" may legitimately appear nested (say, as a metadata
 * key); only a top-level "error" makes a reply an error.
 */
static int has_top_level_key(const char *json, const char *key)
{
	size_t klen = strlen(key);
	int depth = 0, expect_key = 0;

	for (const char *p = json; *p; p++) {
		switch (*p) {
		case '"': {
			const char *start = ++p;

			while (*p && *p != '"')
				p += (*p == '\\' && p[1]) ? 2 : 1;
			if (!*p)
				return 0;
			if (depth == 1 && expect_key && (size_t)(p - start) == klen &&
			    !memcmp(start, key, klen))
				return 1;
			expect_key = 0;
			break;
		}
		case '{':
			depth++;
			expect_key = 1;
			break;
		case '[':
			depth++;
			expect_key = 0;
			break;
		case '}':
		case ']':
			depth--;
			break;
		case ',':
			expect_key = (depth == 1);	/* good enough: we only ask at depth 1 */
			break;
		}
	}
	return 0;
}

/* 0 if the reply is a success; otherwise print it (error name and message), return -1. */
static int check_reply(const char *reply)
{
	if (!has_top_level_key(reply, "error"))
		return 0;
	fprintf(stderr, "fdboxd: %s\n", reply);
	return -1;
}

static int call(int s, const char *request, int fd_in, char *reply, int *fd_out)
{
	if (send_message(s, request, fd_in) < 0 || recv_reply(s, reply, MAX_REPLY, fd_out) < 0)
		return 1;
	if (check_reply(reply) < 0) {
		if (*fd_out >= 0)
			close(*fd_out);
		*fd_out = -1;
		return 2;
	}
	return 0;
}

static int do_put(int s, const char *box, const char *name, size_t size, char *reply)
{
	char request[1024];
	unsigned char *p;
	int mfd, rfd, ret;

	mfd = memfd_create("fdbox-example", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (mfd < 0 || ftruncate(mfd, (off_t)size) < 0) {
		perror("memfd");
		return 1;
	}
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	for (size_t i = 0; i < size; i++)
		p[i] = pattern_byte(i);
	munmap(p, size);

	snprintf(request, sizeof(request),
		 "{\"method\":\"io.fdbox.Store.Put\",\"parameters\":"
		 "{\"box\":\"%s\",\"name\":\"%s\",\"fd\":0,"
		 "\"metadata\":{\"writer\":\"fdbox-example.c\"}}}", box, name);
	ret = call(s, request, mfd, reply, &rfd);
	/* fdboxd took its own reference: ours can go whenever we like. */
	close(mfd);
	if (rfd >= 0)
		close(rfd);
	if (ret == 0)
		printf("put %s/%s: %zu bytes\n", box, name, size);
	return ret;
}

static int do_get(int s, const char *box, const char *name, char *reply)
{
	char request[1024];
	struct stat st;
	unsigned char *p;
	int fd, ret;

	snprintf(request, sizeof(request),
		 "{\"method\":\"io.fdbox.Store.Get\",\"parameters\":"
		 "{\"box\":\"%s\",\"name\":\"%s\"}}", box, name);
	ret = call(s, request, -1, reply, &fd);
	if (ret)
		return ret;
	if (fd < 0) {
		fprintf(stderr, "reply carried no fd\n");
		return 1;
	}
	if (fstat(fd, &st) < 0) {
		perror("fstat");
		return 1;
	}
	ret = 0;
	if (st.st_size > 0) {
		p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
		if (p == MAP_FAILED) {
			perror("mmap");
			return 1;
		}
		for (off_t i = 0; i < st.st_size; i++) {
			if (p[i] != pattern_byte((uint64_t)i)) {
				fprintf(stderr, "byte %lld differs: %u\n", (long long)i, p[i]);
				ret = 3;
				break;
			}
		}
		munmap(p, (size_t)st.st_size);
	}
	close(fd);
	if (ret == 0)
		printf("got %s/%s: %lld bytes, pattern verified\n", box, name, (long long)st.st_size);
	return ret;
}

int main(int argc, char **argv)
{
	size_t size = 1 << 20;
	char *reply;
	int s, ret;

	if (argc < 5 || argc > 6 || (strcmp(argv[1], "put") && strcmp(argv[1], "get"))) {
		fprintf(stderr, "usage: %s put SOCKET BOX NAME [SIZE]\n"
				"       %s get SOCKET BOX NAME\n", argv[0], argv[0]);
		return 1;
	}
	if (!name_ok(argv[3]) || !name_ok(argv[4])) {
		fprintf(stderr, "box and entry names: [A-Za-z0-9._@+=,-] only\n");
		return 1;
	}
	if (argc == 6)
		size = strtoull(argv[5], NULL, 0);
	reply = malloc(MAX_REPLY);
	if (!reply)
		return 1;
	s = connect_to(argv[2]);
	if (s < 0)
		return 1;
	if (!strcmp(argv[1], "put"))
		ret = do_put(s, argv[3], argv[4], size, reply);
	else
		ret = do_get(s, argv[3], argv[4], reply);
	close(s);
	free(reply);
	return ret;
}
