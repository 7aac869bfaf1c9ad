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
 * Where LUO's memfd handler is built in (CONFIG_LIVEUPDATE_MEMFD), a box
 * with a shmem memfd is refused (EOPNOTSUPP, one log line naming LUO): LUO
 * carries those in place, and the two must never preserve one file both
 * (see fdbox_shmem_is_luos()). The module's job there is hugetlb.
 *
 * Sealing a box, for each entry (all or nothing), under the file's inode
 * lock:
 *
 * 1. Fix the mapping, so what is preserved stays what the file holds: a
 *    shmem memfd is frozen with shmem_freeze() (as mm/memfd_luo.c does: no
 *    size change, no fallocate, no hole punch, no MADV_REMOVE); a hugetlb
 *    memfd, which has no freeze, gets F_SEAL_GROW, F_SEAL_SHRINK and
 *    F_SEAL_FUTURE_WRITE (hugetlbfs refuses hole punches on a write-sealed
 *    file; existing writable mappings keep working). Either kind also gets
 *    F_SEAL_SEAL, so nobody can add a seal while the box is sealed; that
 *    makes UNSEAL exact: it takes off precisely the seals SEAL added. A file
 *    that already has F_SEAL_SEAL but lacks a seal fdbox needs is refused
 *    (EOPNOTSUPP): the seal rules forbid adding it. A shmem mapping that is
 *    already frozen belongs to LUO (EEXIST): it is never preserved twice.
 * 2. Pin every folio with memfd_pin_folios(): this allocates holes and
 *    migrates folios out of CMA, hence out of KHO scratch memory.
 * 3. kho_preserve_folio() each folio (see fdbox_kho_preserve_folios()).
 * 4. Record (pfn, index, order) of each folio in a vmalloc array preserved
 *    with kho_preserve_vmalloc().
 *
 * Then a box descriptor (struct fdbox_kho_box, from kho_alloc_preserve())
 * lists the entries, and the root descriptor (struct fdbox_kho_root) lists
 * the physical addresses of all sealed boxes' descriptors. The layout is in
 * fdbox_kho_abi.h.
 *
 * Publishing, and kexec
 * =====================
 *
 * The root is allocated at its largest size (FDBOX_MAX_BOXES) and added as
 * the KHO subtree "fdbox" when the first SEAL starts; while any box is
 * sealed or any SEAL is in flight (fdbox_kho_sealing, counted under
 * fdbox_kho_lock from taking the root to publishing or giving up) it is only
 * rewritten in place, and it is removed again once neither is left (nothing
 * to lose then; the module can be unloaded). A failed SEAL or the last
 * UNSEAL therefore never frees the root another SEAL is about to publish
 * into. In 7.2 KHO has no finalize step: what the root says
 * when kexec runs is what crosses. So a whole SEAL or UNSEAL (preserve,
 * rewrite the root, unpreserve) runs with fdbox_kho_rwsem held for read, and
 * a reboot notifier (kernel_kexec() calls the reboot notifiers before the
 * jump) takes it for write: it waits for every SEAL/UNSEAL in flight and
 * then marks the published state final. Later SEAL/UNSEAL calls fail with
 * ESHUTDOWN. A kexec therefore sees either all of a box or none of it, and
 * never preserved memory the root does not list.
 *
 * Restore
 * =======
 *
 * At module load after a KHO kexec (before /dev/fdbox opens), the "fdbox"
 * subtree is looked up. No handover memory is read or claimed before it was
 * checked: every address must be page aligned, RAM, and carry KHO's mark of
 * a preserved folio of the expected order (fdbox_kho_preserved()), so a
 * corrupt address is refused instead of tripping KHO's own WARN or an oops.
 * Then magic, version, CRC, counts against limits, names, types, folio
 * orders, pfn alignment and indexes are checked, box by box. A box that fails
 * is refused and reported (restore_status in FDBOX_IOC_VERSION, a line in
 * dmesg naming it); the others are restored. Memory a refused box names is
 * left alone, never freed: it may belong to someone else.
 *
 * Restored boxes appear in state restored. RESTORE_FD copies an entry's
 * folios into a memfd the caller created, applies the preserved seals, and
 * frees the folios; FINISH frees those of entries nobody claimed.
 *
 * The root descriptor's page is kept for the life of the kernel and its magic
 * overwritten with FDBOX_KHO_CONSUMED_MAGIC, so a second load of the module
 * in the same boot sees the handover was already taken.
 *
 * Locking: callers hold the box's mutex. fdbox_kho_rwsem (read: SEAL,
 * UNSEAL; write: the reboot notifier) makes them atomic with respect to
 * kexec; fdbox_kho_lock, inside it, protects the root, the list of sealed
 * boxes and the count of SEALs in flight.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cleanup.h>
#include <linux/crc32.h>
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/fcntl.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/hugetlb.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/kexec_handover.h>
#include <linux/memory_hotplug.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/overflow.h>
#include <linux/pagemap.h>
#include <linux/reboot.h>
#include <linux/rwsem.h>
#include <linux/shmem_fs.h>
#include <linux/slab.h>
#include <linux/sort.h>
#include <linux/vmalloc.h>

#include "fdbox_internal.h"
#include "fdbox_kho_abi.h"

/* The seals this version knows how to carry. */
#define FDBOX_KHO_SEALS	(F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | \
			 F_SEAL_WRITE | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC)
#define FDBOX_KHO_WRITE_SEALS	(F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)

/**
 * struct fdbox_entry_kho - KHO state of one entry.
 * @folios:      sealed: the folios pinned with memfd_pin_folios();
 *               restored: the folios claimed from the previous kernel.
 * @ser:         sealed: the folio list handed over (KHO-preserved vmalloc);
 *               restored: the folio list from the previous kernel.
 * @nr_folios:   number of elements in @folios / @ser.
 * @ser_kho:     sealed: KHO's record of the @ser preservation.
 * @added_seals: sealed: the F_SEAL_* bits SEAL added; UNSEAL removes them.
 * @frozen:      sealed: SEAL froze the shmem mapping; UNSEAL thaws it.
 */
