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
#include <linux/kho/abi/kexec_handover.h>

#include "include/uapi/linux/fdbox.h"

#define FDBOX_MAX_BOXES			1024
#define FDBOX_MAX_ENTRIES_PER_BOX	4096
#define FDBOX_MAX_ENTRIES		65536

struct file;
struct folio;

/**
 * struct fdbox_preserved_folio - one folio of an entry, as handed over.
 * @pfn:   page frame number of the folio's head page.
 * @index: the folio's page offset in the file.
 * @order: the folio's order.
 * @flags: zero in this version.
 *
 * Arrays of these live in KHO-preserved vmalloc memory (see fdbox_kho.c);
 * the layout is part of the handover ABI.
 */
struct fdbox_preserved_folio {
	u64 pfn;
	u64 index;
	u32 order;
	u32 flags;
} __packed;

/**
 * struct fdbox_entry_kho - KHO state of one entry.
 * @folios:       sealed: the folios pinned with memfd_pin_folios().
 * @ser:          sealed: the folio list handed over (KHO-preserved vmalloc);
 *                restored: the folio list from the previous kernel.
 * @nr_folios:    number of elements in @folios / @ser.
 * @ser_kho:      sealed: KHO's record of the @ser preservation.
 * @added_seals:  sealed: F_SEAL_GROW/F_SEAL_SHRINK bits fdbox added to keep
 *                the mapping fixed; cleared again on unseal.
 */
struct fdbox_entry_kho {
	struct folio **folios;
	struct fdbox_preserved_folio *ser;
	u64 nr_folios;
	struct kho_vmalloc ser_kho;
	u32 added_seals;
};

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
 * @kho:       KHO state while sealed or restore-pending, else NULL.
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
 */
struct fdbox_box {
	struct list_head node;
	struct kref ref;
	struct mutex mutex;
	char name[FDBOX_BOX_NAME_LEN];
	u32 state;
	bool dead;
	struct list_head entries;
	u32 nr_entries;
	u32 nr_pending;
	void *kho_desc;
	size_t kho_size;
	struct list_head sealed_node;
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

/* fdbox_main.c, for the restore path */
struct fdbox_box *fdbox_box_alloc(const char *name);
int fdbox_box_publish(struct fdbox_box *box);
int fdbox_box_publish_restored(struct fdbox_box *box);
void fdbox_box_free(struct fdbox_box *box);
int fdbox_reserve_entry(void);
void fdbox_unreserve_entry(void);
struct fdbox_entry *fdbox_entry_alloc(void);
void fdbox_entry_free(struct fdbox_entry *entry);
int fdbox_entry_set_file(struct fdbox_entry *entry, struct file *file);
bool fdbox_valid_box_name(const char *name, size_t len);
bool fdbox_valid_entry_name(const char *name, size_t len);
int fdbox_classify(struct file *file, u32 *type, u64 *page_size);
u32 fdbox_file_seals(struct file *file);

/*
 * KHO support is built when the kernel has CONFIG_KEXEC_HANDOVER, unless the
 * build asks for a module without it (make FDBOX_DISABLE_KHO=1, used by the
 * tests to exercise these stubs on a KHO kernel).
 */
#if defined(CONFIG_KEXEC_HANDOVER) && !defined(FDBOX_DISABLE_KHO)
#define FDBOX_KHO 1
u32 fdbox_kho_features(void);
int fdbox_kho_seal(struct fdbox_box *box);
int fdbox_kho_unseal(struct fdbox_box *box);
int fdbox_kho_restore_entry(struct fdbox_entry *entry, struct file *target);
void fdbox_kho_discard_entry(struct fdbox_entry *entry);
int fdbox_kho_init(void);
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
#endif /* FDBOX_KHO */

#endif /* _FDBOX_INTERNAL_H */
