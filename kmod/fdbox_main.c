// SPDX-License-Identifier: GPL-2.0
/*
 * fdbox: named boxes of memory file references, for live update.
 */

/**
 * DOC: fdbox
 *
 * Overview
 * ========
 *
 * fdbox lets a privileged daemon give the kernel named references to memory
 * files (memfd, hugetlb memfd) so they outlive the daemon and, once sealed,
 * a kexec. It is not a generic fd stash: only explicitly supported types are
 * accepted, everything else is refused with EOPNOTSUPP.
 *
 * Boxes and entries
 * =================
 *
 * A *box* is a named group of *entries*; an entry is a named reference to one
 * file. PUT_FD takes the module's own reference (fget()); the caller's fd is
 * never touched or closed. GET_FD installs a new O_CLOEXEC fd for the same
 * file and leaves the entry in place. LIST_BOXES / LIST_ENTRIES say what is
 * held, so nothing is ever forgotten in the kernel. A file can be an entry of
 * only one box at a time (so it is never pinned or preserved twice).
 *
 * States
 * ======
 *
 * - open:     entries can be put, got and removed.
 * - sealed:   SEAL pinned every entry's folios and preserved them with KHO
 *             (fdbox_kho.c); no put/remove/delete (EBUSY). GET_FD still works:
 *             writes land in the pinned folios and so cross the kexec.
 *             UNSEAL undoes everything.
 * - restored: created at module load from the previous kernel's handover.
 *             Entries have no file yet: RESTORE_FD copies their preserved
 *             memory into a memfd the caller made, after which GET_FD works.
 *             No put (EBUSY); remove and delete discard what they drop. The
 *             daemon decides when the restore phase is over: FINISH frees the
 *             entries nobody filled and turns the box open.
 *
 * Locking
 * =======
 *
 * - &fdbox_box.mutex protects one box: its state and entries. Held across
 *   a whole operation, including a seal, which can take a while; other
 *   boxes are not blocked by it, nor is LIST_BOXES (it answers from the
 *   snapshot the last unlock took, fdbox_box_snapshot()). Waiting for it
 *   is killable (EINTR), and SEAL's pin, preserve and RESTORE_FD's copy
 *   loops stop on a fatal signal, undoing what they did.
 * - fdbox_boxes_lock (mutex) protects the box list and the box count.
 *   Lookups take it briefly and leave with a kref on the box.
 * - fdbox_inodes_lock (spinlock) protects the inode hash that keeps a file
 *   in at most one entry.
 * - fdbox_kho.c's fdbox_kho_rwsem (read: SEAL and UNSEAL, each whole; write:
 *   the reboot notifier) makes them atomic with respect to kexec.
 * - fdbox_kho.c's fdbox_kho_lock protects the KHO root descriptor, the
 *   release list header, the sealed list and the count of SEALs in flight.
 * - fdbox_kho.c's fdbox_kho_restore_lock protects the boxes of the previous
 *   kernel still pending (open and RESCAN retry them);
 *   fdbox_kho_held_lock, a leaf, the handover left untouched.
 * - The inode lock of an entry's file (or of RESTORE_FD's target) is taken
 *   under the box mutex and fdbox_kho_rwsem, never the other way round.
 *
 * Order: fdbox_kho_restore_lock -> box->mutex -> fdbox_kho_rwsem ->
 * inode lock -> fdbox_kho_lock -> fdbox_boxes_lock -> fdbox_inodes_lock.
 * No box mutex is taken while fdbox_boxes_lock is held, so a long seal
 * never blocks lookups of other boxes.
 *
 * Box names are global: one namespace for the whole machine, kept by the
 * initial user namespace's CAP_SYS_ADMIN (every ioctl checks capable()), so
 * any holder of it can GET_FD any box's files.
 *
 * Lifetime
 * ========
 *
 * A box lives from CREATE_BOX (or restore at load) to DELETE_BOX; it owns one
 * reference on each of its entries' files and one reference on this module,
 * so the module cannot be unloaded while any box exists (rmmod fails with
 * EBUSY/EWOULDBLOCK). Lookups hold a kref so a box being deleted stays valid
 * until they are done; they see &fdbox_box.dead and answer ENOENT.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/capability.h>
#include <linux/cleanup.h>
#include <linux/err.h>
#include <linux/fcntl.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/hashtable.h>
#include <linux/hugetlb.h>
#include <linux/magic.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mount.h>
#include <linux/sched.h>
#include <linux/shmem_fs.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/timekeeping.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include "fdbox_internal.h"

#ifndef GUEST_MEMFD_MAGIC
#define GUEST_MEMFD_MAGIC 0x474d454d
#endif

struct fdbox_counters fdbox_counters;

/* Why the previous kernel's handover was refused at load (0: it was not). */
static int fdbox_restore_status;

static LIST_HEAD(fdbox_boxes);
static DEFINE_MUTEX(fdbox_boxes_lock);
static u32 fdbox_nr_boxes;

static DEFINE_HASHTABLE(fdbox_inodes, 10);
static DEFINE_SPINLOCK(fdbox_inodes_lock);

static atomic_t fdbox_nr_entries = ATOMIC_INIT(0);

/* Names */

/*
 * ASCII letters and digits only: the kernel's isalnum() also accepts the
 * Latin-1 letters 0xc0-0xff, which are not valid UTF-8 on their own and
 * would break every userspace decoder of the inventory.
 */
static bool fdbox_ascii_alnum(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		(c >= '0' && c <= '9');
}