struct fdbox_entry_kho {
	struct folio **folios;
	struct fdbox_preserved_folio *ser;
	u64 nr_folios;
	struct kho_vmalloc ser_kho;
	u32 added_seals;
	bool frozen;
};

#ifdef FDBOX_TEST
/*
 * Testing only (make FDBOX_TEST=1): damage the handover on purpose so the
 * next kernel's refusal paths can be tested, and widen the seal window so
 * the reboot notifier can be seen waiting. Not in production builds.
 */
static int test_corrupt_handover;
module_param(test_corrupt_handover, int, 0);
MODULE_PARM_DESC(test_corrupt_handover,
		 "testing only, bits: 1 every box descriptor, 2 root version, 4 the descriptor of boxes named bad-desc*, 8 a folio pfn of bad-pfn*, 16 the root's pointer to bad-ptr*, 32 a CRC-valid huge nr_folios in bad-nr*, 64 a CRC-valid pfn listed twice in bad-dup*, 128 a CRC-valid index near 2^64 in bad-idx*");
static bool test_shmem_beside_luo;
module_param(test_shmem_beside_luo, bool, 0);
MODULE_PARM_DESC(test_shmem_beside_luo,
		 "testing only: SEAL shmem memfds although LUO's memfd handler is built in (the path of KHO kernels without it)");
static unsigned int test_seal_delay_ms;
module_param(test_seal_delay_ms, uint, 0);
MODULE_PARM_DESC(test_seal_delay_ms,
		 "testing only: sleep this long in SEAL of boxes named slow*, between preserving and publishing");
#define fdbox_test_corrupt(bit)	(test_corrupt_handover & (bit))

/*
 * Damage that keeps every CRC valid (applied before the CRCs are taken), for
 * the checks behind the CRC: a pfn listed twice, an index whose end wraps.
 * The list must have two folios.
 */
static void fdbox_test_damage_list(struct fdbox_box *box,
				   struct fdbox_entry_kho *kho)
{
	if (kho->nr_folios < 2)
		return;
	if (fdbox_test_corrupt(64) && !strncmp(box->name, "bad-dup", 7))
		kho->ser[1].pfn = kho->ser[0].pfn;
	if (fdbox_test_corrupt(128) && !strncmp(box->name, "bad-idx", 7))
		kho->ser[1].index = -(1ULL << kho->ser[1].order);
}

/*
 * A CRC-valid count whose list size, truncated to 32 bits, is one page: the
 * list CRC used to read 2^44 bytes past the one-page list.
 */
static void fdbox_test_damage_count(struct fdbox_box *box,
				    struct fdbox_kho_entry *e)
{
	if (fdbox_test_corrupt(32) && !strncmp(box->name, "bad-nr", 6)) {
		e->nr_folios = 733007751851ULL;	/* * 24 = 2^44 + 8 bytes */
		e->size = e->nr_folios * e->page_size;
	}
}
#else
#define fdbox_test_corrupt(bit)	false
static inline void fdbox_test_damage_list(struct fdbox_box *box,
					  struct fdbox_entry_kho *kho) { }
static inline void fdbox_test_damage_count(struct fdbox_box *box,
					   struct fdbox_kho_entry *e) { }
#endif

static DECLARE_RWSEM(fdbox_kho_rwsem);
static bool fdbox_kho_final;		/* reboot started: published state is final */
static DEFINE_MUTEX(fdbox_kho_lock);
static LIST_HEAD(fdbox_sealed);		/* boxes in the root, in seal order */
static struct fdbox_kho_root *fdbox_kho_root;
static unsigned int fdbox_kho_sealing;	/* SEALs between root_get and publish */
static bool fdbox_kho_restored;

static u32 fdbox_crc(const void *buf, size_t len)
{
	return crc32_le(~0U, buf, len) ^ ~0U;
}

/*
 * Where LUO's memfd handler is built in, shmem memfds are LUO's to carry: it
 * preserves them in place (no copy), in tree, and it cannot tell a file fdbox
 * preserved (memfd_luo_preserve() does not check the frozen mapping, KHO's
 * preservation is idempotent, and either side's unpreserve would thaw the
 * other's file). The module then carries only what LUO cannot: hugetlb.
 * liveupdate_enabled() is not exported, so a liveupdate=off boot of such a
 * kernel counts the same; kernels without the handler keep shmem SEAL.
 */
static bool fdbox_shmem_is_luos(void)
{
#ifdef FDBOX_TEST
	if (test_shmem_beside_luo)
		return false;
#endif
	return IS_ENABLED(CONFIG_LIVEUPDATE_MEMFD);
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
	if (fdbox_shmem_is_luos())
		features |= FDBOX_FEATURE_SHMEM_LUO;
	return features;
}

static u32 *fdbox_seals_ptr(struct file *file)
{
#ifdef CONFIG_HUGETLBFS
	if (is_file_hugepages(file))
		return &HUGETLBFS_I(file_inode(file))->seals;
#endif
	return &SHMEM_I(file_inode(file))->seals;
}

/* Seal */

/* Unpreserve the first @nr_preserved folios, unpin all, free the arrays. */
static void fdbox_kho_release_folios(struct fdbox_entry_kho *kho,
				     u64 nr_preserved)
{
	for (u64 i = 0; i < nr_preserved; i++) {
		kho_unpreserve_folio(kho->folios[i]);
		if (!(i % 1024))
			cond_resched();
	}
	/* unpin_folios() takes a batch; 1024 at a time keeps latency bounded */
	for (u64 i = 0; i < kho->nr_folios; i += 1024) {
		unpin_folios(kho->folios + i,
			     min_t(u64, 1024, kho->nr_folios - i));
		cond_resched();
	}
	atomic64_sub(kho->nr_folios, &fdbox_counters.pinned_folios);
	vfree(kho->ser);
	kho->ser = NULL;
	kvfree(kho->folios);
	kho->folios = NULL;
}

