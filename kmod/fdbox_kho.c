// SPDX-License-Identifier: GPL-2.0
/*
 * fdbox: sealing boxes with Kexec HandOver, and restoring them after kexec.
 */

/**
 * DOC: fdbox KHO handover
 *
 * Seal
 * ====
 *
 * Sealing a box, for each entry (all or nothing):
 *
 * 1. Under the inode lock, add F_SEAL_GROW and F_SEAL_SHRINK to the memfd if
 *    it lacks them (remembered, and taken off again on unseal), so its size
 *    cannot change while sealed. (In-tree LUO uses shmem_freeze(), which is
 *    not exported to modules.)
 * 2. Pin every folio with memfd_pin_folios(): this allocates holes and
 *    migrates folios out of CMA, hence out of KHO scratch memory.
 * 3. kho_preserve_folio() each folio, mark it dirty, zero it if it never was
 *    (as mm/memfd_luo.c does). Writes after the seal land in the same pinned
 *    folios and so cross the kexec too.
 * 4. Record (pfn, index, order) of each folio in a vmalloc array preserved
 *    with kho_preserve_vmalloc().
 *
 * Then a box descriptor (struct fdbox_kho_box, from kho_alloc_preserve())
 * lists the entries, and the root descriptor (struct fdbox_kho_root) lists
 * the physical addresses of all sealed boxes' descriptors. The root is
 * attached as the KHO subtree "fdbox"; it is rebuilt on every seal and
 * unseal. Every descriptor and folio list carries a CRC32.
 *
 * In 7.2 KHO has no finalize step: what is preserved when kexec runs is what
 * crosses. Seal before kexec -e; loading the kernel may happen before or
 * after.
 *
 * Restore
 * =======
 *
 * At module load after a KHO kexec, the "fdbox" subtree is looked up. Every
 * field is validated (magic, version, CRC, counts against limits and against
 * the sizes that KHO says were preserved, names, types, folio orders and
 * indexes within the file size) before any box is created. Memory is only
 * read after KHO confirmed it is preserved memory (kho_restore_folio() /
 * kho_restore_vmalloc() check KHO's own marks); a descriptor that fails is
 * refused as a whole, the error is reported by FDBOX_IOC_VERSION, and the
 * data folios it names are left alone (they stay reserved: never touched).
 *
 * On success every data folio is claimed with kho_restore_folio() and the
 * boxes appear in state restored. RESTORE_FD copies an entry's folios into a
 * memfd the caller created and frees them; FINISH frees those of entries
 * nobody claimed.
 *
 * The root descriptor's page is kept for the life of the kernel and its magic
 * overwritten with FDBOX_KHO_CONSUMED_MAGIC, so a second load of the module
 * in the same boot sees the handover was already taken.
 *
 * Locking: callers hold the box's mutex; fdbox_kho_lock protects the root and
 * the list of sealed boxes.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cleanup.h>
#include <linux/crc32.h>
#include <linux/err.h>
#include <linux/fcntl.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/hugetlb.h>
#include <linux/io.h>
#include <linux/kexec_handover.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/overflow.h>
#include <linux/pagemap.h>
#include <linux/shmem_fs.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>

#include "fdbox_internal.h"

#define FDBOX_KHO_NODE			"fdbox"
#define FDBOX_KHO_VERSION		1
#define FDBOX_KHO_ROOT_MAGIC		0x544f4f5258424446ULL	/* "FDBXROOT" */
#define FDBOX_KHO_BOX_MAGIC		0x584f425f58424446ULL	/* "FDBX_BOX" */
#define FDBOX_KHO_CONSUMED_MAGIC	0x4445535558424446ULL	/* "FDBXUSED" */

/* The seals this version knows how to carry. */
#define FDBOX_KHO_SEALS	(F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | \
			 F_SEAL_WRITE | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC)

