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
 * the physical addresses of all sealed boxes' descriptors. Each sealed box
 * also has a release list, every folio it preserved as (phys, order), and
 * the subtree "fdbox-release" lists those beside the root. The layout is in
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
 * The root's magic, version and CRC, and then each box descriptor's, are
 * checked where they lie, before kho_restore_folio() claims them. A root of
 * another %FDBOX_KHO_VERSION, or one that fails its checks, is left to KHO
 * untouched (the handover is "held"): a module of that version loaded later
 * in this boot restores it, and FDBOX_IOC_RELEASE_HANDOVER gives all of its
 * memory back through the release list (fdbox_kho_abi.h), which every
 * version reads. In a valid root, counts against limits, names, types, folio
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
 * kexec; fdbox_kho_lock, inside it, protects the root, the release list
 * header, the list of sealed boxes and the count of SEALs in flight.
 * fdbox_kho_held_lock protects the held handover; it is taken alone (never
 * with a box mutex or fdbox_kho_lock).
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

/**
 * struct fdbox_box_release - what a sealed box preserved, for the release
 * list (see "DOC: fdbox release list" in fdbox_kho_abi.h).
 * @ranges: every folio the box preserved (KHO-preserved vmalloc).
 * @nr:     elements in @ranges.
 * @crc:    CRC32 of @ranges.
 * @kho:    KHO's record of the @ranges preservation.
 */
struct fdbox_box_release {
	struct fdbox_kho_range *ranges;
	u64 nr;
	u32 crc;
	struct kho_vmalloc kho;
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
		 "testing only, bits: 1 every box descriptor, 2 root version, 4 the descriptor of boxes named bad-desc*, 8 a folio pfn of bad-pfn*, 16 the root's pointer to bad-ptr*, 32 a CRC-valid huge nr_folios in bad-nr*, 64 a CRC-valid pfn listed twice in bad-dup*, 128 a CRC-valid index near 2^64 in bad-idx*, 256 the root's CRC, 512 a CRC-valid gap before the last folio of bad-gap*, 1024 a CRC-valid size of 2^64 - 1 for the empty entry of bad-size*, 2048 a CRC-valid folio of bad-xdup*'s second entry that is a page of its first entry's folio list");
static bool test_shmem_beside_luo;
module_param(test_shmem_beside_luo, bool, 0);
MODULE_PARM_DESC(test_shmem_beside_luo,
		 "testing only: SEAL shmem memfds although LUO's memfd handler is built in (the path of KHO kernels without it)");
static unsigned long test_fail_restore;
module_param(test_fail_restore, ulong, 0);
MODULE_PARM_DESC(test_fail_restore,
		 "testing only, bits: each fails once with ENOMEM at load: 1 the box, 2 an entry, 4 a folio list copy, 8 the pfn sort buffer, 16 a folio array");
static bool test_page_info_skew;
module_param(test_page_info_skew, bool, 0);
MODULE_PARM_DESC(test_page_info_skew,
		 "testing only: read KHO's page mark with its order one too high (a KHO whose union kho_page_info changed)");
static unsigned int test_seal_delay_ms;
module_param(test_seal_delay_ms, uint, 0);
MODULE_PARM_DESC(test_seal_delay_ms,
		 "testing only: sleep this long in SEAL of boxes named slow*, between preserving and publishing");
#define fdbox_test_corrupt(bit)	(test_corrupt_handover & (bit))

/*
 * The window of test_seal_delay_ms, between preserving and publishing: a
 * SIGKILL ends it (-EINTR), as it ends the real pin and preserve loops.
 */
static int fdbox_test_seal_delay(struct fdbox_box *box)
{
	unsigned long end = jiffies + msecs_to_jiffies(test_seal_delay_ms);

	if (!test_seal_delay_ms || strncmp(box->name, "slow", 4))
		return 0;
	pr_info("test: %s preserved, publishing in %u ms\n", box->name,
		test_seal_delay_ms);
	while (time_before(jiffies, end)) {
		if (fatal_signal_pending(current))
			return -EINTR;
		msleep(20);
	}
	return 0;
}

/* An allocation of the load path that fails once (test_fail_restore). */
static bool fdbox_test_fail(unsigned int bit)
{
	if (!test_and_clear_bit(bit, &test_fail_restore))
		return false;
	pr_info("test: failing load allocation %lu\n", BIT(bit));
	return true;
}

/*
 * Damage that keeps every CRC valid (applied before the CRCs are taken), for
 * the checks behind the CRC: a pfn listed twice, an index whose end wraps, a
 * gap (with the size grown to match, in fdbox_test_damage_count()), a folio
 * that is a page of the previous entry's (@prev's) folio list. The lists
 * must have two folios.
 */
static void fdbox_test_damage_list(struct fdbox_box *box,
				   struct fdbox_entry_kho *kho,
				   const struct fdbox_entry_kho *prev)
{
	u64 last = kho->nr_folios - 1;

	if (kho->nr_folios < 2)
		return;
	if (fdbox_test_corrupt(64) && !strncmp(box->name, "bad-dup", 7))
		kho->ser[1].pfn = kho->ser[0].pfn;
	if (fdbox_test_corrupt(128) && !strncmp(box->name, "bad-idx", 7))
		kho->ser[1].index = -(1ULL << kho->ser[1].order);
	if (fdbox_test_corrupt(512) && !strncmp(box->name, "bad-gap", 7))
		kho->ser[last].index += 1ULL << kho->ser[last].order;
	if (fdbox_test_corrupt(2048) && !strncmp(box->name, "bad-xdup", 8) &&
	    prev && prev->nr_folios && !kho->ser[0].order) {
		const struct kho_vmalloc_chunk *chunk =
			phys_to_virt(prev->ser_kho.first.phys);

		kho->ser[0].pfn = PHYS_PFN(chunk->phys[0]);
	}
}

/*
 * A CRC-valid count whose list size, truncated to 32 bits, is one page: the
 * list CRC used to read 2^44 bytes past the one-page list. A size one page
 * past the gap fdbox_test_damage_list() made; a size whose page count wraps.
 */
static void fdbox_test_damage_count(struct fdbox_box *box,
				    struct fdbox_kho_entry *e)
{
	if (fdbox_test_corrupt(32) && !strncmp(box->name, "bad-nr", 6)) {
		e->nr_folios = 733007751851ULL;	/* * 24 = 2^44 + 8 bytes */
		e->size = e->nr_folios * e->page_size;
	}
	if (fdbox_test_corrupt(512) && !strncmp(box->name, "bad-gap", 7) &&
	    e->nr_folios >= 2)
		e->size += e->page_size;
	if (fdbox_test_corrupt(1024) && !strncmp(box->name, "bad-size", 8) &&
	    !e->nr_folios)
		e->size = U64_MAX;
}
#else
static inline bool fdbox_test_corrupt(unsigned int bit)
{
	return false;
}

static inline bool fdbox_test_fail(unsigned int bit)
{
	return false;
}

static inline int fdbox_test_seal_delay(struct fdbox_box *box)
{
	return 0;
}

static inline void fdbox_test_damage_list(struct fdbox_box *box,
					  struct fdbox_entry_kho *kho,
					  const struct fdbox_entry_kho *prev) { }
static inline void fdbox_test_damage_count(struct fdbox_box *box,
					   struct fdbox_kho_entry *e) { }
#endif