/*
 * Pin and preserve every folio of the first @size bytes of @file, and the
 * list of them. Unwinds only what it did.
 */
static int fdbox_kho_preserve_folios(struct fdbox_entry *entry,
				     struct fdbox_entry_kho *kho, u64 size)
{
	u64 max_folios = DIV_ROUND_UP_ULL(size, entry->page_size), i;
	pgoff_t offset;
	long nr;
	int err;

	if (!max_folios)
		return 0;
	/* __GFP_NOWARN: a huge sparse file gets ENOMEM, not kvmalloc's WARN */
	kho->folios = kvmalloc_array(max_folios, sizeof(*kho->folios),
				     GFP_KERNEL | __GFP_NOWARN);
	if (!kho->folios)
		return -ENOMEM;
	nr = memfd_pin_folios(entry->file, 0, size - 1, kho->folios,
			      max_folios, &offset);
	if (nr < 0) {
		pr_err_ratelimited("%s: pinning folios failed: %pe\n",
				   entry->name, ERR_PTR(nr));
		kvfree(kho->folios);
		kho->folios = NULL;
		return nr;
	}
	kho->nr_folios = nr;
	atomic64_add(nr, &fdbox_counters.pinned_folios);

	kho->ser = vcalloc(nr, sizeof(*kho->ser));
	if (!kho->ser) {
		err = -ENOMEM;
		i = 0;
		goto err_release;
	}
	for (i = 0; i < kho->nr_folios; i++) {
		struct folio *folio = kho->folios[i];

		err = kho_preserve_folio(folio);
		if (err)
			goto err_release;
		folio_lock(folio);
		/*
		 * RESTORE_FD copies every preserved page, so a folio that was
		 * never written must hold zeroes, not stale memory. Dirty: the
		 * pinned folio is what crosses; as in memfd_luo, it must not
		 * look clean (reclaimable) to anyone in this kernel either.
		 */
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
		cond_resched();
	}
	err = kho_preserve_vmalloc(kho->ser, &kho->ser_kho);
	if (err)
		goto err_release;
	return 0;

err_release:
	fdbox_kho_release_folios(kho, i);
	return err;
}

/*
 * The seals SEAL adds to fix the mapping (see the DOC block), or an error if
 * the file cannot be held fixed. The rules are memfd_add_seals()'s: nothing
 * is added under F_SEAL_SEAL, and only through a file open for writing (a
 * read-only reference must not impose F_SEAL_FUTURE_WRITE on the writers).
 * SEAL never adds F_SEAL_EXEC or F_SEAL_WRITE, so neither the W^X rule nor
 * the wait for pins applies here (RESTORE_FD applies both). Called with the
 * inode lock held.
 */
static int fdbox_kho_seals_to_add(struct fdbox_entry *entry, u32 seals,
				  u32 *added)
{
	u32 need = F_SEAL_SEAL;

	if (seals & ~FDBOX_KHO_SEALS)
		return -EOPNOTSUPP;
	if (entry->type == FDBOX_TYPE_MEMFD_HUGETLB) {
		need |= F_SEAL_GROW | F_SEAL_SHRINK;
		if (!(seals & FDBOX_KHO_WRITE_SEALS))
			need |= F_SEAL_FUTURE_WRITE;
	} else if (fdbox_mapping_frozen(entry->file)) {
		return -EEXIST;		/* LUO preserves it */
	}
	*added = need & ~seals;
	if ((seals & F_SEAL_SEAL) && *added)
		return -EOPNOTSUPP;
	/* as memfd_add_seals(): only a writer may seal */
	if (*added && !(entry->file->f_mode & FMODE_WRITE))
		return -EPERM;
	return 0;
}

static int fdbox_kho_seal_entry(struct fdbox_entry *entry)
{
	struct inode *inode = file_inode(entry->file);
	struct fdbox_entry_kho *kho;
	u32 seals, added;
	u64 size;
	int err;

	kho = kzalloc(sizeof(*kho), GFP_KERNEL);
	if (!kho)
		return -ENOMEM;

	inode_lock(inode);
	seals = READ_ONCE(*fdbox_seals_ptr(entry->file));
	err = fdbox_kho_seals_to_add(entry, seals, &added);
	if (err)
		goto err_unlock;
	size = i_size_read(inode);
	/*
	 * Pinning allocates every hole: a file larger than this machine's
	 * memory can never be pinned, so say so instead of trying (and a
	 * folio count past UINT_MAX would silently preserve only a prefix).
	 */
	err = -EFBIG;
	if (DIV_ROUND_UP_ULL(size, PAGE_SIZE) > min_t(u64, UINT_MAX,
						      totalram_pages()))
		goto err_unlock;
	err = fdbox_kho_preserve_folios(entry, kho, size);
	if (err)
		goto err_unlock;

	if (entry->type == FDBOX_TYPE_MEMFD) {
		shmem_freeze(inode, true);
		kho->frozen = true;
	}
	kho->added_seals = added;
	WRITE_ONCE(*fdbox_seals_ptr(entry->file), seals | added);
	inode_unlock(inode);

	entry->size = size;
	entry->seals = seals;
	entry->kho = kho;
	return 0;

err_unlock:
	inode_unlock(inode);
	kfree(kho);
	return err;
}