/**
 * struct fdbox_kho_entry - one entry in a box descriptor (handover ABI v1).
 * @name:       entry name, NUL-terminated.
 * @type:       &enum fdbox_entry_type.
 * @seals:      F_SEAL_* the memfd had before sealing.
 * @size:       file size.
 * @page_size:  PAGE_SIZE or the huge page size.
 * @uid:        owner, opaque.
 * @gid:        owner group, opaque.
 * @ctime:      when put.
 * @nr_folios:  elements in @folios.
 * @folios_crc: CRC32 of the folio array.
 * @reserved:   zero.
 * @folios:     KHO vmalloc preservation of struct fdbox_preserved_folio[].
 */
struct fdbox_kho_entry {
	char name[FDBOX_ENTRY_NAME_LEN];
	u32 type;
	u32 seals;
	u64 size;
	u64 page_size;
	u32 uid;
	u32 gid;
	s64 ctime;
	u64 nr_folios;
	u32 folios_crc;
	u32 reserved;
	struct kho_vmalloc folios;
} __packed;

/**
 * struct fdbox_kho_box - descriptor of one sealed box (handover ABI v1).
 * @magic:      %FDBOX_KHO_BOX_MAGIC.
 * @version:    %FDBOX_KHO_VERSION.
 * @nr_entries: elements in @entries.
 * @size:       bytes of this descriptor that @crc covers.
 * @crc:        CRC32 of the descriptor with @crc zero.
 * @reserved:   zero.
 * @name:       box name.
 * @entries:    the entries.
 */
struct fdbox_kho_box {
	u64 magic;
	u32 version;
	u32 nr_entries;
	u64 size;
	u32 crc;
	u32 reserved;
	char name[FDBOX_BOX_NAME_LEN];
	struct fdbox_kho_entry entries[];
} __packed;

/**
 * struct fdbox_kho_root - the "fdbox" KHO subtree (handover ABI v1).
 * @magic:    %FDBOX_KHO_ROOT_MAGIC (%FDBOX_KHO_CONSUMED_MAGIC once taken).
 * @version:  %FDBOX_KHO_VERSION.
 * @nr_boxes: elements in @boxes.
 * @size:     bytes that @crc covers.
 * @crc:      CRC32 of the root with @crc zero.
 * @reserved: zero.
 * @boxes:    physical addresses of struct fdbox_kho_box descriptors.
 */
struct fdbox_kho_root {
	u64 magic;
	u32 version;
	u32 nr_boxes;
	u64 size;
	u32 crc;
	u32 reserved;
	u64 boxes[];
} __packed;

/*
 * Testing only: damage the handover on purpose so the next kernel's refusal
 * path can be tested. 1 flips a byte of each box descriptor after its CRC
 * was computed, 2 writes a wrong version into the root. Settable only when
 * the module is loaded.
 */
static int test_corrupt_handover;
module_param(test_corrupt_handover, int, 0);
MODULE_PARM_DESC(test_corrupt_handover,
		 "testing only: 1 corrupts box descriptors, 2 the root descriptor");

static DEFINE_MUTEX(fdbox_kho_lock);
static LIST_HEAD(fdbox_sealed);		/* boxes in the root, in seal order */
static struct fdbox_kho_root *fdbox_kho_root;
static bool fdbox_kho_restored;

static u32 fdbox_crc(const void *buf, size_t len)
{
	return crc32_le(~0U, buf, len) ^ ~0U;
}

u32 fdbox_kho_features(void)
{
	u32 features = FDBOX_FEATURE_KHO;

	if (kho_is_enabled())
		features |= FDBOX_FEATURE_KHO_ON;
	if (is_kho_boot())
		features |= FDBOX_FEATURE_KHO_BOOT;
	if (READ_ONCE(fdbox_kho_restored))
		features |= FDBOX_FEATURE_RESTORED;
	return features;
}