static DECLARE_RWSEM(fdbox_kho_rwsem);
static bool fdbox_kho_final;		/* reboot started: published state is final */
static DEFINE_MUTEX(fdbox_kho_lock);
static LIST_HEAD(fdbox_sealed);		/* boxes in the root, in seal order */
static struct fdbox_kho_root *fdbox_kho_root;
static struct fdbox_kho_release *fdbox_kho_rel;	/* goes with fdbox_kho_root */
static unsigned int fdbox_kho_sealing;	/* SEALs between root_get and publish */
static bool fdbox_kho_restored;
/*
 * The root of a previous kernel's handover this load left untouched (another
 * version, or a root that fails its checks), until RELEASE_HANDOVER gives it
 * back; 0 if none. Protected by fdbox_kho_held_lock.
 */
static DEFINE_MUTEX(fdbox_kho_held_lock);
static phys_addr_t fdbox_kho_held;

static u32 fdbox_crc(const void *buf, size_t len)
{
	return crc32_le(~0U, buf, len) ^ ~0U;
}

/*
 * fdbox_crc() of @buf as if its u32 at @crc_off were zero, without writing
 * it: memory not yet claimed is only read.
 */
static u32 fdbox_crc_unset(const void *buf, size_t len, size_t crc_off)
{
	static const u8 zero[4];
	u32 crc;

	crc = crc32_le(~0U, buf, crc_off);
	crc = crc32_le(crc, zero, sizeof(zero));
	crc = crc32_le(crc, buf + crc_off + sizeof(zero),
		       len - crc_off - sizeof(zero));
	return crc ^ ~0U;
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
	scoped_guard(mutex, &fdbox_kho_held_lock)
		if (fdbox_kho_held)
			features |= FDBOX_FEATURE_HANDOVER_HELD;
	if (fdbox_kho_pending_any())
		features |= FDBOX_FEATURE_RESTORE_PENDING;
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
 * An error of KHO or of pinning, as the uAPI's errno (one meaning each):
 * ENOMEM and EINTR keep theirs, anything else (EINVAL from
 * kho_preserve_folio() or memfd_pin_folios(), EEXIST from
 * kho_add_subtree(), E2BIG from kho_alloc_preserve(), ...) is EIO: the
 * kernel could not pin or preserve the memory. The caller logs the original.
 */
static int fdbox_kho_errno(int err)
{
	return err == -ENOMEM || err == -EINTR ? err : -EIO;
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
		return fdbox_kho_errno(nr);
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

		/* a dying caller's SEAL is undone, not finished */
		err = -EINTR;
		if (fatal_signal_pending(current))
			goto err_release;
		err = kho_preserve_folio(folio);
		if (err) {
			pr_err_ratelimited("%s: preserving a folio failed: %pe\n",
					   entry->name, ERR_PTR(err));
			err = fdbox_kho_errno(err);
			goto err_release;
		}
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
	if (err) {
		pr_err_ratelimited("%s: preserving the folio list failed: %pe\n",
				   entry->name, ERR_PTR(err));
		err = fdbox_kho_errno(err);
		goto err_release;
	}
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
	/*
	 * As memfd_add_seals(): only a writer may seal (which answers EPERM;
	 * here EACCES, as EPERM means no CAP_SYS_ADMIN on every fdbox ioctl).
	 */
	if (*added && !(entry->file->f_mode & FMODE_WRITE))
		return -EACCES;
	return 0;
}

/*
 * Pinning a shmem file allocates every hole (and swaps every swapped page
 * in): refuse up front, naming the sizes, when that is more than this
 * machine has available, instead of pushing it into reclaim and the OOM
 * killer. An estimate (si_mem_available()), as MemAvailable is: a SEAL that
 * passes can still fail with ENOMEM, whole and harmless. Called with the
 * inode lock held. Returns 0 or -ENOMEM.
 */
static int fdbox_kho_room_for_holes(struct fdbox_entry *entry,
				    struct inode *inode, u64 size)
{
	struct shmem_inode_info *info = SHMEM_I(inode);
	u64 pages = DIV_ROUND_UP_ULL(size, PAGE_SIZE);
	unsigned long alloced = READ_ONCE(info->alloced);
	unsigned long swapped = READ_ONCE(info->swapped);
	u64 resident = alloced > swapped ? alloced - swapped : 0;
	u64 need = pages > resident ? pages - resident : 0;
	long avail = si_mem_available();

	if (!need || (avail > 0 && need <= avail))
		return 0;
	pr_info_ratelimited("%s: SEAL would allocate %llu KiB (the holes of a %llu KiB file), %ld KiB available: ENOMEM\n",
			    entry->name, need << (PAGE_SHIFT - 10), size >> 10,
			    max(avail, 0L) << (PAGE_SHIFT - 10));
	return -ENOMEM;
}

static int fdbox_kho_seal_entry(struct fdbox_entry *entry)
{
	struct inode *inode = file_inode(entry->file);
	struct fdbox_entry_kho *kho;
	u32 seals, added;
	u64 size;
	int err;

	kho = kzalloc_obj(*kho);
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
	if (entry->type == FDBOX_TYPE_MEMFD) {
		err = fdbox_kho_room_for_holes(entry, inode, size);
		if (err)
			goto err_unlock;
	}
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
	struct fdbox_entry_kho *prev __maybe_unused = NULL;
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
			if (fdbox_test_corrupt(8) &&
			    !strncmp(box->name, "bad-pfn", 7))
				/* a tail page of the root folio: never KHO-marked */
				kho->ser[0].pfn =
					PHYS_PFN(virt_to_phys(fdbox_kho_root)) + 1;
			fdbox_test_damage_list(box, kho, prev);
			e->folios = kho->ser_kho;
			e->folios_crc = fdbox_crc(kho->ser, kho->nr_folios *
						  sizeof(*kho->ser));
		}
		fdbox_test_damage_count(box, e);
		prev = kho;
	}
	desc->crc = fdbox_crc(desc, size);
	if (fdbox_test_corrupt(1) ||
	    (fdbox_test_corrupt(4) && !strncmp(box->name, "bad-desc", 8)))
		desc->name[0] ^= 0x20;
	*sizep = size;
	return desc;
}

static void fdbox_kho_range_set(struct fdbox_kho_range *r, phys_addr_t phys,
				unsigned int order)
{
	r->phys = phys;
	r->order = order;
}

/*
 * The pages of a vmalloc preservation (each chunk, and what it lists) as
 * release ranges into @out, if not NULL. Returns how many there are.
 */
static u64 fdbox_kho_vmalloc_ranges(const struct kho_vmalloc *v,
				    struct fdbox_kho_range *out)
{
	phys_addr_t chunk_phys = v->first.phys;
	u64 n = 0;

	while (chunk_phys) {
		const struct kho_vmalloc_chunk *chunk = phys_to_virt(chunk_phys);

		for (int i = 0; i < ARRAY_SIZE(chunk->phys) && chunk->phys[i];
		     i++, n++)
			if (out)
				fdbox_kho_range_set(&out[n], chunk->phys[i],
						    v->order);
		if (out)
			fdbox_kho_range_set(&out[n], chunk_phys, 0);
		n++;
		chunk_phys = chunk->hdr.next.phys;
	}
	return n;
}

/* Fill a sealed box's release list: its descriptor, folios and folio lists. */
static void fdbox_kho_release_fill(struct fdbox_box *box,
				   struct fdbox_kho_range *r)
{
	struct fdbox_entry *entry;
	u64 n = 0;