static void fdbox_kho_unseal_entry(struct fdbox_entry *entry)
{
	struct fdbox_entry_kho *kho = entry->kho;
	struct inode *inode = file_inode(entry->file);
	u32 *seals = fdbox_seals_ptr(entry->file);

	inode_lock(inode);
	/* F_SEAL_SEAL kept anyone from adding seals: this is what was there */
	WRITE_ONCE(*seals, *seals & ~kho->added_seals);
	if (kho->frozen)
		shmem_freeze(inode, false);
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
		if (!kho->nr_folios)
			continue;
		if (fdbox_test_corrupt(8) && !strncmp(box->name, "bad-pfn", 7))
			/* a tail page of the root folio: never KHO-marked */
			kho->ser[0].pfn = PHYS_PFN(virt_to_phys(fdbox_kho_root)) + 1;
		fdbox_test_damage_list(box, kho);
		e->folios = kho->ser_kho;
		e->folios_crc = fdbox_crc(kho->ser, kho->nr_folios *
					  sizeof(*kho->ser));
		fdbox_test_damage_count(box, e);
	}
	desc->crc = fdbox_crc(desc, size);
	if (fdbox_test_corrupt(1) ||
	    (fdbox_test_corrupt(4) && !strncmp(box->name, "bad-desc", 8)))
		desc->name[0] ^= 0x20;
	*sizep = size;
	return desc;
}

/* The root is allocated and added as the "fdbox" subtree once. */
static int fdbox_kho_root_get(void)
{
	size_t size = struct_size(fdbox_kho_root, boxes, FDBOX_MAX_BOXES);
	struct fdbox_kho_root *root;
	int err;

	lockdep_assert_held(&fdbox_kho_lock);
	if (fdbox_kho_root)
		return 0;
	root = kho_alloc_preserve(size);
	if (IS_ERR(root))
		return PTR_ERR(root);
	root->magic = FDBOX_KHO_ROOT_MAGIC;
	root->version = FDBOX_KHO_VERSION;
	root->size = struct_size(root, boxes, 0);
	root->crc = fdbox_crc(root, root->size);
	err = kho_add_subtree(FDBOX_KHO_NODE, root, size);
	if (err) {
		pr_err_ratelimited("adding KHO subtree failed: %pe\n",
				   ERR_PTR(err));
		kho_unpreserve_free(root);
		return err;
	}
	fdbox_kho_root = root;
	return 0;
}

/*
 * With no box sealed and no SEAL in flight, the root goes away (the module
 * can be unloaded then; a kexec loses nothing). Removing it is safe only
 * because nothing is in it and nobody is about to publish into it.
 */
static void fdbox_kho_root_put_unused(void)
{
	lockdep_assert_held(&fdbox_kho_lock);
	if (!fdbox_kho_root || !list_empty(&fdbox_sealed) || fdbox_kho_sealing)
		return;
	kho_remove_subtree(fdbox_kho_root);
	kho_unpreserve_free(fdbox_kho_root);
	fdbox_kho_root = NULL;
}

/* Rewrite the root in place from fdbox_sealed. */
static void fdbox_kho_publish_root(void)
{
	struct fdbox_kho_root *root = fdbox_kho_root;
	struct fdbox_box *box;
	u32 n = 0;

	lockdep_assert_held(&fdbox_kho_lock);
	list_for_each_entry(box, &fdbox_sealed, sealed_node) {
		root->boxes[n] = virt_to_phys(box->kho_desc);
		if (fdbox_test_corrupt(16) && !strncmp(box->name, "bad-ptr", 7))
			/* a tail page of the root folio: never KHO-marked */
			root->boxes[n] = virt_to_phys(root) + PAGE_SIZE;
		n++;
	}
	root->nr_boxes = n;
	root->size = struct_size(root, boxes, n);
	root->crc = 0;
	root->crc = fdbox_crc(root, root->size);
	if (fdbox_test_corrupt(2))
		root->version = FDBOX_KHO_VERSION + 1;
}

/* Take fdbox_kho_rwsem for a SEAL/UNSEAL, unless reboot has begun. */
static int fdbox_kho_begin(void)
{
	down_read(&fdbox_kho_rwsem);
	if (fdbox_kho_final) {
		up_read(&fdbox_kho_rwsem);
		return -ESHUTDOWN;
	}
	return 0;
}

/**
 * fdbox_kho_seal - preserve every entry of @box and publish it.
 * @box: an open box.
 *
 * Context: Process context; takes fdbox_kho_rwsem (read) and fdbox_kho_lock.
 * The caller holds @box->mutex.
 *
 * Return: 0, or an error with nothing changed: -ENODEV (KHO off),
 * -ESHUTDOWN (reboot started), -EOPNOTSUPP (a shmem memfd where LUO carries
 * those, or seals that cannot be carried or held), -EPERM (seals to add to a file not open for writing), -EEXIST (LUO
 * preserves a file), -EFBIG, -ENOMEM, or what pinning or KHO returned.
 */
int fdbox_kho_seal(struct fdbox_box *box)
{
	struct fdbox_entry *entry;
	int err = 0;

	lockdep_assert_held(&box->mutex);
	if (!kho_is_enabled())
		return -ENODEV;
	list_for_each_entry(entry, &box->entries, node) {
		if (entry->type == FDBOX_TYPE_MEMFD && fdbox_shmem_is_luos()) {
			pr_info_ratelimited("box %s: %s is a shmem memfd, which LUO (/dev/liveupdate) preserves on this kernel; SEAL refused\n",
					    box->name, entry->name);
			return -EOPNOTSUPP;
		}
	}
	err = fdbox_kho_begin();
	if (err)
		return err;
	scoped_guard(mutex, &fdbox_kho_lock) {
		err = fdbox_kho_root_get();
		if (!err)
			fdbox_kho_sealing++;	/* the root stays until we publish */
	}
	if (err)
		goto out_end;

	list_for_each_entry(entry, &box->entries, node) {
		err = fdbox_kho_seal_entry(entry);
		if (err)
			goto err_unseal;
		cond_resched();
	}
	box->kho_desc = fdbox_kho_box_desc(box, &box->kho_size);
	if (IS_ERR(box->kho_desc)) {
		err = PTR_ERR(box->kho_desc);
		box->kho_desc = NULL;
		goto err_unseal;
	}
#ifdef FDBOX_TEST
	if (test_seal_delay_ms && !strncmp(box->name, "slow", 4)) {
		pr_info("test: %s preserved, publishing in %u ms\n", box->name,
			test_seal_delay_ms);
		msleep(test_seal_delay_ms);
	}
#endif
	scoped_guard(mutex, &fdbox_kho_lock) {
		list_add_tail(&box->sealed_node, &fdbox_sealed);
		fdbox_kho_sealing--;
		fdbox_kho_publish_root();
	}
	up_read(&fdbox_kho_rwsem);
	return 0;

err_unseal:
	list_for_each_entry_continue_reverse(entry, &box->entries, node)
		fdbox_kho_unseal_entry(entry);
	scoped_guard(mutex, &fdbox_kho_lock) {
		fdbox_kho_sealing--;
		fdbox_kho_root_put_unused();
	}
out_end:
	up_read(&fdbox_kho_rwsem);
	return err;
}