static bool fdbox_name_char(char c, const char *extra)
{
	return fdbox_ascii_alnum(c) || (c && strchr(extra, c));
}

/*
 * Check a name field: NUL-terminated within @len bytes, first character
 * alphanumeric, the rest alphanumeric or in @extra.
 */
static bool fdbox_valid_name(const char *name, size_t len, const char *extra)
{
	size_t n = strnlen(name, len);

	if (n == 0 || n == len)
		return false;
	if (!fdbox_ascii_alnum(name[0]))
		return false;
	for (size_t i = 1; i < n; i++)
		if (!fdbox_name_char(name[i], extra))
			return false;
	return true;
}

bool fdbox_valid_box_name(const char *name, size_t len)
{
	return fdbox_valid_name(name, len, "._@+-");
}

bool fdbox_valid_entry_name(const char *name, size_t len)
{
	return fdbox_valid_name(name, len, "._@+=,-");
}

/* File types */

/*
 * Is @file a memfd? memfd_create() makes an unlinked regular file on the
 * kernel's internal shmem or hugetlbfs mount (SB_KERNMOUNT; a user's tmpfs
 * or hugetlbfs mount never is) named "memfd:<name>". That tells it from an
 * O_TMPFILE or unlinked file on a user mount, and from the other files on the
 * internal mounts, reachable through /proc/<pid>/map_files: SysV shm and
 * shared anonymous memory (S_PRIVATE inodes, or names "SYSV<key>",
 * "anon_hugepage", "dev/zero") and drivers' shmem objects. A memfd LUO gave
 * back has the name "" (memfd_alloc_file("", ...)) and is accepted too.
 * A memfd can never get a link: linkat() across mounts fails with EXDEV.
 */
static bool fdbox_is_memfd(struct file *file, bool shmem)
{
	struct inode *inode = file_inode(file);
	const char *name = file->f_path.dentry->d_name.name;

	if (!S_ISREG(inode->i_mode) || inode->i_nlink || IS_PRIVATE(inode) ||
	    !(inode->i_sb->s_flags & SB_KERNMOUNT))
		return false;
	return !strncmp(name, "memfd:", 6) || (shmem && !name[0]);
}

int fdbox_classify(struct file *file, u32 *type, u64 *page_size)
{
	struct inode *inode = file_inode(file);

	/* guest_memfd: recognised by its pseudo file system, refused */
	if (inode->i_sb->s_magic == GUEST_MEMFD_MAGIC)
		return -EOPNOTSUPP;
	if (shmem_mapping(file->f_mapping) &&
	    inode->i_sb->s_magic == TMPFS_MAGIC && fdbox_is_memfd(file, true)) {
		*type = FDBOX_TYPE_MEMFD;
		*page_size = PAGE_SIZE;
		return 0;
	}
#ifdef CONFIG_HUGETLBFS
	if (is_file_hugepages(file) &&
	    inode->i_sb->s_magic == HUGETLBFS_MAGIC &&
	    fdbox_is_memfd(file, false) &&
	    huge_page_size(hstate_file(file)) <= FDBOX_MAX_PAGE_SIZE) {
		*type = FDBOX_TYPE_MEMFD_HUGETLB;
		*page_size = huge_page_size(hstate_file(file));
		return 0;
	}
#endif
	return -EOPNOTSUPP;
}

bool fdbox_mapping_frozen(struct file *file)
{
#ifdef SHMEM_F_MAPPING_FROZEN	/* kernels with LUO's memfd support */
	return shmem_mapping(file->f_mapping) &&
		(READ_ONCE(SHMEM_I(file_inode(file))->flags) &
		 SHMEM_F_MAPPING_FROZEN);
#else
	return false;
#endif
}

/* The file's F_SEAL_* bits; the caller holds what makes the answer useful. */
static u32 fdbox_file_seals(struct file *file)
{
	struct inode *inode = file_inode(file);

#ifdef CONFIG_HUGETLBFS
	if (is_file_hugepages(file))
		return READ_ONCE(HUGETLBFS_I(inode)->seals);
#endif
	return READ_ONCE(SHMEM_I(inode)->seals);
}

/* Entries */

struct fdbox_entry *fdbox_entry_alloc(void)
{
	struct fdbox_entry *entry = kzalloc(sizeof(*entry), GFP_KERNEL);

	if (!entry)
		return NULL;
	INIT_LIST_HEAD(&entry->node);
	INIT_HLIST_NODE(&entry->hnode);
	return entry;
}

void fdbox_entry_free(struct fdbox_entry *entry)
{
	kfree(entry);
}

/*
 * Make @file (whose reference the caller hands over) the entry's file,
 * unless the file is already an entry somewhere: -EEXIST.
 */
static int fdbox_entry_set_file(struct fdbox_entry *entry, struct file *file)
{
	struct inode *inode = file_inode(file);
	struct fdbox_entry *other;

	guard(spinlock)(&fdbox_inodes_lock);
	hash_for_each_possible(fdbox_inodes, other, hnode, (unsigned long)inode)
		if (file_inode(other->file) == inode)
			return -EEXIST;
	entry->file = file;
	hash_add(fdbox_inodes, &entry->hnode, (unsigned long)inode);
	atomic64_inc(&fdbox_counters.file_refs);
	return 0;
}

/* Take the file out of the entry; the caller fput()s what is returned. */
static struct file *fdbox_entry_take_file(struct fdbox_entry *entry)
{
	struct file *file = entry->file;

	if (!file)
		return NULL;
	spin_lock(&fdbox_inodes_lock);
	hash_del(&entry->hnode);
	spin_unlock(&fdbox_inodes_lock);
	entry->file = NULL;
	atomic64_dec(&fdbox_counters.file_refs);
	return file;
}

