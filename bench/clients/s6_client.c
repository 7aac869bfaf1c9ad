/* s6-fdholderd's side of the benchmark, through its own client library (libs6).
 *
 * s6 has flat ids, so "box/name" becomes the id "box-name"; a "box" is the set of ids
 * with that prefix. getdump returns every fd the daemon holds, which is the 64-entry box
 * when the box64 mode runs (first, on an empty daemon).
 */
#include "harness.h"
#include <skalibs/genalloc.h>
#include <skalibs/stralloc.h>
#include <skalibs/tai.h>
#include <s6/fdholder.h>

static s6_fdholder_t a = S6_FDHOLDER_ZERO;
static tain deadline;

static void s6die(const char *what)
{
	fprintf(stderr, "s6 client: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void set_deadline(void)
{
	tain_now_g();
	tain_addsec_g(&deadline, 30);
}

static void op_connect(const char *path)
{
	set_deadline();
	if (!s6_fdholder_start_g(&a, path, &deadline))
		s6die("connect to s6-fdholderd");
}

static const char *id_of(const char *box, const char *name)
{
	static char id[S6_FDHOLDER_ID_SIZE + 1];
	snprintf(id, sizeof id, "%s-%s", box, name);
	return id;
}

static void op_store(const char *box, const char *name, int fd)
{
	tain limit;
	set_deadline();
	tain_add_g(&limit, &tain_infinite_relative);
	if (!s6_fdholder_store_g(&a, fd, id_of(box, name), &limit, &deadline))
		s6die("store");
}

static void op_retrieve(const char *box, const char *name)
{
	set_deadline();
	int fd = s6_fdholder_retrieve_g(&a, id_of(box, name), &deadline);
	if (fd < 0)
		s6die("retrieve");
	close(fd);
}

static void op_delete(const char *box, const char *name)
{
	set_deadline();
	if (!s6_fdholder_delete_g(&a, id_of(box, name), &deadline))
		s6die("delete");
}

static void op_store_many(const char *box, int n, int fd)
{
	char name[16];
	for (int i = 0; i < n; i++) {
		snprintf(name, sizeof name, "e%d", i);
		op_store(box, name, fd);
	}
}

static void op_get_box(const char *box, int n)
{
	genalloc g = GENALLOC_ZERO;
	(void)box;
	set_deadline();
	if (!s6_fdholder_getdump_g(&a, &g, &deadline))
		s6die("getdump");
	s6_fdholder_fd_t *p = genalloc_s(s6_fdholder_fd_t, &g);
	int k = genalloc_len(s6_fdholder_fd_t, &g);
	if (k != n)
		s6die("getdump returned the wrong number of fds");
	for (int i = 0; i < k; i++)
		close(p[i].fd);
	genalloc_free(s6_fdholder_fd_t, &g);
}

static void op_take_box(const char *box, int n)
{
	char name[16];
	for (int i = 0; i < n; i++) { /* s6 has no boxes: one retrieve per entry */
		snprintf(name, sizeof name, "e%d", i);
		op_retrieve(box, name);
	}
}

static void op_list(int expect)
{
	stralloc sa = STRALLOC_ZERO;
	set_deadline();
	int n = s6_fdholder_list_g(&a, &sa, &deadline);
	if (n < 0 || (expect && n < expect))
		s6die("list");
	stralloc_free(&sa);
}