/**
 * fdbox_kho_unseal - undo fdbox_kho_seal().
 * @box: a sealed box.
 *
 * Context: Process context; takes fdbox_kho_rwsem (read) and fdbox_kho_lock.
 * The caller holds @box->mutex.
 *
 * Return: 0, or -ESHUTDOWN once reboot has started (the box stays sealed).
 */
int fdbox_kho_unseal(struct fdbox_box *box)
{
	struct fdbox_entry *entry;
	int err;

	lockdep_assert_held(&box->mutex);
	err = fdbox_kho_begin();
	if (err)
		return err;
	scoped_guard(mutex, &fdbox_kho_lock) {
		list_del_init(&box->sealed_node);
		fdbox_kho_publish_root();
	}
	kho_unpreserve_free(box->kho_desc);
	box->kho_desc = NULL;
	list_for_each_entry(entry, &box->entries, node) {
		fdbox_kho_unseal_entry(entry);
		cond_resched();
	}
	/* last: the root never lists a box whose memory is gone */
	scoped_guard(mutex, &fdbox_kho_lock)
		fdbox_kho_root_put_unused();
	up_read(&fdbox_kho_rwsem);
	return 0;
}

/*
 * kernel_kexec() (and every other reboot) calls this before the jump: wait
 * for SEAL/UNSEAL in flight, then make the published state final.
 */
static int fdbox_kho_reboot(struct notifier_block *nb, unsigned long action,
			    void *data)
{
	if (!down_write_trylock(&fdbox_kho_rwsem)) {
		pr_info("reboot: waiting for a seal/unseal in progress\n");
		down_write(&fdbox_kho_rwsem);
	}
	fdbox_kho_final = true;
	up_write(&fdbox_kho_rwsem);
	return NOTIFY_DONE;
}

static struct notifier_block fdbox_kho_reboot_nb = {
	.notifier_call = fdbox_kho_reboot,
};

/* Restore */

/*
 * KHO's mark on the head page of every preserved folio, as
 * kernel/liveupdate/kexec_handover.c of 7.2 writes it: the page's private
 * field holds union kho_page_info (order, then magic KHO_PAGE_MAGIC). Neither is
 * exported (no header has them), so this copy is the one place fdbox
 * depends on KHO internals; a union, like KHO's own, so it reads the same on
 * either endianness. tests/unit/test_kmod_kho_page_info.py compares it with
 * the reference tree. What would replace it upstream: an exported
 * "bool kho_is_preserved_folio(phys_addr_t phys, unsigned int order)" (or a
 * kho_restore_folio() that fails quietly on unpreserved memory).
 */
#define FDBOX_KHO_PAGE_MAGIC	0x4b484f50U	/* KHO_PAGE_MAGIC, 'KHOP' */

union fdbox_kho_page_info {
	unsigned long page_private;
	struct {
		unsigned int order;
		unsigned int magic;
	};
};
static_assert(sizeof(union fdbox_kho_page_info) ==
	      sizeof_field(struct page, private));

/*
 * Is @phys the head of a folio KHO preserved with @order (any order if
 * @order < 0)? Reads only struct page, never the memory. kho_restore_folio()
 * WARNs on a page without the mark; fdbox checks first, so a corrupt
 * handover is refused quietly.
 */
static bool fdbox_kho_preserved(phys_addr_t phys, int order)
{
	unsigned long pfn = PHYS_PFN(phys);
	union fdbox_kho_page_info info;
	struct page *page;

	if (!phys || !PAGE_ALIGNED(phys) || !pfn_valid(pfn) ||
	    !page_is_ram(pfn))
		return false;
	page = pfn_to_online_page(pfn);
	if (!page)
		return false;
	info.page_private = READ_ONCE(page->private);
	if (info.magic != FDBOX_KHO_PAGE_MAGIC)
		return false;
	return order < 0 || info.order == order;
}

static void fdbox_kho_put_folios(struct fdbox_entry_kho *kho)
{
	for (u64 i = 0; i < kho->nr_folios; i++) {
		if (kho->folios[i])
			folio_put(kho->folios[i]);
		if (!(i % 1024))
			cond_resched();
	}
	kvfree(kho->folios);
	vfree(kho->ser);
}

/**
 * fdbox_kho_discard_entry - free a restore-pending entry's memory.
 * @entry: the entry.
 *
 * Context: Process context; the caller holds the box's mutex.
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
		if (!((pg - first + 1) % 512))
			cond_resched();	/* a 1 GiB folio is 262144 pages */
	}
}

/*
 * Can @target take the entry's preserved seals under the seal rules? It may
 * have none but the entry's, and if it has F_SEAL_SEAL it must have them
 * all; it is filled, so it must not be write-sealed.
 */
static bool fdbox_kho_seals_fit(u32 have, u32 want)
{
	if (have & (FDBOX_KHO_WRITE_SEALS | ~want))
		return false;
	return !(have & F_SEAL_SEAL) || have == want;
}

/*
 * The seals memfd_add_seals() would end up with on @inode: F_SEAL_EXEC on an
 * executable file implies the write seals (W^X). A sealed file with
 * F_SEAL_EXEC and no write seal was not executable, so its target must not
 * be either (memfd_create(MFD_NOEXEC_SEAL)).
 */
