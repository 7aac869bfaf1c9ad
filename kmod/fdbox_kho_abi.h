/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fdbox: the layout that crosses a kexec (Kexec HandOver subtree "fdbox").
 */
#ifndef _FDBOX_KHO_ABI_H
#define _FDBOX_KHO_ABI_H

#include <linux/build_bug.h>
#include <linux/types.h>
#include <linux/kho/abi/kexec_handover.h>

#include "include/uapi/linux/fdbox.h"

/**
 * DOC: fdbox handover ABI
 *
 * The old kernel's fdbox.ko writes these structures into KHO-preserved memory
 * and the new kernel's fdbox.ko reads them; the two modules may be built from
 * different sources. The KHO subtree "fdbox" is a struct fdbox_kho_root; it
 * lists the physical addresses of struct fdbox_kho_box descriptors (each in
 * its own kho_alloc_preserve() allocation), whose entries point to arrays of
 * struct fdbox_preserved_folio in KHO-preserved vmalloc memory.
 *
 * This interface is a contract. Any modification to the structure layout
 * constitutes a breaking change and needs a new %FDBOX_KHO_VERSION; the
 * static_assert()s below turn an accidental change into a build error.
 * Every reserved field is written as zero and refused when it is not.
 *
 * Beside it, the KHO subtree "fdbox-release" (struct fdbox_kho_release) lists
 * everything the handover preserves as flat (phys, order) ranges, in a
 * layout that never changes (%FDBOX_KHO_RELEASE_LAYOUT): a module that cannot
 * read the handover's version leaves the handover untouched, and can still
 * give all of its memory back when asked to (FDBOX_IOC_RELEASE_HANDOVER).
 *
 * Each subtree's size is the size given to kho_alloc_preserve() for it: the
 * next kernel checks that KHO's mark on the root reads as that order.
 */

#define FDBOX_KHO_NODE			"fdbox"
/*
 * The FDBOX_TEST=1 build may be given another version (make
 * FDBOX_KHO_VERSION=N), so the VM tier can hand over what this one cannot read.
 */
#ifdef FDBOX_TEST_KHO_VERSION
#define FDBOX_KHO_VERSION		FDBOX_TEST_KHO_VERSION
#else
#define FDBOX_KHO_VERSION		1
#endif
#define FDBOX_KHO_ROOT_MAGIC		0x544f4f5258424446ULL	/* "FDBXROOT" */
#define FDBOX_KHO_BOX_MAGIC		0x584f425f58424446ULL	/* "FDBX_BOX" */
#define FDBOX_KHO_CONSUMED_MAGIC	0x4445535558424446ULL	/* "FDBXUSED" */

/**
 * struct fdbox_preserved_folio - one folio of an entry.
 * @pfn:      page frame number of the folio's head page.
 * @index:    the folio's page offset in the file.
 * @order:    the folio's order.
 * @reserved: zero.
 */
struct fdbox_preserved_folio {
	u64 pfn;
	u64 index;
	u32 order;
	u32 reserved;
} __packed;
static_assert(sizeof(struct fdbox_preserved_folio) == 24);

/**
 * struct fdbox_kho_entry - one entry in a box descriptor.
 * @name:       entry name, NUL-terminated.
 * @type:       &enum fdbox_entry_type.
 * @seals:      F_SEAL_* the memfd had when the box was sealed.
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
static_assert(sizeof(struct kho_vmalloc) == 16);
static_assert(sizeof(struct fdbox_kho_entry) == 328);

/**
 * struct fdbox_kho_box - descriptor of one sealed box.
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
static_assert(sizeof(struct fdbox_kho_box) == 96);

/**
 * struct fdbox_kho_root - the "fdbox" KHO subtree.
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
static_assert(sizeof(struct fdbox_kho_root) == 32);

/**
 * DOC: fdbox release list
 *
 * Every version of the module writes and reads this layout the same way; it
 * is never extended in place (a change would be a new subtree name). The
 * subtree "fdbox-release" is a struct fdbox_kho_release. Its list @lists[i]
 * belongs to the box the root's @boxes[i] points to and names, as (phys,
 * order) ranges, every folio that box preserved: its descriptor, each
 * entry's folios, and the pages of each entry's folio list. Each range is
 * exactly one KHO preservation (one mark on one head page), so it is given
 * back with kho_restore_folio() and folio_put(). The root (@root_phys) is
 * not in any list: it is kept, marked %FDBOX_KHO_CONSUMED_MAGIC, once the
 * handover is restored or released.
 */
#define FDBOX_KHO_RELEASE_NODE		"fdbox-release"
#define FDBOX_KHO_RELEASE_MAGIC		0x4c45455258424446ULL	/* "FDBXREEL" */
#define FDBOX_KHO_RELEASE_LAYOUT	1

/**
 * struct fdbox_kho_range - one preserved folio.
 * @phys:     physical address of its head page.
 * @order:    its order.
 * @reserved: zero.
 */
struct fdbox_kho_range {
	u64 phys;
	u32 order;
	u32 reserved;
} __packed;
static_assert(sizeof(struct fdbox_kho_range) == 16);

/**
 * struct fdbox_kho_release_list - the ranges of one sealed box.
 * @ranges:    KHO vmalloc preservation of struct fdbox_kho_range[@nr_ranges].
 * @nr_ranges: elements in @ranges.
 * @crc:       CRC32 of the range array.
 * @reserved:  zero.
 */
struct fdbox_kho_release_list {
	struct kho_vmalloc ranges;
	u64 nr_ranges;
	u32 crc;
	u32 reserved;
} __packed;
static_assert(sizeof(struct fdbox_kho_release_list) == 32);

/**
 * struct fdbox_kho_release - the "fdbox-release" KHO subtree.
 * @magic:            %FDBOX_KHO_RELEASE_MAGIC.
 * @layout:           %FDBOX_KHO_RELEASE_LAYOUT.
 * @handover_version: the %FDBOX_KHO_VERSION of the root it goes with.
 * @root_phys:        physical address of that root (struct fdbox_kho_root).
 * @nr_lists:         elements in @lists (the root's nr_boxes).
 * @crc:              CRC32 of the first @nr_lists lists' worth of this
 *                    struct, with @crc zero.
 * @lists:            one per box, in the root's order.
 */
struct fdbox_kho_release {
	u64 magic;
	u32 layout;
	u32 handover_version;
	u64 root_phys;
	u32 nr_lists;
	u32 crc;
	struct fdbox_kho_release_list lists[];
} __packed;
static_assert(sizeof(struct fdbox_kho_release) == 32);

#endif /* _FDBOX_KHO_ABI_H */
