/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fdbox: internal declarations shared by fdbox_main.c (boxes, entries, the
 * misc device) and fdbox_kho.c (sealing with Kexec HandOver and restoring
 * after kexec). See the DOC comment in fdbox_main.c.
 */
#ifndef _FDBOX_INTERNAL_H
#define _FDBOX_INTERNAL_H

#include <linux/atomic.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/types.h>

#include "include/uapi/linux/fdbox.h"

#define FDBOX_MAX_BOXES			1024
#define FDBOX_MAX_ENTRIES_PER_BOX	4096
#define FDBOX_MAX_ENTRIES		65536

/*
 * Largest page size an entry may have: 2 MiB huge pages are supported, 1 GiB
 * ones are refused at PUT_FD (see kmod/README.md, "Page sizes").
 */
#define FDBOX_MAX_PAGE_SIZE	(2UL << 20)

struct file;
struct fdbox_entry_kho;	/* fdbox_kho.c */
struct fdbox_box_release;	/* fdbox_kho.c */

/**
 * struct fdbox_entry - one named file in a box. Protected by its box's mutex.
 * @node:      link in &fdbox_box.entries.
 * @hnode:     link in the global inode hash (only while @file is set).
 * @name:      entry name.
 * @type:      &enum fdbox_entry_type.
 * @file:      the reference the box holds; NULL while a restored entry waits
 *             for RESTORE_FD.
 * @size:      size at put; at seal; or as preserved (restored).
 * @seals:     F_SEAL_* of the file at seal / as preserved.
 * @page_size: PAGE_SIZE, or the huge page size for hugetlb.
 * @uid:       owner, opaque.
 * @gid:       owner group, opaque.
 * @ctime:     when put, seconds since the epoch.
 * @kho:       KHO state while sealed or restore-pending, else NULL
 *             (defined in fdbox_kho.c).
 */
struct fdbox_entry {
	struct list_head node;
	struct hlist_node hnode;
	char name[FDBOX_ENTRY_NAME_LEN];
	u32 type;
	struct file *file;
	u64 size;
	u32 seals;
	u64 page_size;
	u32 uid;
	u32 gid;
	s64 ctime;
	struct fdbox_entry_kho *kho;
};

/**
 * struct fdbox_box - a named group of entries.
 * @node:        link in the global box list (fdbox_boxes_lock).
 * @ref:         lookups hold a reference; the list holds one.
 * @mutex:       protects everything below.
 * @name:        box name.
 * @state:       &enum fdbox_box_state.
 * @dead:        deleted; lookups that raced with the delete see ENOENT.
 * @entries:     list of &struct fdbox_entry, in put order.
 * @nr_entries:  length of @entries.
 * @nr_pending:  restored entries still waiting for RESTORE_FD.
 * @kho_desc:    sealed: the box descriptor in KHO-preserved memory.
 * @kho_size:    sealed: size of @kho_desc.
 * @sealed_node: sealed: link in the list the KHO root is built from.
 * @kho_release: sealed: the box's release list (fdbox_kho.c).
 * @snap_state:  @state as of the last unlock, for LIST_BOXES while the
 *               mutex is held (a long SEAL): written under @mutex.
 * @snap_nr_entries: @nr_entries likewise.
 * @snap_total:  the entries' total size likewise.
 */
struct fdbox_box {
	struct list_head node;
	struct kref ref;
	struct mutex mutex;	/* protects the fields below */
	char name[FDBOX_BOX_NAME_LEN];
	u32 state;
	bool dead;
	struct list_head entries;
	u32 nr_entries;
	u32 nr_pending;
	void *kho_desc;
	size_t kho_size;
	struct list_head sealed_node;
	struct fdbox_box_release *kho_release;
	u32 snap_state;
	u32 snap_nr_entries;
	u64 snap_total;
};

/* Counters reported by FDBOX_IOC_STATS. */
struct fdbox_counters {
	atomic64_t boxes;
	atomic64_t entries;
	atomic64_t file_refs;
	atomic64_t pinned_folios;
	atomic64_t restored_pending;
	atomic64_t puts;
	atomic64_t gets;
	atomic64_t removes;
};

extern struct fdbox_counters fdbox_counters;

/* fdbox_main.c, for fdbox_kho.c. All run in process context. */

/**
 * fdbox_box_alloc - a new, unpublished, open box named @name.
 * @name: a valid box name.
 *
 * Context: Process context; may sleep.
 * Return: the box (one reference, the caller's), or NULL (no memory).
 */
struct fdbox_box *fdbox_box_alloc(const char *name);

/**
 * fdbox_box_publish_restored - add a box restored from the previous kernel,
 * with its restore-pending entries, to the box list.
 * @box: from fdbox_box_alloc(), filled by the restore path.
 *
 * Context: Process context; takes fdbox_boxes_lock.
 * Return: 0 (the list owns @box), -EEXIST (a box has that name), or -ENOSPC
 * (a limit); on failure the caller still owns @box.
 */