static u32 fdbox_kho_implied_seals(struct inode *inode, u32 seals)
{
	if ((seals & F_SEAL_EXEC) && (inode->i_mode & 0111))
		seals |= F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE |
			 F_SEAL_FUTURE_WRITE;
	return seals;
}

#define FDBOX_RESTORE_BATCH 256

/* Copy the preserved data into @target; the caller holds its inode lock. */
static int fdbox_kho_copy_to(struct fdbox_entry *entry, struct file *target)
{
	struct fdbox_entry_kho *kho = entry->kho;
	loff_t pos, size = entry->size;
	u64 cursor = 0;
	struct folio **dst;
	pgoff_t offset;
	int err = 0;

	dst = kvmalloc_array(FDBOX_RESTORE_BATCH, sizeof(*dst), GFP_KERNEL);
	if (!dst)
		return -ENOMEM;
	for (pos = 0; pos < size; ) {
		loff_t end = min_t(loff_t, size, pos +
				   (loff_t)FDBOX_RESTORE_BATCH * entry->page_size);
		long nr = memfd_pin_folios(target, pos, end - 1, dst,
					   FDBOX_RESTORE_BATCH, &offset);

		if (nr <= 0) {
			err = nr ?: -EIO;
			break;
		}
		for (long i = 0; i < nr; i++) {
			fdbox_copy_into(kho, &cursor, dst[i]);
			flush_dcache_folio(dst[i]);
			folio_lock(dst[i]);
			folio_mark_dirty(dst[i]);
			folio_unlock(dst[i]);
		}
		pos = (loff_t)(dst[nr - 1]->index + folio_nr_pages(dst[nr - 1]))
			<< PAGE_SHIFT;
		unpin_folios(dst, nr);
		cond_resched();
	}
	kvfree(dst);
	return err;
}

/**
 * fdbox_kho_restore_entry - fill @target from a restored entry's memory.
 * @entry:  a restore-pending entry, whose file the caller already set to
 *          @target (so no other box can take @target meanwhile).
 * @target: the caller's memfd.
 *
 * Checks @target, copies the preserved data, applies the preserved seals and
 * frees the preserved memory, all under @target's inode lock: nobody can
 * truncate, punch or write() it meanwhile, so what the copy wrote is what
 * the file holds when the seals go on. The seals follow memfd_add_seals():
 * F_SEAL_WRITE needs no writable mapping and no pinned page. The target is
 * empty when the lock is taken, so none of its pages can be pinned yet, and
 * writable mappings are denied before the first page exists: none can be
 * pinned for writing before F_SEAL_WRITE is set either (no wait for pins is
 * needed, unlike memfd_add_seals() on a file with a past).
 *
 * Context: Process context; the caller holds the box's mutex.
 *
 * Return: 0; -EMEDIUMTYPE if @target does not fit (kind, page size, size,
 * not empty, not open for writing, a writable mapping while the entry is
 * write-sealed, executable while the entry has F_SEAL_EXEC alone, or seals
 * that conflict with the entry's); -ENOMEM; or an error from pinning
 * @target's folios. On error the preserved data is untouched and RESTORE_FD
 * can be retried.
 */
int fdbox_kho_restore_entry(struct fdbox_entry *entry, struct file *target)
{
	struct inode *inode = file_inode(target);
	u32 *seals = fdbox_seals_ptr(target);
	bool deny = entry->seals & F_SEAL_WRITE;
	u64 page_size;
	u32 type;
	int err;

	if (fdbox_classify(target, &type, &page_size) || type != entry->type ||
	    page_size != entry->page_size || !(target->f_mode & FMODE_WRITE))
		return -EMEDIUMTYPE;

	inode_lock(inode);
	err = -EMEDIUMTYPE;
	if (i_size_read(inode) != entry->size || inode->i_blocks ||
	    !fdbox_kho_seals_fit(READ_ONCE(*seals), entry->seals) ||
	    fdbox_kho_implied_seals(inode, entry->seals) != entry->seals)
		goto out_unlock;
	if (deny && mapping_deny_writable(target->f_mapping))
		goto out_unlock;
	err = fdbox_kho_copy_to(entry, target);
	if (err) {
		if (deny)
			mapping_allow_writable(target->f_mapping);
		goto out_unlock;
	}
	WRITE_ONCE(*seals, entry->seals);
	inode_unlock(inode);
	fdbox_kho_discard_entry(entry);
	return 0;

out_unlock:
	inode_unlock(inode);
	return err;
}

/*
 * Check a preserved vmalloc area's chunk list against KHO's marks before
 * kho_restore_vmalloc() follows it (it trusts every pointer).
 */
static bool fdbox_kho_vmalloc_valid(const struct kho_vmalloc *v,
				    u64 want_pages)
{
	phys_addr_t chunk_phys = v->first.phys;
	u64 pages = 0, chunks = 0;

	if (v->total_pages != want_pages || v->order)
		return false;
	while (chunk_phys) {
		const struct kho_vmalloc_chunk *chunk;

		if (!fdbox_kho_preserved(chunk_phys, 0) ||
		    ++chunks > want_pages)
			return false;
		chunk = phys_to_virt(chunk_phys);
		for (int i = 0; i < ARRAY_SIZE(chunk->phys) && chunk->phys[i];
		     i++) {
			if (!fdbox_kho_preserved(chunk->phys[i], 0) ||
			    ++pages > want_pages)
				return false;
		}
		chunk_phys = chunk->hdr.next.phys;
		cond_resched();
	}
	return pages == want_pages;
}

static int fdbox_cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/*
 * No pfn twice in one list: KHO's mark check passes a pfn as often as it is
 * listed, and the second kho_restore_folio() of it would WARN. (Distinct
 * marked heads cannot overlap otherwise: KHO marks only the head page of a
 * preserved folio.) Returns 0, -EINVAL, or -ENOMEM.
 */