static void fdbox_set_seals(struct file *file, u32 seals)
{
	struct inode *inode = file_inode(file);

#ifdef CONFIG_HUGETLBFS
	if (is_file_hugepages(file)) {
		WRITE_ONCE(HUGETLBFS_I(inode)->seals, seals);
		return;
	}
#endif
	WRITE_ONCE(SHMEM_I(inode)->seals, seals);
}

/* Seal */

static void fdbox_kho_release_folios(struct fdbox_entry_kho *kho, u64 nr)
{
	for (u64 i = 0; i < nr; i++)
		kho_unpreserve_folio(kho->folios[i]);
	unpin_folios(kho->folios, kho->nr_folios);
	atomic64_sub(kho->nr_folios, &fdbox_counters.pinned_folios);
	vfree(kho->ser);
	kvfree(kho->folios);
}

static int fdbox_kho_seal_entry(struct fdbox_entry *entry)
{
	struct file *file = entry->file;
	struct inode *inode = file_inode(file);
	struct fdbox_entry_kho *kho;
	u64 size, max_folios, i = 0;
	long nr;
	pgoff_t offset;
	u32 seals;
	int err;

	kho = kzalloc(sizeof(*kho), GFP_KERNEL);
	if (!kho)
		return -ENOMEM;

	inode_lock(inode);
	seals = fdbox_file_seals(file);
	err = -EOPNOTSUPP;
	if (seals & ~FDBOX_KHO_SEALS)
		goto err_unlock;
	size = i_size_read(inode);
	max_folios = DIV_ROUND_UP_ULL(size, entry->page_size);
	err = -EFBIG;
	if (DIV_ROUND_UP_ULL(size, PAGE_SIZE) > UINT_MAX)
		goto err_unlock;

	if (max_folios) {
		err = -ENOMEM;
		kho->folios = kvmalloc_array(max_folios, sizeof(*kho->folios),
					     GFP_KERNEL);
		if (!kho->folios)
			goto err_unlock;
		nr = memfd_pin_folios(file, 0, size - 1, kho->folios,
				      max_folios, &offset);
		if (nr < 0) {
			err = nr;
			pr_err("%s: pinning folios failed: %pe\n", entry->name,
			       ERR_PTR(err));
			kvfree(kho->folios);
			goto err_unlock;
		}
		kho->nr_folios = nr;
		atomic64_add(nr, &fdbox_counters.pinned_folios);

		kho->ser = vcalloc(nr, sizeof(*kho->ser));
		err = -ENOMEM;
		if (!kho->ser)
			goto err_release;
		for (i = 0; i < kho->nr_folios; i++) {
			struct folio *folio = kho->folios[i];

			err = kho_preserve_folio(folio);
			if (err)
				goto err_release;
			folio_lock(folio);
			folio_mark_dirty(folio);
			if (!folio_test_uptodate(folio)) {
				folio_zero_range(folio, 0, folio_size(folio));
				flush_dcache_folio(folio);
				folio_mark_uptodate(folio);
			}
			folio_unlock(folio);
			kho->ser[i].pfn = folio_pfn(folio);
			kho->ser[i].index = folio->index;
			kho->ser[i].order = folio_order(folio);
		}
		err = kho_preserve_vmalloc(kho->ser, &kho->ser_kho);
		if (err)
			goto err_release;
	}

	/* keep the mapping's size fixed while sealed */
	kho->added_seals = (F_SEAL_GROW | F_SEAL_SHRINK) & ~seals;
	fdbox_set_seals(file, seals | kho->added_seals);
	inode_unlock(inode);

	entry->size = size;
	entry->seals = seals;
	entry->kho = kho;
	return 0;

err_release:
	fdbox_kho_release_folios(kho, i);
err_unlock:
	inode_unlock(inode);
	kfree(kho);
	return err;
}