static int fdbox_reserve_entry(void)
{
	if (atomic_inc_return(&fdbox_nr_entries) > FDBOX_MAX_ENTRIES) {
		atomic_dec(&fdbox_nr_entries);
		return -ENOSPC;
	}
	atomic64_inc(&fdbox_counters.entries);
	return 0;
}

static void fdbox_unreserve_entry(void)
{
	atomic_dec(&fdbox_nr_entries);
	atomic64_dec(&fdbox_counters.entries);
}

static struct fdbox_entry *fdbox_find_entry(struct fdbox_box *box,
					    const char *name)
{
	struct fdbox_entry *entry;

	lockdep_assert_held(&box->mutex);
	list_for_each_entry(entry, &box->entries, node)
		if (!strcmp(entry->name, name))
			return entry;
	return NULL;
}

/*
 * Unlink @entry from @box and release everything but its file, which is
 * returned for the caller to fput() outside the box mutex.
 */
static struct file *fdbox_unlink_entry(struct fdbox_box *box,
				       struct fdbox_entry *entry)
{
	struct file *file;

	lockdep_assert_held(&box->mutex);
	list_del(&entry->node);
	box->nr_entries--;
	if (entry->kho) {
		/* a restore-pending entry: free its preserved memory */
		fdbox_kho_discard_entry(entry);
		box->nr_pending--;
	}
	file = fdbox_entry_take_file(entry);
	fdbox_entry_free(entry);
	fdbox_unreserve_entry();
	atomic64_inc(&fdbox_counters.removes);
	return file;
}

/* Boxes */

static void fdbox_box_release(struct kref *ref)
{
	struct fdbox_box *box = container_of(ref, struct fdbox_box, ref);

	WARN_ON_ONCE(!list_empty(&box->entries));
	mutex_destroy(&box->mutex);
	kfree(box);
}

static void fdbox_box_put(struct fdbox_box *box)
{
	kref_put(&box->ref, fdbox_box_release);
}

/* Free a box that was never published. */
void fdbox_box_free(struct fdbox_box *box)
{
	fdbox_box_put(box);
}

struct fdbox_box *fdbox_box_alloc(const char *name)
{
	struct fdbox_box *box = kzalloc(sizeof(*box), GFP_KERNEL);

	if (!box)
		return NULL;
	kref_init(&box->ref);
	mutex_init(&box->mutex);
	strscpy(box->name, name);
	box->state = FDBOX_STATE_OPEN;
	INIT_LIST_HEAD(&box->entries);
	INIT_LIST_HEAD(&box->node);
	INIT_LIST_HEAD(&box->sealed_node);
	return box;
}

/*
 * Add a new box to the list. On success the list owns the box's initial
 * reference and the box owns a module reference.
 */
static int fdbox_box_publish(struct fdbox_box *box)
{
	struct fdbox_box *other;

	guard(mutex)(&fdbox_boxes_lock);
	list_for_each_entry(other, &fdbox_boxes, node)
		if (!strcmp(other->name, box->name))
			return -EEXIST;
	if (fdbox_nr_boxes >= FDBOX_MAX_BOXES)
		return -ENOSPC;
	__module_get(THIS_MODULE);
	list_add_tail(&box->node, &fdbox_boxes);
	fdbox_nr_boxes++;
	atomic64_inc(&fdbox_counters.boxes);
	return 0;
}

/*
 * Publish a box restored from the previous kernel, with its restore-pending
 * entries. On failure the caller still owns the box.
 */
int fdbox_box_publish_restored(struct fdbox_box *box)
{
	u32 i;
	int err;

	for (i = 0; i < box->nr_entries; i++) {
		err = fdbox_reserve_entry();
		if (err)
			goto err_unreserve;
	}
	err = fdbox_box_publish(box);
	if (err)
		goto err_unreserve;
	atomic64_add(box->nr_pending, &fdbox_counters.restored_pending);
	return 0;

err_unreserve:
	while (i--)
		fdbox_unreserve_entry();
	return err;
}

/* Find a box by name; the caller puts the returned reference. */
static struct fdbox_box *fdbox_find_box(const char *name)
{
	struct fdbox_box *box;

	guard(mutex)(&fdbox_boxes_lock);
	list_for_each_entry(box, &fdbox_boxes, node) {
		if (!strcmp(box->name, name)) {
			kref_get(&box->ref);
			return box;
		}
	}
	return NULL;
}

/*
 * Look a box up and lock it. Returns the box with a reference and its mutex
 * held, or an ERR_PTR (-ENOENT).
 */
static struct fdbox_box *fdbox_lock_box(const char *name)
{
	struct fdbox_box *box = fdbox_find_box(name);

	if (!box)
		return ERR_PTR(-ENOENT);
	/* a long SEAL holds it: a caller that is killed meanwhile leaves */
	if (mutex_lock_killable(&box->mutex)) {
		fdbox_box_put(box);
		return ERR_PTR(-EINTR);
	}
	if (box->dead) {
		mutex_unlock(&box->mutex);
		fdbox_box_put(box);
		return ERR_PTR(-ENOENT);
	}
	return box;
}

static void fdbox_unlock_box(struct fdbox_box *box)
{
	fdbox_box_snapshot(box);
	mutex_unlock(&box->mutex);
	fdbox_box_put(box);
}

/* ioctl plumbing */