	fdbox_kho_range_set(&r[n++], virt_to_phys(box->kho_desc),
			    folio_order(virt_to_folio(box->kho_desc)));
	list_for_each_entry(entry, &box->entries, node) {
		struct fdbox_entry_kho *kho = entry->kho;

		if (!kho->nr_folios)
			continue;
		for (u64 i = 0; i < kho->nr_folios; i++)
			fdbox_kho_range_set(&r[n++],
					    PFN_PHYS(folio_pfn(kho->folios[i])),
					    folio_order(kho->folios[i]));
		n += fdbox_kho_vmalloc_ranges(&kho->ser_kho, &r[n]);
		cond_resched();
	}
}

/*
 * Build and preserve the release list of a box whose entries and descriptor
 * are preserved. Returns 0 or -ENOMEM (or KHO's error), with nothing left.
 */
static int fdbox_kho_release_build(struct fdbox_box *box)
{
	struct fdbox_box_release *rel;
	struct fdbox_entry *entry;
	u64 n = 1;
	int err = -ENOMEM;

	list_for_each_entry(entry, &box->entries, node)
		if (entry->kho->nr_folios)
			n += entry->kho->nr_folios +
			     fdbox_kho_vmalloc_ranges(&entry->kho->ser_kho, NULL);
	rel = kzalloc_obj(*rel);
	if (!rel)
		return -ENOMEM;
	rel->ranges = vcalloc(n, sizeof(*rel->ranges));
	if (!rel->ranges)
		goto err_free;
	fdbox_kho_release_fill(box, rel->ranges);
	rel->nr = n;
	rel->crc = fdbox_crc(rel->ranges, n * sizeof(*rel->ranges));
	err = kho_preserve_vmalloc(rel->ranges, &rel->kho);
	if (err) {
		pr_err_ratelimited("%s: preserving the release list failed: %pe\n",
				   box->name, ERR_PTR(err));
		err = fdbox_kho_errno(err);
		goto err_free;
	}
	box->kho_release = rel;
	return 0;

err_free:
	vfree(rel->ranges);
	kfree(rel);
	return err;
}

static void fdbox_kho_release_drop(struct fdbox_box *box)
{
	struct fdbox_box_release *rel = box->kho_release;

	kho_unpreserve_vmalloc(&rel->kho);
	vfree(rel->ranges);
	kfree(rel);
	box->kho_release = NULL;
}

/* The release list header, beside the root (allocated and added first). */
static int fdbox_kho_rel_get(void)
{
	size_t size = struct_size(fdbox_kho_rel, lists, FDBOX_MAX_BOXES);
	struct fdbox_kho_release *rel;
	int err;

	rel = kho_alloc_preserve(size);
	if (IS_ERR(rel))
		return fdbox_kho_errno(PTR_ERR(rel));
	rel->magic = FDBOX_KHO_RELEASE_MAGIC;
	rel->layout = FDBOX_KHO_RELEASE_LAYOUT;
	rel->handover_version = FDBOX_KHO_VERSION;
	err = kho_add_subtree(FDBOX_KHO_RELEASE_NODE, rel, size);
	if (err) {
		pr_err_ratelimited("adding KHO subtree %s failed: %pe\n",
				   FDBOX_KHO_RELEASE_NODE, ERR_PTR(err));
		kho_unpreserve_free(rel);
		return fdbox_kho_errno(err);
	}
	fdbox_kho_rel = rel;
	return 0;
}

static void fdbox_kho_rel_put(void)
{
	kho_remove_subtree(fdbox_kho_rel);
	kho_unpreserve_free(fdbox_kho_rel);
	fdbox_kho_rel = NULL;
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
	err = fdbox_kho_rel_get();
	if (err)
		return err;
	root = kho_alloc_preserve(size);
	if (IS_ERR(root)) {
		fdbox_kho_rel_put();
		return fdbox_kho_errno(PTR_ERR(root));
	}
	root->magic = FDBOX_KHO_ROOT_MAGIC;
	root->version = FDBOX_KHO_VERSION;
	root->size = struct_size(root, boxes, 0);
	root->crc = fdbox_crc(root, root->size);
	err = kho_add_subtree(FDBOX_KHO_NODE, root, size);
	if (err) {
		pr_err_ratelimited("adding KHO subtree failed: %pe\n",
				   ERR_PTR(err));
		kho_unpreserve_free(root);
		fdbox_kho_rel_put();
		return fdbox_kho_errno(err);
	}
	fdbox_kho_root = root;
	fdbox_kho_rel->root_phys = virt_to_phys(root);
	fdbox_kho_rel->crc = fdbox_crc(fdbox_kho_rel,
				       struct_size(fdbox_kho_rel, lists, 0));
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
	fdbox_kho_rel_put();
}