static void fdbox_kho_unseal_entry(struct fdbox_entry *entry)
{
	struct fdbox_entry_kho *kho = entry->kho;
	struct inode *inode = file_inode(entry->file);

	inode_lock(inode);
	fdbox_set_seals(entry->file,
			fdbox_file_seals(entry->file) & ~kho->added_seals);
	inode_unlock(inode);
	if (kho->nr_folios) {
		kho_unpreserve_vmalloc(&kho->ser_kho);
		fdbox_kho_release_folios(kho, kho->nr_folios);
	}
	kfree(kho);
	entry->kho = NULL;
}

static struct fdbox_kho_box *fdbox_kho_box_desc(struct fdbox_box *box,
						 size_t *sizep)
{
	struct fdbox_kho_box *desc;
	struct fdbox_entry *entry;
	size_t size = struct_size(desc, entries, box->nr_entries);
	u32 i = 0;

	desc = kho_alloc_preserve(size);
	if (IS_ERR(desc))
		return desc;
	desc->magic = FDBOX_KHO_BOX_MAGIC;
	desc->version = FDBOX_KHO_VERSION;
	desc->nr_entries = box->nr_entries;
	desc->size = size;
	strscpy(desc->name, box->name);
	list_for_each_entry(entry, &box->entries, node) {
		struct fdbox_kho_entry *e = &desc->entries[i++];
		struct fdbox_entry_kho *kho = entry->kho;

		strscpy(e->name, entry->name);
		e->type = entry->type;
		e->seals = entry->seals;
		e->size = entry->size;
		e->page_size = entry->page_size;
		e->uid = entry->uid;
		e->gid = entry->gid;
		e->ctime = entry->ctime;
		e->nr_folios = kho->nr_folios;
		if (kho->nr_folios) {
			e->folios = kho->ser_kho;
			e->folios_crc = fdbox_crc(kho->ser, kho->nr_folios *
						  sizeof(*kho->ser));
		}
	}
	desc->crc = fdbox_crc(desc, size);
	if (test_corrupt_handover == 1)
		desc->name[0] ^= 0x20;
	*sizep = size;
	return desc;
}

/*
 * Rebuild the root from fdbox_sealed and swap it in as the "fdbox" subtree.
 * On failure the old root stays in place.
 */
static int fdbox_kho_publish_root(void)
{
	struct fdbox_kho_root *root = NULL, *old = fdbox_kho_root;
	struct fdbox_box *box;
	u32 n = 0;
	size_t size;
	int err;

	lockdep_assert_held(&fdbox_kho_lock);
	list_for_each_entry(box, &fdbox_sealed, sealed_node)
		n++;
	size = struct_size(root, boxes, n);
	if (n) {
		root = kho_alloc_preserve(size);
		if (IS_ERR(root))
			return PTR_ERR(root);
		root->magic = FDBOX_KHO_ROOT_MAGIC;
		root->version = FDBOX_KHO_VERSION;
		root->nr_boxes = n;
		root->size = size;
		n = 0;
		list_for_each_entry(box, &fdbox_sealed, sealed_node)
			root->boxes[n++] = virt_to_phys(box->kho_desc);
		root->crc = fdbox_crc(root, size);
		if (test_corrupt_handover == 2)
			root->version = FDBOX_KHO_VERSION + 1;
	}
	if (old)
		kho_remove_subtree(old);
	if (root) {
		err = kho_add_subtree(FDBOX_KHO_NODE, root, size);
		if (err) {
			pr_err("adding KHO subtree failed: %pe\n", ERR_PTR(err));
			kho_unpreserve_free(root);
			if (old)
				WARN_ON(kho_add_subtree(FDBOX_KHO_NODE, old,
							old->size));
			return err;
		}
	}
	if (old)
		kho_unpreserve_free(old);
	fdbox_kho_root = root;
	return 0;
}

/**
 * fdbox_kho_seal - preserve every entry of @box and publish it.
 * @box: an open box, its mutex held.
 *
 * Return: 0, or an error with nothing changed.
 */