/**
 * struct fdbox_ucmd - one ioctl call.
 * @ubuffer:   the user's struct.
 * @user_size: its size, as the user said.
 * @cmd:       the kernel copy.
 */
struct fdbox_ucmd {
	void __user *ubuffer;
	u32 user_size;
	void *cmd;
};

static int fdbox_respond(struct fdbox_ucmd *ucmd, size_t kernel_size)
{
	if (copy_to_user(ucmd->ubuffer, ucmd->cmd,
			 min_t(size_t, ucmd->user_size, kernel_size)))
		return -EFAULT;
	return 0;
}

static int fdbox_ioctl_version(struct fdbox_ucmd *ucmd)
{
	struct fdbox_version *argp = ucmd->cmd;

	if (argp->__reserved)
		return -EINVAL;
	argp->api_version = FDBOX_API_VERSION;
	argp->features = fdbox_kho_features();
	argp->max_boxes = FDBOX_MAX_BOXES;
	argp->max_entries_per_box = FDBOX_MAX_ENTRIES_PER_BOX;
	argp->max_entries = FDBOX_MAX_ENTRIES;
	argp->restore_status = READ_ONCE(fdbox_restore_status);
	return fdbox_respond(ucmd, sizeof(*argp));
}

static int fdbox_ioctl_stats(struct fdbox_ucmd *ucmd)
{
	struct fdbox_stats *argp = ucmd->cmd;
	struct fdbox_counters *c = &fdbox_counters;

	if (argp->__reserved)
		return -EINVAL;
	argp->boxes = atomic64_read(&c->boxes);
	argp->entries = atomic64_read(&c->entries);
	argp->file_refs = atomic64_read(&c->file_refs);
	argp->pinned_folios = atomic64_read(&c->pinned_folios);
	argp->restored_pending = atomic64_read(&c->restored_pending);
	argp->puts = atomic64_read(&c->puts);
	argp->gets = atomic64_read(&c->gets);
	argp->removes = atomic64_read(&c->removes);
	return fdbox_respond(ucmd, sizeof(*argp));
}

static int fdbox_check_box_req(struct fdbox_box_req *argp)
{
	if (argp->flags)
		return -EINVAL;
	if (!fdbox_valid_box_name(argp->box, sizeof(argp->box)))
		return -EINVAL;
	return 0;
}

static int fdbox_ioctl_create_box(struct fdbox_ucmd *ucmd)
{
	struct fdbox_box_req *argp = ucmd->cmd;
	struct fdbox_box *box;
	int err;

	err = fdbox_check_box_req(argp);
	if (err)
		return err;
	box = fdbox_box_alloc(argp->box);
	if (!box)
		return -ENOMEM;
	err = fdbox_box_publish(box);
	if (err)
		fdbox_box_put(box);
	return err;
}

static int fdbox_ioctl_delete_box(struct fdbox_ucmd *ucmd)
{
	struct fdbox_box_req *argp = ucmd->cmd;
	struct fdbox_entry *entry, *tmp;
	struct fdbox_box *box;
	LIST_HEAD(files);
	struct file **fv;
	u32 n = 0;
	int err;

	err = fdbox_check_box_req(argp);
	if (err)
		return err;
	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box))
		return PTR_ERR(box);
	if (box->state == FDBOX_STATE_SEALED) {
		fdbox_unlock_box(box);
		return -EBUSY;
	}
	fv = kvmalloc_array(box->nr_entries ?: 1, sizeof(*fv), GFP_KERNEL);
	if (!fv) {
		fdbox_unlock_box(box);
		return -ENOMEM;
	}
	list_for_each_entry_safe(entry, tmp, &box->entries, node) {
		struct file *file = fdbox_unlink_entry(box, entry);

		if (file)
			fv[n++] = file;
	}
	box->dead = true;
	scoped_guard(mutex, &fdbox_boxes_lock) {
		list_del_init(&box->node);
		fdbox_nr_boxes--;
		atomic64_dec(&fdbox_counters.boxes);
	}
	fdbox_unlock_box(box);

	while (n)
		fput(fv[--n]);
	kvfree(fv);
	fdbox_box_put(box);		/* the list's reference */
	module_put(THIS_MODULE);	/* the box's module reference */
	return 0;
}

static int fdbox_ioctl_put_fd(struct fdbox_ucmd *ucmd)
{
	struct fdbox_put_fd *argp = ucmd->cmd;
	struct fdbox_entry *entry;
	struct fdbox_box *box;
	struct file *file;
	u64 page_size;
	u32 type;
	int err;

	if (argp->flags)
		return -EINVAL;
	if (!fdbox_valid_box_name(argp->box, sizeof(argp->box)) ||
	    !fdbox_valid_entry_name(argp->name, sizeof(argp->name)))
		return -EINVAL;

	file = fget(argp->fd);	/* becomes the entry's own reference */
	if (!file)
		return -EBADF;
	err = fdbox_classify(file, &type, &page_size);
	if (err)
		goto out_fput;
	/* preserved by LUO already (SEAL checks again, under the inode lock) */
	if (fdbox_mapping_frozen(file)) {
		err = -EEXIST;
		goto out_fput;
	}

	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box)) {
		err = PTR_ERR(box);
		goto out_fput;
	}
	if (box->state != FDBOX_STATE_OPEN) {
		err = -EBUSY;
		goto out_unlock;
	}
	if (fdbox_find_entry(box, argp->name)) {
		err = -EEXIST;
		goto out_unlock;
	}
	if (box->nr_entries >= FDBOX_MAX_ENTRIES_PER_BOX) {
		err = -ENOSPC;
		goto out_unlock;
	}
	entry = fdbox_entry_alloc();
	if (!entry) {
		err = -ENOMEM;
		goto out_unlock;
	}
	strscpy(entry->name, argp->name);
	entry->type = type;
	entry->page_size = page_size;
	entry->size = i_size_read(file_inode(file));
	entry->uid = argp->uid;
	entry->gid = argp->gid;
	entry->ctime = ktime_get_real_seconds();

	err = fdbox_reserve_entry();
	if (err)
		goto out_free;
	err = fdbox_entry_set_file(entry, file);
	if (err)
		goto out_unreserve;

	list_add_tail(&entry->node, &box->entries);
	box->nr_entries++;
	atomic64_inc(&fdbox_counters.puts);
	argp->type = type;
	argp->fsize = entry->size;
	fdbox_unlock_box(box);

	/* The entry is in: a failed copy-out does not undo it. */
	return fdbox_respond(ucmd, sizeof(*argp));