/* Rewrite the root and the release list header in place from fdbox_sealed. */
static void fdbox_kho_publish_root(void)
{
	struct fdbox_kho_release *rel = fdbox_kho_rel;
	struct fdbox_kho_root *root = fdbox_kho_root;
	struct fdbox_box *box;
	u32 n = 0;

	lockdep_assert_held(&fdbox_kho_lock);
	list_for_each_entry(box, &fdbox_sealed, sealed_node) {
		rel->lists[n] = (struct fdbox_kho_release_list) {
			.ranges = box->kho_release->kho,
			.nr_ranges = box->kho_release->nr,
			.crc = box->kho_release->crc,
		};
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
	if (fdbox_test_corrupt(256))
		root->crc ^= 1;
	rel->nr_lists = n;
	rel->crc = 0;
	rel->crc = fdbox_crc(rel, struct_size(rel, lists, n));
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
 * -ESHUTDOWN (reboot started), -EINTR (a fatal signal: undone),
 * -EOPNOTSUPP (a shmem memfd where LUO carries
 * those, or seals that cannot be carried or held), -EACCES (seals to add to
 * a file not open for writing), -EEXIST (LUO preserves a file), -EFBIG,
 * -ENOMEM (also: the holes of a shmem memfd need more than is available),
 * or -EIO (pinning or KHO failed otherwise: fdbox_kho_errno()).
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
		err = fatal_signal_pending(current) ? -EINTR :
			fdbox_kho_seal_entry(entry);
		if (err)
			goto err_unseal;
		cond_resched();
	}
	box->kho_desc = fdbox_kho_box_desc(box, &box->kho_size);
	if (IS_ERR(box->kho_desc)) {
		err = fdbox_kho_errno(PTR_ERR(box->kho_desc));
		box->kho_desc = NULL;
		goto err_unseal;
	}
	err = fdbox_kho_release_build(box);
	if (err) {
		kho_unpreserve_free(box->kho_desc);
		box->kho_desc = NULL;
		goto err_unseal;
	}
	err = fdbox_test_seal_delay(box);
	if (err) {
		fdbox_kho_release_drop(box);
		kho_unpreserve_free(box->kho_desc);
		box->kho_desc = NULL;
		goto err_unseal;
	}
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
	fdbox_kho_release_drop(box);
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

/* KHO's mark on @page as this module's copy of the union reads it. */
static union fdbox_kho_page_info fdbox_kho_page_info(const struct page *page)
{
	union fdbox_kho_page_info info;

	info.page_private = READ_ONCE(page->private);
#ifdef FDBOX_TEST
	if (test_page_info_skew && info.magic == FDBOX_KHO_PAGE_MAGIC)
		info.order++;
#endif
	return info;
}

/*
 * The runtime half of the check on the copy above (the build-time half is
 * the static_assert): the handover's root is a folio KHO handed over, and
 * its order is get_order() of the subtree's size (kho_alloc_preserve() of
 * that size made it), so its mark must read as exactly that. If it does
 * not, either KHO's layout changed under this module (a stable update) or
 * the root is not what KHO preserved; either way no other mark can be
 * trusted, so nothing is read, claimed or released. Returns 0 or -EPROTO.
 */
static int fdbox_kho_page_info_check(phys_addr_t phys, size_t size)
{
	unsigned long pfn = PHYS_PFN(phys);
	union fdbox_kho_page_info info;
	struct page *page;

	if (!size || !PAGE_ALIGNED(phys) || !pfn_valid(pfn) ||
	    !page_is_ram(pfn))
		return 0;	/* not memory: fdbox_kho_root_check() says so */
	page = pfn_to_online_page(pfn);
	if (!page)
		return 0;
	info = fdbox_kho_page_info(page);
	if (info.magic == FDBOX_KHO_PAGE_MAGIC &&
	    info.order == get_order(size))
		return 0;
	pr_err("KHO's mark on the handover root (page private %#lx) does not read as this module's copy of union kho_page_info (magic %#x, order %u): KHO's layout changed or the root is not what KHO preserved; nothing read, the handover stays reserved until the next reboot\n",
	       info.page_private, FDBOX_KHO_PAGE_MAGIC, get_order(size));
	return -EPROTO;
}

/*
 * KHO's mark on the page at @pfn, which the caller knows is RAM: the order
 * of the folio KHO preserved there, or -1 (not a preserved head, or not
 * online).
 */
static int fdbox_kho_mark_order(unsigned long pfn)
{
	struct page *page = pfn_to_online_page(pfn);
	union fdbox_kho_page_info info;

	if (!page)
		return -1;
	info = fdbox_kho_page_info(page);
	if (info.magic != FDBOX_KHO_PAGE_MAGIC || info.order > INT_MAX)
		return -1;
	return info.order;
}

/*
 * The order of the folio KHO preserved at @phys, or -1 if @phys is not the
 * head of one. Reads only struct page, never the memory. kho_restore_folio()
 * WARNs on a page without the mark; fdbox checks first, so a corrupt
 * handover is refused quietly.
 */
static int fdbox_kho_preserved_order(phys_addr_t phys)
{
	unsigned long pfn = PHYS_PFN(phys);

	if (!phys || !PAGE_ALIGNED(phys) || !pfn_valid(pfn) ||
	    !page_is_ram(pfn))
		return -1;
	return fdbox_kho_mark_order(pfn);
}

/* Is @phys the head of a folio KHO preserved with @order (any if < 0)? */
static bool fdbox_kho_preserved(phys_addr_t phys, int order)
{
	int have = fdbox_kho_preserved_order(phys);

	return have >= 0 && (order < 0 || have == order);
}

/*
 * Claim a preserved folio and free it at once. Returns its size in bytes,
 * or 0 if @phys is not the head of a preserved folio of @order (nothing
 * done).
 */
static u64 fdbox_kho_give_back(phys_addr_t phys, unsigned int order)
{
	struct folio *folio;

	if (order > INT_MAX || !fdbox_kho_preserved(phys, order))
		return 0;
	folio = kho_restore_folio(phys);
	if (!folio)
		return 0;
	folio_put(folio);
	return PAGE_SIZE << order;
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
	kvfree(kho->ser);
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
		loff_t end;
		long nr;

		if (fatal_signal_pending(current)) {
			err = -EINTR;
			break;
		}
		end = min_t(loff_t, size, pos +
				   (loff_t)FDBOX_RESTORE_BATCH * entry->page_size);
		nr = memfd_pin_folios(target, pos, end - 1, dst,
				      FDBOX_RESTORE_BATCH, &offset);

		if (nr <= 0) {
			err = nr ? fdbox_kho_errno(nr) : -EIO;
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
 * anything follows it.
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

/*
 * Call @fn on each data page of a preserved vmalloc area, in order, where
 * it lies (nothing claimed). The chain must have passed
 * fdbox_kho_vmalloc_valid().
 */
static void fdbox_kho_vmalloc_for_each(const struct kho_vmalloc *v,
				       void (*fn)(void *arg, const void *page,
						  u64 idx),
				       void *arg)
{
	phys_addr_t chunk_phys = v->first.phys;
	u64 idx = 0;

	while (chunk_phys) {
		const struct kho_vmalloc_chunk *chunk = phys_to_virt(chunk_phys);

		for (int i = 0; i < ARRAY_SIZE(chunk->phys) && chunk->phys[i];
		     i++)
			fn(arg, phys_to_virt(chunk->phys[i]), idx++);
		chunk_phys = chunk->hdr.next.phys;
		cond_resched();
	}
}

/* Give back every page of a preserved vmalloc area: data, then chunk. */
static void fdbox_kho_vmalloc_give_back(const struct kho_vmalloc *v)
{
	phys_addr_t chunk_phys = v->first.phys;

	while (chunk_phys) {
		const struct kho_vmalloc_chunk *chunk = phys_to_virt(chunk_phys);
		phys_addr_t next = chunk->hdr.next.phys;

		for (int i = 0; i < ARRAY_SIZE(chunk->phys) && chunk->phys[i];
		     i++)
			fdbox_kho_give_back(chunk->phys[i], v->order);
		fdbox_kho_give_back(chunk_phys, 0);
		chunk_phys = next;
		cond_resched();
	}
}

static int fdbox_cmp_u64(const void *a, const void *b)
{
	u64 x = *(const u64 *)a, y = *(const u64 *)b;

	return x < y ? -1 : x > y;
}

/* The pages of a checked vmalloc chain (chunks and data), into @out if set. */
static u64 fdbox_kho_vmalloc_pfns(const struct kho_vmalloc *v, u64 *out)
{
	phys_addr_t chunk_phys = v->first.phys;
	u64 n = 0;

	while (chunk_phys) {
		const struct kho_vmalloc_chunk *chunk = phys_to_virt(chunk_phys);

		for (int i = 0; i < ARRAY_SIZE(chunk->phys) && chunk->phys[i];
		     i++, n++)
			if (out)
				out[n] = PHYS_PFN(chunk->phys[i]);
		if (out)
			out[n] = PHYS_PFN(chunk_phys);
		n++;
		chunk_phys = chunk->hdr.next.phys;
	}
	return n;
}

/* Sort @pfns; -EINVAL if one is there twice. */
static int fdbox_pfns_distinct(u64 *pfns, u64 n)
{
	sort(pfns, n, sizeof(*pfns), fdbox_cmp_u64, NULL);
	for (u64 i = 1; i < n; i++) {
		if (pfns[i] == pfns[i - 1])
			return -EINVAL;
		if (!(i % 4096))
			cond_resched();
	}
	return 0;
}

/*
 * No page twice in what a box claims: its descriptor, every entry's folios,
 * and the chunk and data pages of every entry's folio list. KHO's mark check
 * passes a pfn as often as it is listed: a second kho_restore_folio() of it
 * would WARN and give NULL, and a list page given back after its entry is
 * claimed would free a folio a later entry of the box is about to claim.
 * (Distinct marked heads cannot overlap otherwise: KHO marks only the head
 * page of a preserved folio.) Across boxes, the mark itself tells: a box
 * naming a page an earlier box claimed or gave back is refused before it
 * claims anything. Returns 0, -EINVAL, or -ENOMEM.
 */
static int fdbox_kho_pfns_unique(struct fdbox_box *box,
				 const struct fdbox_kho_box *desc)
{
	struct fdbox_entry *entry;
	u64 n = 1, *pfns;
	u32 i = 0;
	int err;

	list_for_each_entry(entry, &box->entries, node) {
		if (entry->kho->nr_folios)
			n += entry->kho->nr_folios +
			     fdbox_kho_vmalloc_pfns(&desc->entries[i].folios,
						    NULL);
		i++;
	}
	if (n < 2)
		return 0;
	pfns = fdbox_test_fail(3) ? NULL :
		kvmalloc_array(n, sizeof(*pfns), GFP_KERNEL | __GFP_NOWARN);
	if (!pfns)
		return -ENOMEM;
	n = 0;
	i = 0;
	pfns[n++] = PHYS_PFN(__pa(desc));
	list_for_each_entry(entry, &box->entries, node) {
		const struct fdbox_entry_kho *kho = entry->kho;

		for (u64 j = 0; j < kho->nr_folios; j++)
			pfns[n++] = kho->ser[j].pfn;
		if (kho->nr_folios)
			n += fdbox_kho_vmalloc_pfns(&desc->entries[i].folios,
						    &pfns[n]);
		i++;
		cond_resched();
	}
	err = fdbox_pfns_distinct(pfns, n);
	kvfree(pfns);
	return err;
}

/*
 * The folio list: sorted, aligned, and covering [0, size) with neither
 * overlap nor gap (SEAL pins every page of the file, holes allocated, so a
 * gap would only restore as zeroes what was data). A folio may run past the
 * end of the file: shmem allocates large folios past i_size on purpose
 * (huge=always), so only its start is bounded by the size, and its end by
 * its order (at most MAX_PAGE_ORDER; hugetlb exactly the page size), so no
 * end wraps. The caller bounds the size (fdbox_kho_entry_valid()). Returns
 * 0 or -EINVAL.
 */
static int fdbox_kho_folio_list_valid(const struct fdbox_kho_entry *e,
				      const struct fdbox_preserved_folio *ser)
{
	u64 pages = DIV_ROUND_UP_ULL(e->size, PAGE_SIZE);
	u32 min_order = ilog2(e->page_size) - PAGE_SHIFT;
	u32 max_order = e->type == FDBOX_TYPE_MEMFD_HUGETLB ? min_order :
		MAX_PAGE_ORDER;
	u64 next = 0;	/* first index the next folio may start at */

	for (u64 i = 0; i < e->nr_folios; i++) {
		const struct fdbox_preserved_folio *s = &ser[i];

		if (s->reserved || s->order < min_order ||
		    s->order > max_order ||
		    !IS_ALIGNED(s->pfn, 1ULL << s->order) ||
		    !IS_ALIGNED(s->index, 1ULL << s->order) ||
		    s->index != next || s->index >= pages ||
		    !fdbox_kho_preserved(PFN_PHYS(s->pfn), s->order))
			return -EINVAL;
		next = s->index + (1ULL << s->order);
		if (!(i % 4096))
			cond_resched();
	}
	return next < pages ? -EINVAL : 0;
}

struct fdbox_kho_copy_walk {
	void *buf;
	u64 bytes;
};

static void fdbox_kho_copy_page(void *arg, const void *page, u64 idx)
{
	struct fdbox_kho_copy_walk *w = arg;
	u64 off = idx * PAGE_SIZE;

	if (off < w->bytes)
		memcpy(w->buf + off, page, min_t(u64, PAGE_SIZE, w->bytes - off));
}

/*
 * Read an entry's folio list where it lies into this kernel's memory, and
 * check it; nothing is claimed. Returns 0, -EINVAL (damaged), or -ENOMEM
 * (transient: the box is retried later).
 */
static int fdbox_kho_read_folios(const struct fdbox_kho_entry *e,
				 struct fdbox_entry_kho *kho)
{
	struct fdbox_kho_copy_walk w;
	int err;

	kho->nr_folios = e->nr_folios;
	if (!e->nr_folios)
		return e->size ? -EINVAL : 0;	/* SEAL pins every page */
	/* each folio is at least a page of this machine's memory */
	if (e->nr_folios > min_t(u64, DIV_ROUND_UP_ULL(e->size, PAGE_SIZE),
				 totalram_pages()) ||
	    check_mul_overflow(e->nr_folios, (u64)sizeof(*kho->ser), &w.bytes) ||
	    !fdbox_kho_vmalloc_valid(&e->folios,
				     DIV_ROUND_UP_ULL(w.bytes, PAGE_SIZE)))
		return -EINVAL;
	kho->ser = fdbox_test_fail(2) ? NULL :
		kvmalloc(w.bytes, GFP_KERNEL | __GFP_NOWARN);
	if (!kho->ser)
		return -ENOMEM;
	w.buf = kho->ser;
	fdbox_kho_vmalloc_for_each(&e->folios, fdbox_kho_copy_page, &w);
	err = fdbox_crc(kho->ser, w.bytes) != e->folios_crc ? -EINVAL :
		fdbox_kho_folio_list_valid(e, kho->ser);
	if (err)
		return err;
	kho->folios = fdbox_test_fail(4) ? NULL :
		kvcalloc(e->nr_folios, sizeof(*kho->folios),
			 GFP_KERNEL | __GFP_NOWARN);
	return kho->folios ? 0 : -ENOMEM;
}

/*
 * Does KHO still mark every folio the entry lists (none claimed since)? The
 * list passed fdbox_kho_folio_list_valid() in this same restore, which
 * checked each pfn is RAM (page_is_ram() walks the resource tree: once per
 * folio is enough; preserved memory is reserved, so it cannot go offline
 * meanwhile, and pfn_to_online_page() would tell): only the mark is read
 * again.
 */
static bool fdbox_kho_folios_unclaimed(const struct fdbox_entry_kho *kho)
{
	for (u64 i = 0; i < kho->nr_folios; i++) {
		if (fdbox_kho_mark_order(kho->ser[i].pfn) !=
		    (int)kho->ser[i].order)
			return false;
		if (!(i % 4096))
			cond_resched();
	}
	return true;
}

/*
 * Claim every folio of a read entry, and give back the pages of its list
 * (this kernel holds a copy). Cannot fail after fdbox_kho_folios_unclaimed()
 * and fdbox_kho_pfns_unique(): nothing else claims KHO memory meanwhile.
 */
static void fdbox_kho_claim_folios(const struct fdbox_kho_entry *e,
				   struct fdbox_entry_kho *kho)
{
	for (u64 i = 0; i < kho->nr_folios; i++) {
		kho->folios[i] = kho_restore_folio(PFN_PHYS(kho->ser[i].pfn));
		cond_resched();
	}
	if (kho->nr_folios)
		fdbox_kho_vmalloc_give_back(&e->folios);
}

static bool fdbox_kho_entry_valid(const struct fdbox_kho_entry *e)
{
	if (!fdbox_valid_entry_name(e->name, sizeof(e->name)) || e->reserved)
		return false;
	/* a file size this kernel can have: no page count below wraps */
	if (e->size > MAX_LFS_FILESIZE)
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

/* Free a box read from a descriptor whose folios were never claimed. */
static void fdbox_kho_free_unclaimed(struct fdbox_box *box)
{
	struct fdbox_entry *entry, *tmp;

	list_for_each_entry_safe(entry, tmp, &box->entries, node) {
		list_del(&entry->node);
		kvfree(entry->kho->folios);
		kvfree(entry->kho->ser);
		kfree(entry->kho);
		fdbox_entry_free(entry);
	}
	box->nr_entries = 0;
	fdbox_box_free(box);
}

/* Check a box descriptor where it lies: nothing is claimed yet. */
static int fdbox_kho_box_desc_valid(const struct fdbox_kho_box *desc,
				    size_t folio_size)
{
	u32 i;

	if (desc->magic != FDBOX_KHO_BOX_MAGIC ||
	    desc->version != FDBOX_KHO_VERSION || desc->reserved ||
	    desc->nr_entries > FDBOX_MAX_ENTRIES_PER_BOX ||
	    desc->size != struct_size(desc, entries, desc->nr_entries) ||
	    desc->size > folio_size)
		return -EINVAL;
	if (fdbox_crc_unset(desc, desc->size,
			    offsetof(struct fdbox_kho_box, crc)) != desc->crc ||
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

/* One entry of a checked descriptor, its folio list read; claims nothing. */
static int fdbox_kho_entry_from_desc(struct fdbox_box *box,
				     const struct fdbox_kho_entry *e)
{
	struct fdbox_entry *entry;
	int err;

	entry = fdbox_test_fail(1) ? NULL : fdbox_entry_alloc();
	if (!entry)
		return -ENOMEM;
	entry->kho = kzalloc_obj(*entry->kho);
	if (!entry->kho) {
		fdbox_entry_free(entry);
		return -ENOMEM;
	}
	strscpy(entry->name, e->name);
	entry->type = e->type;
	entry->seals = e->seals;
	entry->size = e->size;
	entry->page_size = e->page_size;
	entry->uid = e->uid;
	entry->gid = e->gid;
	entry->ctime = e->ctime;
	/* in the box even on error: fdbox_kho_free_unclaimed() frees it */
	list_add_tail(&entry->node, &box->entries);
	box->nr_entries++;
	box->nr_pending++;
	err = fdbox_kho_read_folios(e, entry->kho);
	cond_resched();
	return err;
}

/*
 * Build a box (unpublished) from a checked descriptor, with every folio
 * list read and checked, and nothing claimed. Returns the box; or
 * ERR_PTR(-ENOMEM) (transient), -EINVAL (damaged) with everything left to
 * KHO.
 */
static struct fdbox_box *fdbox_kho_box_read(const struct fdbox_kho_box *desc)
{
	struct fdbox_box *box;
	int err = 0;

	box = fdbox_test_fail(0) ? NULL : fdbox_box_alloc(desc->name);
	if (!box)
		return ERR_PTR(-ENOMEM);
	box->state = FDBOX_STATE_RESTORED;
	for (u32 i = 0; i < desc->nr_entries && !err; i++)
		err = fdbox_kho_entry_from_desc(box, &desc->entries[i]);
	if (!err)
		err = fdbox_kho_pfns_unique(box, desc);
	if (err) {
		fdbox_kho_free_unclaimed(box);
		return ERR_PTR(err);
	}
	return box;
}

/* Are all the box's folios still KHO's (no earlier box claimed one)? */
static bool fdbox_kho_box_unclaimed(struct fdbox_box *box)
{
	struct fdbox_entry *entry;

	list_for_each_entry(entry, &box->entries, node)
		if (!fdbox_kho_folios_unclaimed(entry->kho))
			return false;
	return true;
}

/* Claim what a read box names, then its descriptor, which is freed. */
static void fdbox_kho_box_claim(struct fdbox_box *box,
				const struct fdbox_kho_box *desc, int order)
{
	struct fdbox_entry *entry;
	u32 i = 0;

	list_for_each_entry(entry, &box->entries, node)
		fdbox_kho_claim_folios(&desc->entries[i++], entry->kho);
	fdbox_kho_give_back(__pa(desc), order);
}

/*
 * Restore and publish the box whose descriptor is at @phys. Everything is
 * read and checked where it lies first; only a box that can be restored
 * whole is claimed. A damaged one is left to KHO with everything it names
 * (-EINVAL); one that met a transient failure (-ENOMEM) too, and is retried.
 */
static int fdbox_kho_restore_box(u32 idx, phys_addr_t phys)
{
	const struct fdbox_kho_box *desc;
	struct fdbox_box *box;
	int order, err;

	order = fdbox_kho_preserved_order(phys);
	if (order < 0) {
		pr_err("box #%u: descriptor at %pa is not preserved memory; refused\n",
		       idx, &phys);
		return -EINVAL;
	}
	desc = phys_to_virt(phys);
	err = fdbox_kho_box_desc_valid(desc, PAGE_SIZE << order);
	if (err) {
		/* not certainly ours: claim nothing, free nothing it names */
		pr_err("box #%u: damaged descriptor; refused, its memory stays reserved\n",
		       idx);
		return err;
	}
	box = fdbox_kho_box_read(desc);
	if (IS_ERR(box)) {
		err = PTR_ERR(box);
		if (err == -ENOMEM)
			pr_warn("box %s: out of memory reading it; pending, retried on the next open or FDBOX_IOC_RESCAN\n",
				desc->name);
		else
			pr_err("box %s: %pe; refused, its memory stays reserved\n",
			       desc->name, box);
		return err;
	}
	if (!fdbox_kho_box_unclaimed(box)) {
		pr_err("box %s: a folio is listed twice; refused, its memory stays reserved\n",
		       desc->name);
		fdbox_kho_free_unclaimed(box);
		return -EINVAL;
	}
	/* published and claimed under its mutex: no lookup sees it half claimed */
	mutex_lock(&box->mutex);
	err = fdbox_box_publish_restored(box);
	if (err) {
		mutex_unlock(&box->mutex);
		pr_err("box %s: %pe; refused, its memory stays reserved\n",
		       desc->name, ERR_PTR(err));
		fdbox_kho_free_unclaimed(box);
		return err;
	}
	fdbox_kho_box_claim(box, desc, order);
	fdbox_box_snapshot(box);
	mutex_unlock(&box->mutex);
	return 0;
}

/* Has an earlier load in this boot taken the handover (kept, marked page)? */
static bool fdbox_kho_consumed(phys_addr_t phys)
{
	unsigned long pfn = PHYS_PFN(phys);

	/* online RAM in the direct map, before a byte of it is read */
	if (!PAGE_ALIGNED(phys) || !pfn_valid(pfn) || !page_is_ram(pfn) ||
	    !pfn_to_online_page(pfn) || fdbox_kho_preserved(phys, -1))
		return false;
	/* RAM, and no longer KHO's: ours since the earlier load */
	return READ_ONCE(((struct fdbox_kho_root *)phys_to_virt(phys))->magic) ==
		FDBOX_KHO_CONSUMED_MAGIC;
}

/*
 * Check the root where it lies, before anything is claimed. Returns 0;
 * -EIO (not preserved memory: nothing to claim); -EPROTONOSUPPORT (a
 * version this module does not read); or -EINVAL (damaged). On the last
 * two the caller leaves the handover untouched.
 */
static int fdbox_kho_root_check(phys_addr_t phys, size_t size)
{
	int order = fdbox_kho_preserved_order(phys);
	const struct fdbox_kho_root *root;

	if (order < 0 || size < sizeof(*root) || size > PAGE_SIZE << order)
		return -EIO;
	root = phys_to_virt(phys);
	if (root->magic != FDBOX_KHO_ROOT_MAGIC)
		return -EINVAL;
	if (root->version != FDBOX_KHO_VERSION)
		return -EPROTONOSUPPORT;
	if (root->reserved || root->nr_boxes > FDBOX_MAX_BOXES ||
	    root->size != struct_size(root, boxes, root->nr_boxes) ||
	    root->size > size)
		return -EINVAL;
	if (fdbox_crc_unset(root, root->size,
			    offsetof(struct fdbox_kho_root, crc)) != root->crc)
		return -EINVAL;
	return 0;
}

/*
 * The release list header of the handover whose root is at @root_phys,
 * checked where it lies; NULL if there is none (a module without release
 * lists sealed it) or it does not check out. *@order: its folio's order.
 */
static const struct fdbox_kho_release *
fdbox_kho_release_find(phys_addr_t root_phys, int *order)
{
	const struct fdbox_kho_release *rel;
	phys_addr_t phys;
	size_t size;

	if (kho_retrieve_subtree(FDBOX_KHO_RELEASE_NODE, &phys, &size))
		return NULL;
	*order = fdbox_kho_preserved_order(phys);
	if (*order < 0 || size < sizeof(*rel) || size > PAGE_SIZE << *order)
		return NULL;
	rel = phys_to_virt(phys);
	if (rel->magic != FDBOX_KHO_RELEASE_MAGIC ||
	    rel->layout != FDBOX_KHO_RELEASE_LAYOUT ||
	    rel->root_phys != root_phys || rel->nr_lists > FDBOX_MAX_BOXES ||
	    struct_size(rel, lists, rel->nr_lists) > size ||
	    fdbox_crc_unset(rel, struct_size(rel, lists, rel->nr_lists),
			    offsetof(struct fdbox_kho_release, crc)) != rel->crc)
		return NULL;
	return rel;
}

/* Bytes of a release list's range array, if its count is plausible. */
static bool fdbox_kho_list_bytes(const struct fdbox_kho_release_list *l,
				 u64 *bytes)
{
	return l->nr_ranges && l->nr_ranges <= totalram_pages() &&
		!l->reserved &&
		!check_mul_overflow(l->nr_ranges,
				    (u64)sizeof(struct fdbox_kho_range), bytes);
}

struct fdbox_kho_crc_walk {
	u64 bytes;
	u32 crc;
};

static void fdbox_kho_crc_page(void *arg, const void *page, u64 idx)
{
	struct fdbox_kho_crc_walk *w = arg;
	u64 off = idx * PAGE_SIZE;

	if (off < w->bytes)
		w->crc = crc32_le(w->crc, page, min_t(u64, PAGE_SIZE,
						      w->bytes - off));
}

/* Is this release list intact (KHO's marks on its chain, count, CRC)? */
static bool fdbox_kho_release_list_valid(const struct fdbox_kho_release_list *l)
{
	struct fdbox_kho_crc_walk w = { .crc = ~0U };

	if (!fdbox_kho_list_bytes(l, &w.bytes) ||
	    !fdbox_kho_vmalloc_valid(&l->ranges,
				     DIV_ROUND_UP_ULL(w.bytes, PAGE_SIZE)))
		return false;
	fdbox_kho_vmalloc_for_each(&l->ranges, fdbox_kho_crc_page, &w);
	return (w.crc ^ ~0U) == l->crc;
}

struct fdbox_kho_release_walk {
	u64 nr_ranges;	/* ranges in the list */
	u64 folios;	/* given back */
	u64 bytes;	/* given back */
	u64 skipped;	/* not preserved (claimed or never ours) */
};

static void fdbox_kho_release_page(void *arg, const void *page, u64 idx)
{
	const struct fdbox_kho_range *r = page;
	struct fdbox_kho_release_walk *w = arg;
	u64 per_page = PAGE_SIZE / sizeof(*r);
	u64 first = idx * per_page;

	for (u64 i = 0; i < per_page && first + i < w->nr_ranges; i++) {
		u64 got = r[i].reserved ? 0 :
			fdbox_kho_give_back(r[i].phys, r[i].order);

		if (got) {
			w->folios++;
			w->bytes += got;
		} else {
			w->skipped++;
		}
		if (!(i % 64))
			cond_resched();
	}
}

/* Give back what a checked release list names, then the list itself. */
static void fdbox_kho_release_list_free(const struct fdbox_kho_release_list *l,
					struct fdbox_kho_release_walk *w)
{
	w->nr_ranges = l->nr_ranges;
	fdbox_kho_vmalloc_for_each(&l->ranges, fdbox_kho_release_page, w);
	fdbox_kho_vmalloc_give_back(&l->ranges);
}

/*
 * After a box is restored, its release list names memory the restored
 * entries own now: give back the list's own pages. The lists of refused
 * boxes stay reserved, as the boxes' memory does.
 */
static void fdbox_kho_release_list_drop(const struct fdbox_kho_root *root,
					u32 idx)
{
	const struct fdbox_kho_release *rel;
	u64 bytes;
	int order;

	rel = fdbox_kho_release_find(__pa(root), &order);
	if (rel && rel->nr_lists == root->nr_boxes &&
	    fdbox_kho_list_bytes(&rel->lists[idx], &bytes) &&
	    fdbox_kho_vmalloc_valid(&rel->lists[idx].ranges,
				    DIV_ROUND_UP_ULL(bytes, PAGE_SIZE)))
		fdbox_kho_vmalloc_give_back(&rel->lists[idx].ranges);
}

/* No box pending any more: give back the release list header. */
static void fdbox_kho_release_header_drop(const struct fdbox_kho_root *root)
{
	const struct fdbox_kho_release *rel;
	int order;

	rel = fdbox_kho_release_find(__pa(root), &order);
	if (rel)
		fdbox_kho_give_back(__pa(rel), order);
}

/* Claim a checked root; it is kept, marked consumed, for this boot. */
static struct fdbox_kho_root *fdbox_kho_root_claim(phys_addr_t phys)
{
	struct folio *folio = kho_restore_folio(phys);

	return folio ? folio_address(folio) : NULL;
}

static void fdbox_kho_root_consume(struct fdbox_kho_root *root)
{
	/* the root page stays allocated for the life of this kernel */
	WRITE_ONCE(root->magic, FDBOX_KHO_CONSUMED_MAGIC);
}

/*
 * Boxes of the claimed root (kept for the boot) not restored yet because of
 * a transient failure (-ENOMEM): retried on open and FDBOX_IOC_RESCAN.
 * While any is pending the module holds a reference to itself, so an unload
 * cannot lose them. fdbox_kho_restore_lock protects all of it; it comes
 * before any box mutex.
 */
static DEFINE_MUTEX(fdbox_kho_restore_lock);
static const struct fdbox_kho_root *fdbox_kho_in_root;
static DECLARE_BITMAP(fdbox_kho_pending, FDBOX_MAX_BOXES);
static int fdbox_kho_refused;	/* first error a box was refused with */

/*
 * Try every pending box once. Returns the restore status: the first
 * refusal, else -ENOMEM while a box is pending, else 0.
 */
static int fdbox_kho_restore_pending(u32 *restored, u32 *pending)
{
	const struct fdbox_kho_root *root = fdbox_kho_in_root;
	bool had_pending;
	u32 n, nr_restored = 0, nr_refused = 0;
	int err;

	lockdep_assert_held(&fdbox_kho_restore_lock);
	*restored = 0;
	*pending = 0;
	if (!root)
		return fdbox_kho_refused;
	had_pending = !bitmap_empty(fdbox_kho_pending, root->nr_boxes);
	for_each_set_bit(n, fdbox_kho_pending, root->nr_boxes) {
		err = fdbox_kho_restore_box(n, root->boxes[n]);
		if (err == -ENOMEM) {
			(*pending)++;
			continue;
		}
		__clear_bit(n, fdbox_kho_pending);
		if (!err) {
			nr_restored++;
			fdbox_kho_release_list_drop(root, n);
		} else {
			nr_refused++;
			if (!fdbox_kho_refused)
				fdbox_kho_refused = err;
		}
		cond_resched();
	}
	if (nr_restored)
		WRITE_ONCE(fdbox_kho_restored, true);
	if (had_pending && !*pending) {
		fdbox_kho_release_header_drop(root);
		module_put(THIS_MODULE);
	}
	if (*pending || nr_refused)
		pr_err("restored %u box(es) from the previous kernel, refused %u, %u pending\n",
		       nr_restored, nr_refused, *pending);
	else if (nr_restored)
		pr_info("restored %u box(es) from the previous kernel\n",
			nr_restored);
	*restored = nr_restored;
	return fdbox_kho_refused ?: (*pending ? -ENOMEM : 0);
}

/* Restore every box a checked, claimed root lists; the restore status. */
static int fdbox_kho_restore_boxes(const struct fdbox_kho_root *root)
{
	u32 restored, pending;

	guard(mutex)(&fdbox_kho_restore_lock);
	fdbox_kho_in_root = root;
	if (!root->nr_boxes)
		return 0;
	bitmap_set(fdbox_kho_pending, 0, root->nr_boxes);
	__module_get(THIS_MODULE);	/* put when none is pending */
	return fdbox_kho_restore_pending(&restored, &pending);
}

/**
 * fdbox_kho_rescan - retry the boxes a transient failure left pending.
 * @restored: out: boxes restored now.
 * @pending:  out: boxes still pending.
 *
 * Context: Process context; takes fdbox_kho_restore_lock, then box mutexes.
 *
 * Return: the restore status: the first error a box was refused with, else
 * -ENOMEM while a box is pending, else 0.
 */
int fdbox_kho_rescan(u32 *restored, u32 *pending)
{
	guard(mutex)(&fdbox_kho_restore_lock);
	return fdbox_kho_restore_pending(restored, pending);
}

/**
 * fdbox_kho_pending_any - is a box of the previous kernel still pending?
 *
 * Context: Any; a hint (unlocked read).
 */
bool fdbox_kho_pending_any(void)
{
	const struct fdbox_kho_root *root = READ_ONCE(fdbox_kho_in_root);

	return root && !bitmap_empty(fdbox_kho_pending, root->nr_boxes);
}

/* Say why the handover at @phys is left untouched, and remember it. */
static void fdbox_kho_hold(phys_addr_t phys, int err)
{
	const struct fdbox_kho_root *root = phys_to_virt(phys);

	if (err == -EPROTONOSUPPORT)
		pr_err("the previous kernel's handover has version %u, this module reads %u: left untouched for a module of that version; FDBOX_IOC_RELEASE_HANDOVER (fdboxctl release-handover) gives its memory back instead\n",
		       root->version, FDBOX_KHO_VERSION);
	else
		pr_err("the previous kernel's handover root is damaged: left untouched; FDBOX_IOC_RELEASE_HANDOVER (fdboxctl release-handover) gives its memory back\n");
	guard(mutex)(&fdbox_kho_held_lock);
	fdbox_kho_held = phys;
}

/**
 * fdbox_kho_init - take the boxes the previous kernel handed over.
 *
 * The root is checked where it lies before anything is claimed: a handover
 * of another version, or with a damaged root, is left to KHO untouched (a
 * module of its version loaded later restores it; RELEASE_HANDOVER gives
 * its memory back).
 *
 * Context: Module init, after /dev/fdbox is registered, before it opens.
 *
 * Return: 0 (also when there was nothing to take), or the error of the
 * first part of the handover that was refused: -EPROTO (KHO's page mark
 * does not read as this module expects: nothing read, left untouched);
 * -EPROTONOSUPPORT (another version, left untouched); -EINVAL (damaged:
 * the root, left untouched, or a box); -EIO (memory KHO did not give
 * back); -ENOMEM (a box is pending: nothing of it was claimed,
 * fdbox_kho_rescan() retries it). Every box that could be restored is,
 * whatever the return value.
 */
int fdbox_kho_init(void)
{
	struct fdbox_kho_root *root;
	phys_addr_t phys;
	size_t size;
	int err;

	if (!is_kho_boot())
		return 0;
	err = kho_retrieve_subtree(FDBOX_KHO_NODE, &phys, &size);
	if (err == -ENOENT)
		return 0;
	if (err)
		return err;
	if (fdbox_kho_consumed(phys))
		return 0;
	err = fdbox_kho_page_info_check(phys, size);
	if (err)
		return err;
	err = fdbox_kho_root_check(phys, size);
	if (err == -EIO)
		pr_err("root descriptor at %pa is not preserved memory\n", &phys);
	if (err == -EINVAL || err == -EPROTONOSUPPORT)
		fdbox_kho_hold(phys, err);
	if (err)
		return err;
	root = fdbox_kho_root_claim(phys);
	if (!root)
		return -EIO;
	fdbox_kho_root_consume(root);
	return fdbox_kho_restore_boxes(root);
}

/*
 * Check every list before giving anything back: a release is whole, or
 * nothing happens.
 */
static int fdbox_kho_release_check(const struct fdbox_kho_release *rel)
{
	for (u32 i = 0; i < rel->nr_lists; i++)
		if (!fdbox_kho_release_list_valid(&rel->lists[i]))
			return -EIO;
	return 0;
}

/**
 * fdbox_kho_release_handover - give back the memory of a handover this
 * module left untouched.
 * @folios: out: folios given back.
 * @bytes:  out: their bytes.
 *
 * Frees everything the handover's release lists name (each range only if KHO
 * still marks it preserved with that order), the lists, and their header;
 * the root is claimed and kept, marked consumed, so no later load in this
 * boot looks at the handover again. Logged.
 *
 * Context: Process context; takes fdbox_kho_held_lock.
 *
 * Return: 0; -ENOENT (no handover is held); or -EIO (its release lists are
 * missing or damaged: nothing was freed, it stays reserved until a reboot).
 */
int fdbox_kho_release_handover(u64 *folios, u64 *bytes)
{
	struct fdbox_kho_release_walk w = {};
	const struct fdbox_kho_release *rel;
	struct fdbox_kho_root *root;
	u32 version;
	int order;

	guard(mutex)(&fdbox_kho_held_lock);
	if (!fdbox_kho_held)
		return -ENOENT;
	rel = fdbox_kho_release_find(fdbox_kho_held, &order);
	if (!rel || fdbox_kho_release_check(rel)) {
		pr_err("release: the previous kernel's handover has no intact release list; it stays reserved until the next reboot\n");
		return -EIO;
	}
	version = rel->handover_version;
	for (u32 i = 0; i < rel->nr_lists; i++) {
		struct fdbox_kho_release_walk one = {};

		fdbox_kho_release_list_free(&rel->lists[i], &one);
		w.folios += one.folios;
		w.bytes += one.bytes;
		w.skipped += one.skipped;
	}
	fdbox_kho_give_back(__pa(rel), order);
	root = fdbox_kho_root_claim(fdbox_kho_held);
	if (root)
		fdbox_kho_root_consume(root);
	fdbox_kho_held = 0;
	pr_info("released the previous kernel's handover (version %u): %llu folio(s), %llu KiB given back, %llu range(s) not preserved skipped\n",
		version, w.folios, w.bytes >> 10, w.skipped);
	*folios = w.folios;
	*bytes = w.bytes;
	return 0;
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