int fdbox_kho_seal(struct fdbox_box *box)
{
	struct fdbox_entry *entry;
	int err = 0;

	lockdep_assert_held(&box->mutex);
	if (!kho_is_enabled())
		return -ENODEV;

	list_for_each_entry(entry, &box->entries, node) {
		err = fdbox_kho_seal_entry(entry);
		if (err)
			goto err_unseal;
	}
	box->kho_desc = fdbox_kho_box_desc(box, &box->kho_size);
	if (IS_ERR(box->kho_desc)) {
		err = PTR_ERR(box->kho_desc);
		box->kho_desc = NULL;
		goto err_unseal;
	}
	scoped_guard(mutex, &fdbox_kho_lock) {
		list_add_tail(&box->sealed_node, &fdbox_sealed);
		err = fdbox_kho_publish_root();
		if (err)
			list_del_init(&box->sealed_node);
	}
	if (err) {
		kho_unpreserve_free(box->kho_desc);
		box->kho_desc = NULL;
		goto err_unseal;
	}
	return 0;

err_unseal:
	list_for_each_entry_continue_reverse(entry, &box->entries, node)
		fdbox_kho_unseal_entry(entry);
	return err;
}

/**
 * fdbox_kho_unseal - undo fdbox_kho_seal().
 * @box: a sealed box, its mutex held.
 *
 * Return: 0, or -ENOMEM if the root descriptor could not be rebuilt (the
 * box stays sealed).
 */
int fdbox_kho_unseal(struct fdbox_box *box)
{
	struct fdbox_entry *entry;
	int err;

	lockdep_assert_held(&box->mutex);
	scoped_guard(mutex, &fdbox_kho_lock) {
		list_del_init(&box->sealed_node);
		err = fdbox_kho_publish_root();
		if (err) {
			list_add_tail(&box->sealed_node, &fdbox_sealed);
			return err;
		}
	}
	kho_unpreserve_free(box->kho_desc);
	box->kho_desc = NULL;
	list_for_each_entry(entry, &box->entries, node)
		fdbox_kho_unseal_entry(entry);
	return 0;
}

/* Restore */

static void fdbox_kho_put_folios(struct fdbox_entry_kho *kho)
{
	for (u64 i = 0; i < kho->nr_folios; i++)
		if (kho->folios[i])
			folio_put(kho->folios[i]);
	kvfree(kho->folios);
	vfree(kho->ser);
}

/**
 * fdbox_kho_discard_entry - free a restore-pending entry's memory.
 * @entry: the entry, its box's mutex held.
 */
void fdbox_kho_discard_entry(struct fdbox_entry *entry)
{
	fdbox_kho_put_folios(entry->kho);
	kfree(entry->kho);
	entry->kho = NULL;
	atomic64_dec(&fdbox_counters.restored_pending);
}

/* Copy the source folios that overlap target folio @dst. */
static void fdbox_copy_into(struct fdbox_entry_kho *kho, u64 *cursor,
			    struct folio *dst)
{
	pgoff_t first = dst->index, end = dst->index + folio_nr_pages(dst);

	for (pgoff_t pg = first; pg < end; pg++) {
		struct fdbox_preserved_folio *s;

		/* sources are sorted by index and do not overlap */
		while (*cursor < kho->nr_folios &&
		       kho->ser[*cursor].index + (1UL << kho->ser[*cursor].order) <= pg)
			(*cursor)++;
		if (*cursor == kho->nr_folios)
			return;
		s = &kho->ser[*cursor];
		if (pg < s->index)
			continue;	/* a hole: the fresh target is zero */
		copy_highpage(folio_page(dst, pg - first),
			      folio_page(kho->folios[*cursor], pg - s->index));
	}
}

#define FDBOX_RESTORE_BATCH 256