out_unreserve:
	fdbox_unreserve_entry();
out_free:
	fdbox_entry_free(entry);
out_unlock:
	fdbox_unlock_box(box);
out_fput:
	fput(file);
	return err;
}

static int fdbox_ioctl_get_fd(struct fdbox_ucmd *ucmd)
{
	struct fdbox_get_fd *argp = ucmd->cmd;
	struct fdbox_entry *entry;
	struct fdbox_box *box;
	struct file *file;
	int __user *ufd;
	int fd, err;

	if (argp->flags)
		return -EINVAL;
	if (!fdbox_valid_box_name(argp->box, sizeof(argp->box)) ||
	    !fdbox_valid_entry_name(argp->name, sizeof(argp->name)))
		return -EINVAL;

	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box))
		return PTR_ERR(box);
	entry = fdbox_find_entry(box, argp->name);
	if (!entry) {
		fdbox_unlock_box(box);
		return -ENOENT;
	}
	if (!entry->file) {
		fdbox_unlock_box(box);
		return -ENODATA;
	}
	file = get_file(entry->file);
	argp->type = entry->type;
	fdbox_unlock_box(box);

	argp->fd = -1;
	err = fdbox_respond(ucmd, sizeof(*argp));
	if (err)
		goto out_fput;
	/*
	 * As SCM_RIGHTS, pidfd_getfd() and seccomp do: receive_fd() asks the
	 * LSM (security_file_receive()) before it installs the fd, and writes
	 * the fd number last.
	 */
	ufd = (int __user *)(ucmd->ubuffer + offsetof(struct fdbox_get_fd, fd));
	fd = receive_fd(file, ufd, O_CLOEXEC);
	if (fd < 0) {
		err = fd;
		goto out_fput;
	}
	atomic64_inc(&fdbox_counters.gets);
	err = 0;
out_fput:
	fput(file);	/* receive_fd() took its own reference */
	return err;
}

static int fdbox_ioctl_remove_entry(struct fdbox_ucmd *ucmd)
{
	struct fdbox_entry_req *argp = ucmd->cmd;
	struct fdbox_entry *entry;
	struct fdbox_box *box;
	struct file *file;

	if (argp->flags)
		return -EINVAL;
	if (!fdbox_valid_box_name(argp->box, sizeof(argp->box)) ||
	    !fdbox_valid_entry_name(argp->name, sizeof(argp->name)))
		return -EINVAL;

	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box))
		return PTR_ERR(box);
	entry = fdbox_find_entry(box, argp->name);
	if (!entry) {
		fdbox_unlock_box(box);
		return -ENOENT;
	}
	if (box->state == FDBOX_STATE_SEALED) {
		fdbox_unlock_box(box);
		return -EBUSY;
	}
	file = fdbox_unlink_entry(box, entry);
	fdbox_unlock_box(box);
	if (file)
		fput(file);
	return 0;
}

static u64 fdbox_entry_size(struct fdbox_entry *entry)
{
	/* live while open; frozen at seal; as preserved when restored */
	if (entry->file && !entry->kho)
		return i_size_read(file_inode(entry->file));
	return entry->size;
}

void fdbox_box_snapshot(struct fdbox_box *box)
{
	struct fdbox_entry *entry;
	u64 total = 0;

	lockdep_assert_held(&box->mutex);
	list_for_each_entry(entry, &box->entries, node)
		total += fdbox_entry_size(entry);
	WRITE_ONCE(box->snap_state, box->state);
	WRITE_ONCE(box->snap_nr_entries, box->nr_entries);
	WRITE_ONCE(box->snap_total, total);
}

/*
 * One box for LIST_BOXES. A box whose mutex is held (a SEAL of a large
 * memfd can hold it for seconds) answers from the snapshot its last unlock
 * took, so a list never waits for a seal. Returns false if it is deleted.
 */
static bool fdbox_box_info(struct fdbox_box *box, struct fdbox_box_info *info)
{
	struct fdbox_entry *entry;

	if (!mutex_trylock(&box->mutex)) {
		if (READ_ONCE(box->dead))
			return false;
		strscpy(info->name, box->name);
		info->state = READ_ONCE(box->snap_state);
		info->nr_entries = READ_ONCE(box->snap_nr_entries);
		info->total_size = READ_ONCE(box->snap_total);
		return true;
	}
	if (box->dead) {
		mutex_unlock(&box->mutex);
		return false;
	}
	strscpy(info->name, box->name);
	info->state = box->state;
	info->nr_entries = box->nr_entries;
	list_for_each_entry(entry, &box->entries, node)
		info->total_size += fdbox_entry_size(entry);
	mutex_unlock(&box->mutex);
	return true;
}