int fdbox_box_publish_restored(struct fdbox_box *box);

/**
 * fdbox_box_snapshot - record what LIST_BOXES shows while @box is busy.
 * @box: a box whose mutex the caller holds.
 *
 * Context: Process context.
 */
void fdbox_box_snapshot(struct fdbox_box *box);

/**
 * fdbox_box_free - drop a box that was never published.
 * @box: from fdbox_box_alloc(), with no entries.
 *
 * Context: Process context.
 */
void fdbox_box_free(struct fdbox_box *box);

/**
 * fdbox_entry_alloc - a new, empty entry.
 *
 * Context: Process context; may sleep.
 * Return: the entry, or NULL (no memory).
 */
struct fdbox_entry *fdbox_entry_alloc(void);

/**
 * fdbox_entry_free - free an entry that is in no box.
 * @entry: the entry.
 *
 * Context: Any.
 */
void fdbox_entry_free(struct fdbox_entry *entry);

/**
 * fdbox_valid_box_name - check a box name field.
 * @name: the field.
 * @len:  its size; the name must be NUL-terminated within it.
 *
 * Context: Any.
 * Return: true if it matches ^[A-Za-z0-9][A-Za-z0-9._@+-]*$ (ASCII only).
 */
bool fdbox_valid_box_name(const char *name, size_t len);

/**
 * fdbox_valid_entry_name - check an entry name field.
 * @name: the field.
 * @len:  its size; the name must be NUL-terminated within it.
 *
 * Context: Any.
 * Return: true if it matches ^[A-Za-z0-9][A-Za-z0-9._@+=,-]*$ (ASCII only).
 */
bool fdbox_valid_entry_name(const char *name, size_t len);

/**
 * fdbox_classify - decide whether fdbox holds this file, and as what.
 * @file:      the file.
 * @type:      out: &enum fdbox_entry_type.
 * @page_size: out: the file's page size.
 *
 * Context: Any.
 * Return: 0, or -EOPNOTSUPP (not a memfd, or huge pages larger than
 * %FDBOX_MAX_PAGE_SIZE).
 */
int fdbox_classify(struct file *file, u32 *type, u64 *page_size);

/**
 * fdbox_mapping_frozen - is this shmem memfd's mapping frozen (by LUO, or
 * by an fdbox SEAL)?
 * @file: a memfd.
 *
 * Context: Any; stable only under the inode lock.
 * Return: true if frozen.
 */
bool fdbox_mapping_frozen(struct file *file);

/*
 * KHO support is built when the kernel has CONFIG_KEXEC_HANDOVER, unless the
 * build asks for a module without it (make FDBOX_DISABLE_KHO=1, used by the
 * tests to exercise these stubs on a KHO kernel).
 */
#if defined(CONFIG_KEXEC_HANDOVER) && !defined(FDBOX_DISABLE_KHO)
#define FDBOX_KHO 1
/*
 * fdbox_kho.c; kernel-doc at the definitions. In short: _seal/_unseal need
 * the box mutex and return 0 or an -errno with nothing changed; _init runs
 * at module load before the device exists and returns why (part of) the
 * handover was refused; _register/_unregister add and remove the reboot
 * notifier that makes SEAL/UNSEAL atomic with respect to kexec.
 */
u32 fdbox_kho_features(void);
int fdbox_kho_seal(struct fdbox_box *box);
int fdbox_kho_unseal(struct fdbox_box *box);
int fdbox_kho_restore_entry(struct fdbox_entry *entry, struct file *target);
void fdbox_kho_discard_entry(struct fdbox_entry *entry);
int fdbox_kho_init(void);
int fdbox_kho_release_handover(u64 *folios, u64 *bytes);
int fdbox_kho_rescan(u32 *restored, u32 *pending);
bool fdbox_kho_pending_any(void);
int fdbox_kho_register(void);
void fdbox_kho_unregister(void);
#else
static inline u32 fdbox_kho_features(void)
{
	return 0;
}

static inline int fdbox_kho_seal(struct fdbox_box *box)
{
	return -ENODEV;
}

static inline int fdbox_kho_unseal(struct fdbox_box *box)
{
	return 0;
}

static inline int fdbox_kho_restore_entry(struct fdbox_entry *entry,
					  struct file *target)
{
	return -EBADFD;
}

static inline void fdbox_kho_discard_entry(struct fdbox_entry *entry) { }

static inline int fdbox_kho_init(void)
{
	return 0;
}

static inline int fdbox_kho_release_handover(u64 *folios, u64 *bytes)
{
	return -ENOENT;
}

static inline int fdbox_kho_rescan(u32 *restored, u32 *pending)
{
	*restored = 0;
	*pending = 0;
	return 0;
}

static inline bool fdbox_kho_pending_any(void)
{
	return false;
}

static inline int fdbox_kho_register(void)
{
	return 0;
}

static inline void fdbox_kho_unregister(void) { }
#endif /* FDBOX_KHO */

#endif /* _FDBOX_INTERNAL_H */