/**
 * fdbox_kho_restore_entry - fill @target from a restored entry's memory.
 * @entry:  a restore-pending entry, its box's mutex held.
 * @target: the caller's memfd; on success its reference becomes the entry's.
 *
 * Return: 0; -EMEDIUMTYPE if @target does not match; -EEXIST if @target is
 * already an entry; or an error from pinning @target's folios. On error the
 * entry is unchanged and RESTORE_FD can be retried.
 */
int fdbox_kho_restore_entry(struct fdbox_entry *entry, struct file *target)
{
	struct fdbox_entry_kho *kho = entry->kho;
	struct inode *inode = file_inode(target);
	struct folio **dst;
	u64 page_size, cursor = 0;
	loff_t pos, size = entry->size;
	pgoff_t offset;
	u32 type;
	int err;

	if (fdbox_classify(target, &type, &page_size) || type != entry->type ||
	    page_size != entry->page_size || i_size_read(inode) != size ||
	    inode->i_blocks)
		return -EMEDIUMTYPE;

	dst = kvmalloc_array(FDBOX_RESTORE_BATCH, sizeof(*dst), GFP_KERNEL);
	if (!dst)
		return -ENOMEM;
	for (pos = 0; pos < size; ) {
		loff_t end = min_t(loff_t, size,
				   pos + (loff_t)FDBOX_RESTORE_BATCH * page_size);
		long nr = memfd_pin_folios(target, pos, end - 1, dst,
					   FDBOX_RESTORE_BATCH, &offset);

		if (nr <= 0) {
			err = nr ?: -EIO;
			goto out;
		}
		for (long i = 0; i < nr; i++) {
			fdbox_copy_into(kho, &cursor, dst[i]);
			folio_lock(dst[i]);
			folio_mark_dirty(dst[i]);
			folio_unlock(dst[i]);
		}
		pos = (loff_t)(dst[nr - 1]->index + folio_nr_pages(dst[nr - 1]))
			<< PAGE_SHIFT;
		unpin_folios(dst, nr);
		cond_resched();
	}
	err = fdbox_entry_set_file(entry, target);
	if (err)
		goto out;
	fdbox_kho_discard_entry(entry);
out:
	kvfree(dst);
	return err;
}

/*
 * Claim a preserved folio list and every folio in it. On failure everything
 * claimed so far is freed and the rest is left alone.
 */
static int fdbox_kho_claim_folios(const struct fdbox_kho_entry *e,
				  struct fdbox_entry_kho *kho)
{
	u64 max_pages = DIV_ROUND_UP_ULL(e->size, PAGE_SIZE);
	u64 i;

	kho->nr_folios = e->nr_folios;
	if (!e->nr_folios)
		return 0;
	if (e->nr_folios > max_pages ||
	    (u64)e->folios.total_pages << PAGE_SHIFT <
	    e->nr_folios * sizeof(*kho->ser))
		return -EINVAL;
	kho->ser = kho_restore_vmalloc(&e->folios);
	if (!kho->ser)
		return -EIO;
	if (fdbox_crc(kho->ser, e->nr_folios * sizeof(*kho->ser)) !=
	    e->folios_crc)
		goto err_inval;

	/* sorted, non-overlapping, inside the file, of the file's page size */
	for (i = 0; i < e->nr_folios; i++) {
		const struct fdbox_preserved_folio *s = &kho->ser[i];

		if (s->order > MAX_PAGE_ORDER * 2 || s->flags ||
		    (PAGE_SIZE << s->order) < e->page_size ||
		    s->index + (1ULL << s->order) > max_pages +
		    (e->page_size >> PAGE_SHIFT) ||
		    (i && s->index < kho->ser[i - 1].index +
		     (1ULL << kho->ser[i - 1].order)))
			goto err_inval;
	}