/* Check a list request's array description. */
static int fdbox_check_list(u32 info_size, u32 min_info, u32 count, u64 uptr,
			    u32 flags)
{
	if (flags || info_size < min_info)
		return -EINVAL;
	/* as for the struct size: the tail past the kernel's is cleared */
	if (info_size > PAGE_SIZE)
		return -E2BIG;
	if (count && !uptr)
		return -EFAULT;
	return 0;
}

static int fdbox_copy_infos(u64 uptr, u32 info_size, const void *infos,
			    size_t kinfo_size, u32 n)
{
	size_t copy = min_t(size_t, info_size, kinfo_size);
	char __user *dst = u64_to_user_ptr(uptr);

	for (u32 i = 0; i < n; i++) {
		if (copy_to_user(dst + (size_t)i * info_size,
				 infos + i * kinfo_size, copy))
			return -EFAULT;
		if (info_size > kinfo_size &&
		    clear_user(dst + (size_t)i * info_size + kinfo_size,
			       info_size - kinfo_size))
			return -EFAULT;
	}
	return 0;
}

static int fdbox_ioctl_list_boxes(struct fdbox_ucmd *ucmd)
{
	struct fdbox_list_boxes *argp = ucmd->cmd;
	struct fdbox_box_info *infos = NULL;
	struct fdbox_box **boxes = NULL;
	struct fdbox_box *box;
	u32 n = 0, listed = 0, i;
	int err;

	err = fdbox_check_list(argp->info_size,
			       offsetofend(struct fdbox_box_info, total_size),
			       argp->count, argp->boxes, argp->flags);
	if (err)
		return err;

	scoped_guard(mutex, &fdbox_boxes_lock) {
		if (fdbox_nr_boxes > argp->count) {
			argp->count = fdbox_nr_boxes;
			err = -EOVERFLOW;
			break;
		}
		boxes = kvcalloc(fdbox_nr_boxes ?: 1, sizeof(*boxes),
				 GFP_KERNEL);
		if (!boxes) {
			err = -ENOMEM;
			break;
		}
		list_for_each_entry(box, &fdbox_boxes, node) {
			kref_get(&box->ref);
			boxes[n++] = box;
		}
	}
	/* the count must reach the caller, or the EOVERFLOW means nothing */
	if (err == -EOVERFLOW)
		return fdbox_respond(ucmd, sizeof(*argp)) ?: err;
	if (err)
		return err;

	infos = kvcalloc(n ?: 1, sizeof(*infos), GFP_KERNEL);
	if (!infos) {
		err = -ENOMEM;
		goto out;
	}
	for (i = 0; i < n; i++) {
		/* deleted since the list was read: not listed */
		if (fdbox_box_info(boxes[i], &infos[listed]))
			listed++;
	}
	argp->count = listed;
	err = fdbox_copy_infos(argp->boxes, argp->info_size, infos,
			       sizeof(*infos), listed);
	if (!err)
		err = fdbox_respond(ucmd, sizeof(*argp));
out:
	for (i = 0; i < n; i++)
		fdbox_box_put(boxes[i]);
	kvfree(boxes);
	kvfree(infos);
	return err;
}

static int fdbox_ioctl_list_entries(struct fdbox_ucmd *ucmd)
{
	struct fdbox_list_entries *argp = ucmd->cmd;
	struct fdbox_entry_info *infos;
	struct fdbox_entry *entry;
	struct fdbox_box *box;
	u32 n = 0;
	int err;

	err = fdbox_check_list(argp->info_size,
			       offsetofend(struct fdbox_entry_info, page_size),
			       argp->count, argp->entries, argp->flags);
	if (err)
		return err;
	if (!fdbox_valid_box_name(argp->box, sizeof(argp->box)))
		return -EINVAL;

	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box))
		return PTR_ERR(box);
	if (box->nr_entries > argp->count) {
		argp->count = box->nr_entries;
		fdbox_unlock_box(box);
		err = fdbox_respond(ucmd, sizeof(*argp));
		return err ?: -EOVERFLOW;
	}
	infos = kvcalloc(box->nr_entries ?: 1, sizeof(*infos), GFP_KERNEL);
	if (!infos) {
		fdbox_unlock_box(box);
		return -ENOMEM;
	}
	list_for_each_entry(entry, &box->entries, node) {
		struct fdbox_entry_info *info = &infos[n++];

		strscpy(info->name, entry->name);
		info->type = entry->type;
		if (entry->kho && entry->file)
			info->flags |= FDBOX_ENTRY_PRESERVED;
		if (entry->kho && !entry->file)
			info->flags |= FDBOX_ENTRY_RESTORE_PENDING;
		info->fsize = fdbox_entry_size(entry);
		info->seals = entry->file && !entry->kho ?
			fdbox_file_seals(entry->file) : entry->seals;
		info->uid = entry->uid;
		info->gid = entry->gid;
		info->ctime = entry->ctime;
		info->page_size = entry->page_size;
	}
	fdbox_unlock_box(box);

	argp->count = n;
	err = fdbox_copy_infos(argp->entries, argp->info_size, infos,
			       sizeof(*infos), n);
	kvfree(infos);
	if (err)
		return err;
	return fdbox_respond(ucmd, sizeof(*argp));
}