static int fdbox_kho_pfns_unique(const struct fdbox_preserved_folio *ser,
				 u64 n)
{
	u64 *pfns;
	int err = 0;

	if (n < 2)
		return 0;
	pfns = kvmalloc_array(n, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	for (u64 i = 0; i < n; i++)
		pfns[i] = ser[i].pfn;
	sort(pfns, n, sizeof(*pfns), fdbox_cmp_u64, NULL);
	for (u64 i = 1; i < n && !err; i++) {
		if (pfns[i] == pfns[i - 1])
			err = -EINVAL;
		if (!(i % 4096))
			cond_resched();
	}
	kvfree(pfns);
	return err;
}

/*
 * The folio list: sorted, non-overlapping, inside the file (no index near
 * 2^64 wraps the bound), aligned, each pfn once. Returns 0, -EINVAL, or
 * -ENOMEM.
 */
static int fdbox_kho_folio_list_valid(const struct fdbox_kho_entry *e,
				      const struct fdbox_preserved_folio *ser)
{
	/* pages the file spans, and one of its pages of slack past the end */
	u64 limit = DIV_ROUND_UP_ULL(e->size, PAGE_SIZE) +
		(e->page_size >> PAGE_SHIFT);
	u32 min_order = ilog2(e->page_size) - PAGE_SHIFT;
	u64 next = 0;	/* first index the next folio may start at */

	for (u64 i = 0; i < e->nr_folios; i++) {
		const struct fdbox_preserved_folio *s = &ser[i];

		if (s->order > MAX_PAGE_ORDER * 2 || s->reserved ||
		    s->order < min_order ||
		    (e->type == FDBOX_TYPE_MEMFD_HUGETLB && s->order != min_order) ||
		    !IS_ALIGNED(s->pfn, 1ULL << s->order) ||
		    !IS_ALIGNED(s->index, 1ULL << s->order) ||
		    s->index < next || s->index >= limit ||
		    (1ULL << s->order) > limit - s->index ||
		    !fdbox_kho_preserved(PFN_PHYS(s->pfn), s->order))
			return -EINVAL;
		next = s->index + (1ULL << s->order);
		if (!(i % 4096))
			cond_resched();
	}
	return fdbox_kho_pfns_unique(ser, e->nr_folios);
}

/*
 * Claim a preserved folio list and every folio in it, after checking both.
 * On failure everything claimed so far is freed and the rest is left alone.
 */
static int fdbox_kho_claim_folios(const struct fdbox_kho_entry *e,
				  struct fdbox_entry_kho *kho)
{
	u64 list_bytes, i;
	int err;

	kho->nr_folios = e->nr_folios;
	if (!e->nr_folios)
		return 0;
	/* each folio is at least a page of this machine's memory */
	if (e->nr_folios > min_t(u64, DIV_ROUND_UP_ULL(e->size, PAGE_SIZE),
				 totalram_pages()) ||
	    check_mul_overflow(e->nr_folios, (u64)sizeof(*kho->ser), &list_bytes) ||
	    !fdbox_kho_vmalloc_valid(&e->folios,
				     DIV_ROUND_UP_ULL(list_bytes, PAGE_SIZE)))
		return -EINVAL;
	kho->ser = kho_restore_vmalloc(&e->folios);
	if (!kho->ser)
		return -EIO;
	err = fdbox_crc(kho->ser, list_bytes) != e->folios_crc ? -EINVAL :
		fdbox_kho_folio_list_valid(e, kho->ser);
	if (err) {
		vfree(kho->ser);
		return err;
	}

	kho->folios = kvcalloc(e->nr_folios, sizeof(*kho->folios), GFP_KERNEL);
	if (!kho->folios) {
		vfree(kho->ser);
		return -ENOMEM;
	}
	for (i = 0; i < e->nr_folios; i++) {
		struct folio *folio = NULL;

		/*
		 * Checked above, but an earlier list (another entry's, another
		 * box's) may have claimed the same pfn since: KHO's mark is gone
		 * then, and kho_restore_folio() would WARN.
		 */
		if (fdbox_kho_preserved(PFN_PHYS(kho->ser[i].pfn),
					kho->ser[i].order))
			folio = kho_restore_folio(PFN_PHYS(kho->ser[i].pfn));
		if (!folio) {
			pr_err("%s: folio %llu at pfn %#llx is listed twice\n",
			       e->name, i, kho->ser[i].pfn);
			kho->nr_folios = i;
			fdbox_kho_put_folios(kho);
			return -EIO;
		}
		kho->folios[i] = folio;
		cond_resched();
	}
	return 0;
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
			e->page_size <= FDBOX_MAX_PAGE_SIZE &&
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

/* Check a box descriptor; it is claimed but nothing it names is. */
static int fdbox_kho_box_desc_valid(struct fdbox_kho_box *desc,
				    size_t folio_size)
{
	u32 crc, i;

	if (desc->magic != FDBOX_KHO_BOX_MAGIC ||
	    desc->version != FDBOX_KHO_VERSION || desc->reserved ||
	    desc->nr_entries > FDBOX_MAX_ENTRIES_PER_BOX ||
	    desc->size != struct_size(desc, entries, desc->nr_entries) ||
	    desc->size > folio_size)
		return -EINVAL;
	crc = desc->crc;
	desc->crc = 0;
	if (fdbox_crc(desc, desc->size) != crc ||
	    !fdbox_valid_box_name(desc->name, sizeof(desc->name)))
		return -EINVAL;
	for (i = 0; i < desc->nr_entries; i++) {
		if (!fdbox_kho_entry_valid(&desc->entries[i]))
			return -EINVAL;
		for (u32 j = 0; j < i; j++)
			if (!strcmp(desc->entries[i].name, desc->entries[j].name))
				return -EINVAL;
		cond_resched();	/* up to 4096 * 4095 / 2 name compares */
	}
	return 0;
}

/* Build a box (unpublished) from a checked descriptor, claiming its folios. */
static struct fdbox_box *fdbox_kho_box_from_desc(const struct fdbox_kho_box *desc)
{
	struct fdbox_box *box;
	int err;

	box = fdbox_box_alloc(desc->name);
	if (!box)
		return ERR_PTR(-ENOMEM);
	box->state = FDBOX_STATE_RESTORED;
	for (u32 i = 0; i < desc->nr_entries; i++) {
		const struct fdbox_kho_entry *e = &desc->entries[i];
		struct fdbox_entry *entry = fdbox_entry_alloc();

		err = -ENOMEM;
		if (!entry)
			goto err_free_box;
		entry->kho = kzalloc(sizeof(*entry->kho), GFP_KERNEL);
		if (!entry->kho) {
			fdbox_entry_free(entry);
			goto err_free_box;
		}
		err = fdbox_kho_claim_folios(e, entry->kho);
		if (err) {
			kfree(entry->kho);
			fdbox_entry_free(entry);
			goto err_free_box;
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
	return box;

err_free_box:
	fdbox_kho_free_unpublished(box);
	return ERR_PTR(err);
}

/* Restore and publish the box whose descriptor is at @phys. */
static int fdbox_kho_restore_box(u32 idx, phys_addr_t phys)
{
	struct fdbox_kho_box *desc;
	struct fdbox_box *box;
	struct folio *folio;
	int err;

	if (!fdbox_kho_preserved(phys, -1)) {
		pr_err("box #%u: descriptor at %pa is not preserved memory; refused\n",
		       idx, &phys);
		return -EINVAL;
	}
	folio = kho_restore_folio(phys);
	if (!folio)
		return -EIO;
	desc = folio_address(folio);
	err = fdbox_kho_box_desc_valid(desc, folio_size(folio));
	if (err) {
		/* not certainly ours: keep the page, free nothing it names */
		pr_err("box #%u: damaged descriptor; refused, its memory stays reserved\n",
		       idx);
		return err;
	}
	box = fdbox_kho_box_from_desc(desc);
	if (IS_ERR(box)) {
		err = PTR_ERR(box);
		pr_err("box %s: %pe; refused\n", desc->name, box);
		goto out_put;
	}
	err = fdbox_box_publish_restored(box);
	if (err) {
		pr_err("box %s: %pe; refused, its preserved memory freed\n",
		       desc->name, ERR_PTR(err));
		fdbox_kho_free_unpublished(box);
	}
out_put:
	folio_put(folio);
	return err;
}

/* Has an earlier load in this boot taken the handover (kept, marked page)? */
static bool fdbox_kho_consumed(phys_addr_t phys)
{
	unsigned long pfn = PHYS_PFN(phys);

	if (!PAGE_ALIGNED(phys) || !pfn_valid(pfn) || !page_is_ram(pfn) ||
	    fdbox_kho_preserved(phys, -1))
		return false;
	/* RAM, and no longer KHO's: ours since the earlier load */
	return READ_ONCE(((struct fdbox_kho_root *)phys_to_virt(phys))->magic) ==
		FDBOX_KHO_CONSUMED_MAGIC;
}

/**
 * fdbox_kho_init - take the boxes the previous kernel handed over.
 *
 * Context: Module init, after /dev/fdbox is registered, before it opens.
 *
 * Return: 0 (also when there was nothing to take), or the error of the
 * first part of the handover that was refused (-EINVAL: damaged; -EIO:
 * memory KHO did not give back; -ENOMEM). Every box that could be restored
 * is, whatever the return value.
 */
int fdbox_kho_init(void)
{
	struct fdbox_kho_root *root;
	struct folio *folio;
	phys_addr_t phys;
	u32 crc, n, restored = 0;
	size_t size;
	int err, first_err = 0;

	if (!is_kho_boot())
		return 0;
	err = kho_retrieve_subtree(FDBOX_KHO_NODE, &phys, &size);
	if (err == -ENOENT)
		return 0;
	if (err)
		return err;
	if (fdbox_kho_consumed(phys))
		return 0;
	if (size < sizeof(*root) || !fdbox_kho_preserved(phys, -1)) {
		pr_err("root descriptor at %pa is not preserved memory\n", &phys);
		return -EIO;
	}
	folio = kho_restore_folio(phys);
	if (!folio)
		return -EIO;
	root = folio_address(folio);
	if (size > folio_size(folio) ||
	    root->magic != FDBOX_KHO_ROOT_MAGIC ||
	    root->version != FDBOX_KHO_VERSION || root->reserved ||
	    root->nr_boxes > FDBOX_MAX_BOXES ||
	    root->size != struct_size(root, boxes, root->nr_boxes) ||
	    root->size > size) {
		err = -EINVAL;
		goto out_consumed;
	}
	crc = root->crc;
	root->crc = 0;
	if (fdbox_crc(root, root->size) != crc) {
		err = -EINVAL;
		goto out_consumed;
	}

	for (n = 0; n < root->nr_boxes; n++) {
		err = fdbox_kho_restore_box(n, root->boxes[n]);
		if (!err)
			restored++;
		else if (!first_err)
			first_err = err;
		cond_resched();
	}
	err = first_err;
	WRITE_ONCE(fdbox_kho_restored, restored > 0);
	if (restored == root->nr_boxes)
		pr_info("restored %u box(es) from the previous kernel\n",
			restored);
	else
		pr_err("restored %u box(es) from the previous kernel, refused %u\n",
		       restored, root->nr_boxes - restored);

out_consumed:
	/* the root page stays allocated for the life of this kernel */
	root->magic = FDBOX_KHO_CONSUMED_MAGIC;
	return err;
}

/**
 * fdbox_kho_register - watch for reboot (see fdbox_kho_reboot()).
 *
 * Context: Module init.
 *
 * Return: 0, or the error of register_reboot_notifier().
 */
int fdbox_kho_register(void)
{
	return register_reboot_notifier(&fdbox_kho_reboot_nb);
}

/**
 * fdbox_kho_unregister - undo fdbox_kho_register().
 *
 * Context: Module exit, or a failed init.
 */
void fdbox_kho_unregister(void)
{
	unregister_reboot_notifier(&fdbox_kho_reboot_nb);
}