	kho->folios = kvcalloc(e->nr_folios, sizeof(*kho->folios), GFP_KERNEL);
	if (!kho->folios) {
		vfree(kho->ser);
		return -ENOMEM;
	}
	for (i = 0; i < e->nr_folios; i++) {
		struct folio *folio = kho_restore_folio(PFN_PHYS(kho->ser[i].pfn));

		if (!folio || folio_order(folio) != kho->ser[i].order) {
			pr_err("%s: folio %llu at pfn %#llx missing or wrong order\n",
			       e->name, i, kho->ser[i].pfn);
			if (folio)
				folio_put(folio);
			kho->nr_folios = i;
			fdbox_kho_put_folios(kho);
			return -EIO;
		}
		kho->folios[i] = folio;
	}
	return 0;

err_inval:
	vfree(kho->ser);
	return -EINVAL;
}

static bool fdbox_kho_entry_valid(const struct fdbox_kho_entry *e)
{
	if (!fdbox_valid_entry_name(e->name, sizeof(e->name)) || e->reserved)
		return false;
	if (e->seals & ~FDBOX_KHO_SEALS)
		return false;
	switch (e->type) {
	case FDBOX_TYPE_MEMFD:
		return e->page_size == PAGE_SIZE;
	case FDBOX_TYPE_MEMFD_HUGETLB:
		return is_power_of_2(e->page_size) && e->page_size > PAGE_SIZE &&
			IS_ALIGNED(e->size, e->page_size);
	default:
		return false;
	}
}

/* Free a restored box that was never published, with its claimed folios. */
static void fdbox_kho_free_unpublished(struct fdbox_box *box)
{
	struct fdbox_entry *entry, *tmp;

	list_for_each_entry_safe(entry, tmp, &box->entries, node) {
		list_del(&entry->node);
		fdbox_kho_put_folios(entry->kho);
		kfree(entry->kho);
		fdbox_entry_free(entry);
	}
	box->nr_entries = 0;
	fdbox_box_free(box);
}

/* Restore one box descriptor into a new (unpublished) box. */
static struct fdbox_box *fdbox_kho_restore_box(phys_addr_t phys)
{
	struct fdbox_kho_box *desc;
	struct fdbox_box *box;
	struct folio *folio;
	u32 crc, i;
	int err = -EINVAL;

	folio = kho_restore_folio(phys);
	if (!folio)
		return ERR_PTR(-EIO);
	desc = folio_address(folio) + offset_in_folio(folio, phys);
	if (offset_in_folio(folio, phys) || desc->magic != FDBOX_KHO_BOX_MAGIC ||
	    desc->version != FDBOX_KHO_VERSION || desc->reserved ||
	    desc->nr_entries > FDBOX_MAX_ENTRIES_PER_BOX ||
	    desc->size != struct_size(desc, entries, desc->nr_entries) ||
	    desc->size > folio_size(folio))
		goto out_put;
	crc = desc->crc;
	desc->crc = 0;
	if (fdbox_crc(desc, desc->size) != crc ||
	    !fdbox_valid_box_name(desc->name, sizeof(desc->name)))
		goto out_put;
	for (i = 0; i < desc->nr_entries; i++) {
		if (!fdbox_kho_entry_valid(&desc->entries[i]))
			goto out_put;
		for (u32 j = 0; j < i; j++)
			if (!strcmp(desc->entries[i].name, desc->entries[j].name))
				goto out_put;
	}