static int fdbox_ioctl_seal(struct fdbox_ucmd *ucmd)
{
	struct fdbox_box_req *argp = ucmd->cmd;
	struct fdbox_box *box;
	int err;

	err = fdbox_check_box_req(argp);
	if (err)
		return err;
	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box))
		return PTR_ERR(box);
	if (box->state != FDBOX_STATE_OPEN)
		err = -EBUSY;
	else
		err = fdbox_kho_seal(box);
	if (!err)
		box->state = FDBOX_STATE_SEALED;
	fdbox_unlock_box(box);
	return err;
}

static int fdbox_ioctl_unseal(struct fdbox_ucmd *ucmd)
{
	struct fdbox_box_req *argp = ucmd->cmd;
	struct fdbox_box *box;
	int err;

	err = fdbox_check_box_req(argp);
	if (err)
		return err;
	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box))
		return PTR_ERR(box);
	if (box->state != FDBOX_STATE_SEALED)
		err = -EBADFD;
	else
		err = fdbox_kho_unseal(box);
	if (!err)
		box->state = FDBOX_STATE_OPEN;
	fdbox_unlock_box(box);
	return err;
}

static int fdbox_ioctl_restore_fd(struct fdbox_ucmd *ucmd)
{
	struct fdbox_restore_fd *argp = ucmd->cmd;
	struct fdbox_entry *entry;
	struct fdbox_box *box;
	struct file *target;
	int err;

	if (argp->flags || argp->__reserved)
		return -EINVAL;
	if (!fdbox_valid_box_name(argp->box, sizeof(argp->box)) ||
	    !fdbox_valid_entry_name(argp->name, sizeof(argp->name)))
		return -EINVAL;
	target = fget(argp->fd);
	if (!target)
		return -EBADF;

	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box)) {
		fput(target);
		return PTR_ERR(box);
	}
	entry = fdbox_find_entry(box, argp->name);
	if (!entry) {
		err = -ENOENT;
	} else if (box->state != FDBOX_STATE_RESTORED || entry->file ||
		   !entry->kho) {
		err = -EBADFD;
	} else {
		/*
		 * Claim the target first, so no data is copied into a file
		 * another box holds (-EEXIST), and none can take it meanwhile.
		 * On success the target reference becomes the entry's.
		 */
		err = fdbox_entry_set_file(entry, target);
		if (!err) {
			err = fdbox_kho_restore_entry(entry, target);
			if (err)
				fdbox_entry_take_file(entry);
		}
		if (!err) {
			target = NULL;
			box->nr_pending--;
		}
	}
	fdbox_unlock_box(box);
	if (target)
		fput(target);
	return err;
}

static int fdbox_ioctl_finish(struct fdbox_ucmd *ucmd)
{
	struct fdbox_box_req *argp = ucmd->cmd;
	struct fdbox_entry *entry, *tmp;
	struct fdbox_box *box;
	int err;

	err = fdbox_check_box_req(argp);
	if (err)
		return err;
	box = fdbox_lock_box(argp->box);
	if (IS_ERR(box))
		return PTR_ERR(box);
	if (box->state != FDBOX_STATE_RESTORED) {
		fdbox_unlock_box(box);
		return -EBADFD;
	}
	list_for_each_entry_safe(entry, tmp, &box->entries, node) {
		/* pending entries have no file: nothing to fput */
		if (!entry->file)
			WARN_ON_ONCE(fdbox_unlink_entry(box, entry));
	}
	box->state = FDBOX_STATE_OPEN;
	fdbox_unlock_box(box);
	return 0;
}

static int fdbox_ioctl_release_handover(struct fdbox_ucmd *ucmd)
{
	struct fdbox_release_handover *argp = ucmd->cmd;
	int err;

	if (argp->flags)
		return -EINVAL;
	err = fdbox_kho_release_handover(&argp->folios, &argp->bytes);
	if (err)
		return err;
	return fdbox_respond(ucmd, sizeof(*argp));
}

static int fdbox_ioctl_rescan(struct fdbox_ucmd *ucmd)
{
	struct fdbox_rescan *argp = ucmd->cmd;

	if (argp->flags)
		return -EINVAL;
	WRITE_ONCE(fdbox_restore_status,
		   fdbox_kho_rescan(&argp->restored, &argp->pending));
	return fdbox_respond(ucmd, sizeof(*argp));
}

union fdbox_ucmd_buffer {
	struct fdbox_version version;
	struct fdbox_stats stats;
	struct fdbox_box_req box;
	struct fdbox_put_fd put;
	struct fdbox_get_fd get;
	struct fdbox_entry_req entry;
	struct fdbox_list_boxes list_boxes;
	struct fdbox_list_entries list_entries;
	struct fdbox_restore_fd restore;
	struct fdbox_release_handover release;
	struct fdbox_rescan rescan;
};

struct fdbox_ioctl_op {
	unsigned int size;
	unsigned int min_size;
	unsigned int ioctl_num;
	int (*execute)(struct fdbox_ucmd *ucmd);
};

#define IOCTL_OP(_ioctl, _fn, _struct, _last)                                  \
	[_IOC_NR(_ioctl)] = {                                                  \
		.size = sizeof(_struct) +                                      \
			BUILD_BUG_ON_ZERO(sizeof(union fdbox_ucmd_buffer) <    \
					  sizeof(_struct)),                    \
		.min_size = offsetofend(_struct, _last),                       \
		.ioctl_num = _ioctl,                                           \
		.execute = _fn,                                                \
	}