	err = -ENOMEM;
	box = fdbox_box_alloc(desc->name);
	if (!box)
		goto out_put;
	box->state = FDBOX_STATE_RESTORED;
	for (i = 0; i < desc->nr_entries; i++) {
		const struct fdbox_kho_entry *e = &desc->entries[i];
		struct fdbox_entry *entry = fdbox_entry_alloc();

		if (!entry)
			goto out_free_box;
		entry->kho = kzalloc(sizeof(*entry->kho), GFP_KERNEL);
		if (!entry->kho) {
			fdbox_entry_free(entry);
			goto out_free_box;
		}
		err = fdbox_kho_claim_folios(e, entry->kho);
		if (err) {
			kfree(entry->kho);
			fdbox_entry_free(entry);
			goto out_free_box;
		}
		strscpy(entry->name, e->name);
		entry->type = e->type;
		entry->seals = e->seals;
		entry->size = e->size;
		entry->page_size = e->page_size;
		entry->uid = e->uid;
		entry->gid = e->gid;
		entry->ctime = e->ctime;
		list_add_tail(&entry->node, &box->entries);
		box->nr_entries++;
		box->nr_pending++;
	}
	folio_put(folio);
	return box;

out_free_box:
	fdbox_kho_free_unpublished(box);
out_put:
	folio_put(folio);
	return ERR_PTR(err);
}

/**
 * fdbox_kho_init - take the boxes the previous kernel handed over.
 *
 * Return: 0 (also when there was nothing to take), or why the handover was
 * refused.
 */
int fdbox_kho_init(void)
{
	struct fdbox_box **boxes = NULL;
	struct fdbox_kho_root *root;
	struct folio *folio;
	phys_addr_t phys;
	size_t size;
	u32 crc, i, n = 0;
	int err;

	if (!is_kho_boot())
		return 0;
	err = kho_retrieve_subtree(FDBOX_KHO_NODE, &phys, &size);
	if (err == -ENOENT)
		return 0;
	if (err)
		return err;

	/*
	 * An earlier load in this boot took the handover and kept the root's
	 * page, marked consumed: it is ours, reading it is safe.
	 */
	root = phys_to_virt(phys);
	if (READ_ONCE(root->magic) == FDBOX_KHO_CONSUMED_MAGIC)
		return 0;

	folio = kho_restore_folio(phys);
	if (!folio)
		return -EIO;
	err = -EINVAL;
	if (offset_in_folio(folio, phys) || size < sizeof(*root) ||
	    size > folio_size(folio))
		goto out_consumed;
	if (root->magic != FDBOX_KHO_ROOT_MAGIC ||
	    root->version != FDBOX_KHO_VERSION || root->reserved ||
	    root->nr_boxes > FDBOX_MAX_BOXES ||
	    root->size != struct_size(root, boxes, root->nr_boxes) ||
	    root->size > size)
		goto out_consumed;
	crc = root->crc;
	root->crc = 0;
	if (fdbox_crc(root, root->size) != crc)
		goto out_consumed;

	err = -ENOMEM;
	boxes = kcalloc(root->nr_boxes ?: 1, sizeof(*boxes), GFP_KERNEL);
	if (!boxes)
		goto out_consumed;
	for (n = 0; n < root->nr_boxes; n++) {
		boxes[n] = fdbox_kho_restore_box(root->boxes[n]);
		if (IS_ERR(boxes[n])) {
			err = PTR_ERR(boxes[n]);
			goto out_free;
		}
		for (i = 0; i < n; i++) {
			if (!strcmp(boxes[i]->name, boxes[n]->name)) {
				err = -EINVAL;
				n++;
				goto out_free;
			}
		}
	}

	/* all valid: publish */
	for (i = 0; i < n; i++) {
		err = fdbox_box_publish_restored(boxes[i]);
		if (err) {
			pr_err("box %s: %pe\n", boxes[i]->name, ERR_PTR(err));
			fdbox_kho_free_unpublished(boxes[i]);
		}
	}
	n = 0;
	WRITE_ONCE(fdbox_kho_restored, true);
	pr_info("restored %u box(es) from the previous kernel\n",
		root->nr_boxes);
	err = 0;

out_free:
	while (n--)
		if (!IS_ERR(boxes[n]))
			fdbox_kho_free_unpublished(boxes[n]);
	kfree(boxes);
out_consumed:
	/* the root page stays allocated for the life of this kernel */
	root->magic = FDBOX_KHO_CONSUMED_MAGIC;
	return err;
}