static const struct fdbox_ioctl_op fdbox_ioctl_ops[] = {
	IOCTL_OP(FDBOX_IOC_VERSION, fdbox_ioctl_version,
		 struct fdbox_version, __reserved),
	IOCTL_OP(FDBOX_IOC_STATS, fdbox_ioctl_stats,
		 struct fdbox_stats, removes),
	IOCTL_OP(FDBOX_IOC_CREATE_BOX, fdbox_ioctl_create_box,
		 struct fdbox_box_req, box),
	IOCTL_OP(FDBOX_IOC_DELETE_BOX, fdbox_ioctl_delete_box,
		 struct fdbox_box_req, box),
	IOCTL_OP(FDBOX_IOC_LIST_BOXES, fdbox_ioctl_list_boxes,
		 struct fdbox_list_boxes, boxes),
	IOCTL_OP(FDBOX_IOC_PUT_FD, fdbox_ioctl_put_fd,
		 struct fdbox_put_fd, name),
	IOCTL_OP(FDBOX_IOC_GET_FD, fdbox_ioctl_get_fd,
		 struct fdbox_get_fd, name),
	IOCTL_OP(FDBOX_IOC_REMOVE_ENTRY, fdbox_ioctl_remove_entry,
		 struct fdbox_entry_req, name),
	IOCTL_OP(FDBOX_IOC_LIST_ENTRIES, fdbox_ioctl_list_entries,
		 struct fdbox_list_entries, box),
	IOCTL_OP(FDBOX_IOC_SEAL, fdbox_ioctl_seal,
		 struct fdbox_box_req, box),
	IOCTL_OP(FDBOX_IOC_UNSEAL, fdbox_ioctl_unseal,
		 struct fdbox_box_req, box),
	IOCTL_OP(FDBOX_IOC_RESTORE_FD, fdbox_ioctl_restore_fd,
		 struct fdbox_restore_fd, name),
	IOCTL_OP(FDBOX_IOC_FINISH, fdbox_ioctl_finish,
		 struct fdbox_box_req, box),
	IOCTL_OP(FDBOX_IOC_RELEASE_HANDOVER, fdbox_ioctl_release_handover,
		 struct fdbox_release_handover, bytes),
	IOCTL_OP(FDBOX_IOC_RESCAN, fdbox_ioctl_rescan,
		 struct fdbox_rescan, pending),
};

static long fdbox_ioctl(struct file *filp, unsigned int cmd,
			unsigned long arg)
{
	const struct fdbox_ioctl_op *op;
	struct fdbox_ucmd ucmd = {};
	union fdbox_ucmd_buffer buf;
	unsigned int nr = _IOC_NR(cmd);
	int err;

	if (nr >= ARRAY_SIZE(fdbox_ioctl_ops) ||
	    fdbox_ioctl_ops[nr].ioctl_num != cmd)
		return -ENOTTY;
	op = &fdbox_ioctl_ops[nr];
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;

	ucmd.ubuffer = (void __user *)arg;
	err = get_user(ucmd.user_size, (u32 __user *)ucmd.ubuffer);
	if (err)
		return err;
	if (ucmd.user_size < op->min_size)
		return -EINVAL;
	/* copy_struct_from_user() checks the tail is zero: bound that scan */
	if (ucmd.user_size > PAGE_SIZE)
		return -E2BIG;

	ucmd.cmd = &buf;
	err = copy_struct_from_user(ucmd.cmd, op->size, ucmd.ubuffer,
				    ucmd.user_size);
	if (err)
		return err;
	return op->execute(&ucmd);
}

/*
 * Set once the previous kernel's boxes are restored. /dev/fdbox is
 * registered before the restore (so a failing misc_register() leaves the
 * handover untouched for a later load) but opens only after it: the first
 * open already lists every restored box, and nobody can take a restored
 * box's name first.
 */
static bool fdbox_ready;

static int fdbox_open(struct inode *inode, struct file *filp)
{
	u32 restored, pending;

	/* pairs with fdbox_init()'s release: the restored boxes are listed */
	if (!smp_load_acquire(&fdbox_ready))
		return -EAGAIN;
	/* a box a transient failure kept back at load: try it again */
	if (fdbox_kho_pending_any())
		WRITE_ONCE(fdbox_restore_status,
			   fdbox_kho_rescan(&restored, &pending));
	return nonseekable_open(inode, filp);
}

static const struct file_operations fdbox_fops = {
	.owner		= THIS_MODULE,
	.open		= fdbox_open,
	.unlocked_ioctl	= fdbox_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
};

static struct miscdevice fdbox_miscdev = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "fdbox",
	.fops	= &fdbox_fops,
	.mode	= 0600,
};

static int __init fdbox_init(void)
{
	int err;

	err = fdbox_kho_register();
	if (err)
		return err;
	/*
	 * The device first: nothing of the handover is claimed until the load
	 * can no longer fail, so a failed load leaves it for the next one.
	 * Opens wait for fdbox_ready (see fdbox_open()).
	 */
	err = misc_register(&fdbox_miscdev);
	if (err) {
		fdbox_kho_unregister();
		return err;
	}
	fdbox_restore_status = fdbox_kho_init();
	if (fdbox_restore_status)
		pr_err("previous kernel's boxes refused: %pe\n",
		       ERR_PTR(fdbox_restore_status));
	/* after the restore: an open that sees it sees every restored box */
	smp_store_release(&fdbox_ready, true);
	return 0;
}

static void __exit fdbox_exit(void)
{
	/* every box holds a module reference: none can exist here */
	WARN_ON_ONCE(!list_empty(&fdbox_boxes));
	misc_deregister(&fdbox_miscdev);
	fdbox_kho_unregister();
}

module_init(fdbox_init);
module_exit(fdbox_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("fdbox: named boxes of memory file references for live update");
MODULE_AUTHOR("fdbox developers");
