/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Userspace interface for /dev/fdbox: named boxes of memory file references
 * that outlive the process that put them in and, once sealed, a kexec.
 *
 * This header is the one definition of the fdbox ioctl numbers and structs.
 * fdboxd/uapi.py mirrors it and tests/unit/test_uapi_header.py checks that
 * the two agree.
 */
#ifndef _UAPI_LINUX_FDBOX_H
#define _UAPI_LINUX_FDBOX_H

#include <linux/ioctl.h>
#include <linux/types.h>

/**
 * DOC: General ioctl format
 *
 * Every ioctl takes a pointer to a struct whose first member is ``__u32 size``,
 * set by userspace to sizeof() the struct it was compiled with. The kernel
 * reads it with copy_struct_from_user(): a smaller struct (older userspace)
 * gets zeroes for the missing tail, a bigger struct (newer userspace) is
 * accepted if the part the kernel does not know is all zero. Output is
 * written back up to min(size, kernel's sizeof). The ioctl numbers are _IO()
 * numbers, as in <linux/liveupdate.h>: the size lives in the struct, so a
 * struct can grow without the number changing.
 *
 * Every ioctl needs CAP_SYS_ADMIN; the device node is 0600 root.
 *
 * Each errno has exactly one meaning on every ioctl:
 *
 *  - EPERM:       the caller lacks CAP_SYS_ADMIN.
 *  - EACCES:      SEAL would have to add seals to an entry whose reference
 *                 is not open for writing (fcntl(F_ADD_SEALS) refuses that
 *                 too).
 *  - ENOTTY:      unknown ioctl number.
 *  - E2BIG:       @size (or a list's @info_size) is larger than a page, or
 *                 @size is larger than the kernel's struct and the unknown
 *                 tail is not all zero.
 *  - EINVAL:      a malformed argument: @size smaller than the first version
 *                 of the struct, a nonzero flags/reserved field, or a name
 *                 that is empty, not NUL-terminated inside its array, or
 *                 breaks the name rules below.
 *  - EFAULT:      a bad user pointer.
 *  - EBADF:       @fd is not an open file descriptor.
 *  - EOPNOTSUPP:  the file behind @fd is not a type fdbox holds (see
 *                 &enum fdbox_entry_type: memfds only, huge pages up to
 *                 2 MiB; guest_memfd is recognised but not accepted), or, on
 *                 SEAL, an entry's file cannot be preserved as it is: seals
 *                 this version cannot carry, or F_SEAL_SEAL set on a hugetlb
 *                 memfd that lacks F_SEAL_GROW, F_SEAL_SHRINK and a write
 *                 seal (the seal rules forbid adding them).
 *  - ENOENT:      no such box, or no such entry in the box; on
 *                 RELEASE_HANDOVER: no previous kernel's handover is held.
 *  - EEXIST:      the box or entry name is taken, or the file is already
 *                 held elsewhere: an entry of some box, or preserved by the
 *                 Live Update Orchestrator (its mapping is frozen).
 *  - EBUSY:       the box's state forbids changing it this way: it is
 *                 sealed (put, remove, delete, seal refused) or restored
 *                 (put, seal refused).
 *  - EBADFD:      the box or entry is not in the state the operation needs:
 *                 UNSEAL on a box that is not sealed, FINISH on a box that is
 *                 not restored, RESTORE_FD on an entry with no preserved data.
 *  - ENODATA:     GET_FD on a restored entry whose data still waits in
 *                 preserved memory; fill it with RESTORE_FD first.
 *  - EMEDIUMTYPE: RESTORE_FD target does not fit the entry: not a memfd of
 *                 the same kind (shmem / hugetlb with the same page size),
 *                 not the entry's size, not empty, not open for writing,
 *                 write-sealed, or with seals the entry's preserved seals
 *                 cannot be applied over (F_SEAL_WRITE also needs it not
 *                 mapped shared-writable).
 *  - ENOSPC:      a limit was reached (see struct fdbox_version).
 *  - EFBIG:       the file is too large to be preserved (more pages than the
 *                 machine has memory: SEAL pins every page).
 *  - ESHUTDOWN:   SEAL/UNSEAL after a reboot or kexec has begun: what is
 *                 sealed then is final.
 *  - ENODEV:      sealing needs Kexec HandOver: the kernel has no
 *                 CONFIG_KEXEC_HANDOVER or was booted without kho=on.
 *  - EOVERFLOW:   a list did not fit the caller's array; @count now holds the
 *                 number needed.
 *  - EIO:         the kernel could not pin, preserve or restore the memory:
 *                 on SEAL, pinning a file or KHO's preservation failed for
 *                 a reason other than memory (the kernel log has KHO's or
 *                 the memory manager's own error); on RESTORE_FD, the
 *                 target could not be pinned, or preserved data from the
 *                 previous kernel could not be restored (a folio was
 *                 missing or not what the descriptor said); on
 *                 RELEASE_HANDOVER: the handover has no intact release
 *                 list, nothing was freed.
 *  - EINTR:       a fatal signal arrived while the ioctl waited for a box
 *                 or worked (SEAL is undone; RESTORE_FD leaves the entry
 *                 pending).
 *  - ENOMEM:      out of memory; on SEAL also before anything is pinned:
 *                 the holes of a shmem memfd (SEAL allocates every page)
 *                 need more than the machine has available (MemAvailable);
 *                 the kernel log names the sizes.
 *
 * Errors of the memory management and KHO calls the module makes are
 * mapped to these: ENOMEM and EINTR stay, any other is EIO (so an EINVAL,
 * EEXIST or E2BIG of theirs never reads as the caller's mistake).
 */

/*
 * 0xBB, unassigned in Documentation/userspace-api/ioctl/ioctl-number.rst
 * (0xB8 was MSHV's, whose MSHV_INITIALIZE_PARTITION equals the old
 * FDBOX_IOC_VERSION bit for bit). The ABI is pre-1.0: it changed here
 * without a compatibility path.
 */
#define FDBOX_IOCTL_TYPE	0xBB
#define FDBOX_API_VERSION	1

/* ioctl numbers: _IO(FDBOX_IOCTL_TYPE, cmd); each FDBOX_IOC_* sits under its struct. */
enum {
	FDBOX_CMD_VERSION = 0x00,
	FDBOX_CMD_STATS = 0x01,
	FDBOX_CMD_CREATE_BOX = 0x02,
	FDBOX_CMD_DELETE_BOX = 0x03,
	FDBOX_CMD_LIST_BOXES = 0x04,
	FDBOX_CMD_PUT_FD = 0x05,
	FDBOX_CMD_GET_FD = 0x06,
	FDBOX_CMD_REMOVE_ENTRY = 0x07,
	FDBOX_CMD_LIST_ENTRIES = 0x08,
	FDBOX_CMD_SEAL = 0x09,
	FDBOX_CMD_UNSEAL = 0x0a,
	FDBOX_CMD_RESTORE_FD = 0x0b,
	FDBOX_CMD_FINISH = 0x0c,
	FDBOX_CMD_RELEASE_HANDOVER = 0x0d,
	FDBOX_CMD_RESCAN = 0x0e,
};

/* Name arrays, including the terminating NUL. */
#define FDBOX_BOX_NAME_LEN	64	/* ^[A-Za-z0-9][A-Za-z0-9._@+-]{0,62}$ */
#define FDBOX_ENTRY_NAME_LEN	256	/* ^[A-Za-z0-9][A-Za-z0-9._@+=,-]{0,254}$ */

/**
 * enum fdbox_entry_type - what kind of file an entry holds.
 * @FDBOX_TYPE_MEMFD:         an unlinked shmem file (memfd_create()).
 * @FDBOX_TYPE_MEMFD_HUGETLB: an unlinked hugetlbfs file
 *                            (memfd_create(MFD_HUGETLB)).
 * @FDBOX_TYPE_GUEST_MEMFD:   reserved: recognised (its pseudo file system's
 *                            magic) but refused with EOPNOTSUPP.
 */
enum fdbox_entry_type {
	FDBOX_TYPE_MEMFD = 1,
	FDBOX_TYPE_MEMFD_HUGETLB = 2,
	FDBOX_TYPE_GUEST_MEMFD = 3,
};

/**
 * enum fdbox_box_state - the life of a box.
 * @FDBOX_STATE_OPEN:     entries can be put, taken and removed.
 * @FDBOX_STATE_SEALED:   no put/remove; every entry's memory is pinned and
 *                        preserved with KHO, ready for kexec.
 * @FDBOX_STATE_RESTORED: came from the previous kernel; entries are filled
 *                        back with RESTORE_FD, then GET_FD works. FINISH
 *                        frees the entries that were not filled and turns
 *                        the box open.
 */
enum fdbox_box_state {
	FDBOX_STATE_OPEN = 0,
	FDBOX_STATE_SEALED = 1,
	FDBOX_STATE_RESTORED = 2,
};

/* struct fdbox_version.features */
#define FDBOX_FEATURE_KHO	(1U << 0) /* module built with KHO support */
#define FDBOX_FEATURE_KHO_ON	(1U << 1) /* KHO enabled (kho=on): SEAL works */
#define FDBOX_FEATURE_KHO_BOOT	(1U << 2) /* booted by a KHO kexec */
#define FDBOX_FEATURE_RESTORED	(1U << 3) /* boxes came from the previous kernel */
/* LUO's memfd handler is in this kernel: SEAL refuses shmem memfds (EOPNOTSUPP) */
#define FDBOX_FEATURE_SHMEM_LUO	(1U << 4)
/* a previous kernel's handover was left untouched (see RELEASE_HANDOVER) */
#define FDBOX_FEATURE_HANDOVER_HELD	(1U << 5)
/* a previous kernel's box met a transient failure (ENOMEM) at load: RESCAN */
#define FDBOX_FEATURE_RESTORE_PENDING	(1U << 6)

/**
 * struct fdbox_version - ioctl(FDBOX_IOC_VERSION)
 * @size:                Input; sizeof(struct fdbox_version).
 * @api_version:         Output; %FDBOX_API_VERSION.
 * @features:            Output; FDBOX_FEATURE_* bits.
 * @max_boxes:           Output; at most this many boxes exist at once.
 * @max_entries_per_box: Output; at most this many entries in one box.
 * @max_entries:         Output; at most this many entries in all boxes.
 * @restore_status:      Output; 0, or the negative errno with which (part
 *                       of) the previous kernel's handover was refused at
 *                       load; the boxes that were valid are restored anyway.
 *                       -EPROTONOSUPPORT: the handover has another
 *                       FDBOX_KHO_VERSION; -EINVAL with
 *                       %FDBOX_FEATURE_HANDOVER_HELD: its root is damaged.
 *                       Either way nothing of it was touched: a module of
 *                       its version loaded later restores it, or
 *                       RELEASE_HANDOVER gives its memory back. -ENOMEM
 *                       (and %FDBOX_FEATURE_RESTORE_PENDING): a box could
 *                       not be read for lack of memory; nothing of it was
 *                       claimed, and it is retried on each open and by
 *                       RESCAN. -EPROTO: KHO's mark on the
 *                       handover's root does not read as this module
 *                       expects (a KHO layout change): nothing was read,
 *                       claimed or released; it stays reserved until the
 *                       next reboot.
 * @__reserved:          Input; must be zero.
 */
struct fdbox_version {
	__u32	size;
	__u32	api_version;
	__u32	features;
	__u32	max_boxes;
	__u32	max_entries_per_box;
	__u32	max_entries;
	__s32	restore_status;
	__u32	__reserved;
};

#define FDBOX_IOC_VERSION	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_VERSION)

/**
 * struct fdbox_stats - ioctl(FDBOX_IOC_STATS)
 * @size:             Input; sizeof(struct fdbox_stats).
 * @__reserved:       Must be zero.
 * @boxes:            Output; boxes that exist now.
 * @entries:          Output; entries that exist now (all states).
 * @file_refs:        Output; struct file references the module holds now.
 * @pinned_folios:    Output; folios pinned and preserved for sealed boxes.
 * @restored_pending: Output; restored entries not yet filled.
 * @puts:             Output; successful PUT_FD calls since load.
 * @gets:             Output; successful GET_FD calls since load.
 * @removes:          Output; entries removed (REMOVE_ENTRY, DELETE_BOX,
 *                    FINISH) since load.
 *
 * Counters for tests and monitoring: when no box exists, every "now" counter
 * is zero; anything else is a leak.
 */
struct fdbox_stats {
	__u32		size;
	__u32		__reserved;
	__aligned_u64	boxes;
	__aligned_u64	entries;
	__aligned_u64	file_refs;
	__aligned_u64	pinned_folios;
	__aligned_u64	restored_pending;
	__aligned_u64	puts;
	__aligned_u64	gets;
	__aligned_u64	removes;
};

#define FDBOX_IOC_STATS	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_STATS)

/**
 * struct fdbox_box_req - ioctl(FDBOX_IOC_CREATE_BOX, _DELETE_BOX, _SEAL,
 *                              _UNSEAL, _FINISH)
 * @size:  Input; sizeof(struct fdbox_box_req).
 * @flags: Input; must be zero.
 * @box:   Input; the box name, NUL-terminated.
 *
 * CREATE_BOX makes an empty open box. DELETE_BOX drops an open or restored
 * box and every reference (and restored memory) it holds. SEAL pins and
 * preserves every entry with KHO (all or nothing), fixes each file's mapping
 * until UNSEAL (shmem: frozen; hugetlb: F_SEAL_GROW|SHRINK|FUTURE_WRITE;
 * both: F_SEAL_SEAL, only the seals it added are taken off again) and moves
 * the box to sealed. UNSEAL undoes SEAL with nothing lost.
 * FINISH on a restored box releases the preserved memory of entries that were
 * not filled (dropping those entries) and reopens the box.
 */
struct fdbox_box_req {
	__u32	size;
	__u32	flags;
	char	box[FDBOX_BOX_NAME_LEN];
};

#define FDBOX_IOC_CREATE_BOX	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_CREATE_BOX)
#define FDBOX_IOC_DELETE_BOX	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_DELETE_BOX)
#define FDBOX_IOC_SEAL	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_SEAL)
#define FDBOX_IOC_UNSEAL	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_UNSEAL)
#define FDBOX_IOC_FINISH	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_FINISH)

/**
 * struct fdbox_put_fd - ioctl(FDBOX_IOC_PUT_FD)
 * @size:  Input; sizeof(struct fdbox_put_fd).
 * @fd:    Input; the file to hold. The kernel takes its own reference; @fd
 *         stays open and is the caller's to close.
 * @flags: Input; must be zero.
 * @uid:   Input; owner recorded with the entry (opaque to the kernel).
 * @gid:   Input; owner group recorded with the entry (opaque to the kernel).
 * @type:  Output; &enum fdbox_entry_type of the file.
 * @fsize: Output; the file's size when it was put.
 * @box:   Input; the box name.
 * @name:  Input; the entry name.
 */
struct fdbox_put_fd {
	__u32		size;
	__s32		fd;
	__u32		flags;
	__u32		uid;
	__u32		gid;
	__u32		type;
	__aligned_u64	fsize;
	char		box[FDBOX_BOX_NAME_LEN];
	char		name[FDBOX_ENTRY_NAME_LEN];
};

#define FDBOX_IOC_PUT_FD	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_PUT_FD)

/**
 * struct fdbox_get_fd - ioctl(FDBOX_IOC_GET_FD)
 * @size:  Input; sizeof(struct fdbox_get_fd).
 * @flags: Input; must be zero.
 * @fd:    Output; a new O_CLOEXEC file descriptor for the entry's file (the
 *         same open file that was put: offset and status flags are shared).
 *         The entry stays in the box.
 * @type:  Output; &enum fdbox_entry_type.
 * @box:   Input; the box name.
 * @name:  Input; the entry name.
 */
struct fdbox_get_fd {
	__u32	size;
	__u32	flags;
	__s32	fd;
	__u32	type;
	char	box[FDBOX_BOX_NAME_LEN];
	char	name[FDBOX_ENTRY_NAME_LEN];
};

#define FDBOX_IOC_GET_FD	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_GET_FD)

/**
 * struct fdbox_entry_req - ioctl(FDBOX_IOC_REMOVE_ENTRY)
 * @size:  Input; sizeof(struct fdbox_entry_req).
 * @flags: Input; must be zero.
 * @box:   Input; the box name.
 * @name:  Input; the entry name.
 */
struct fdbox_entry_req {
	__u32	size;
	__u32	flags;
	char	box[FDBOX_BOX_NAME_LEN];
	char	name[FDBOX_ENTRY_NAME_LEN];
};

#define FDBOX_IOC_REMOVE_ENTRY	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_REMOVE_ENTRY)

/**
 * struct fdbox_box_info - one element of FDBOX_IOC_LIST_BOXES output.
 * @name:      the box name.
 * @state:     &enum fdbox_box_state.
 * @nr_entries: entries in the box.
 * @total_size: sum of the entries' sizes.
 */
struct fdbox_box_info {
	char		name[FDBOX_BOX_NAME_LEN];
	__u32		state;
	__u32		nr_entries;
	__aligned_u64	total_size;
};

/**
 * struct fdbox_list_boxes - ioctl(FDBOX_IOC_LIST_BOXES)
 * @size:      Input; sizeof(struct fdbox_list_boxes).
 * @count:     Input: elements @boxes has room for; Output: boxes that exist.
 *             If they do not fit, nothing is written and EOVERFLOW returned.
 * @info_size: Input; sizeof(struct fdbox_box_info) as the caller knows it:
 *             the array stride. The kernel writes min(@info_size, its own
 *             sizeof) bytes of each element. Must be at least the first
 *             version's size.
 * @flags:     Input; must be zero.
 * @boxes:     Input; user pointer to an array of struct fdbox_box_info
 *             (may be 0 when @count is 0, to ask for the count).
 *
 * Boxes are listed in creation order.
 */
struct fdbox_list_boxes {
	__u32		size;
	__u32		count;
	__u32		info_size;
	__u32		flags;
	__aligned_u64	boxes;
};

#define FDBOX_IOC_LIST_BOXES	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_LIST_BOXES)

/* struct fdbox_entry_info.flags */
#define FDBOX_ENTRY_PRESERVED		(1U << 0) /* pinned + KHO-preserved (sealed) */
#define FDBOX_ENTRY_RESTORE_PENDING	(1U << 1) /* data in preserved memory; RESTORE_FD */

/**
 * struct fdbox_entry_info - one element of FDBOX_IOC_LIST_ENTRIES output.
 * @name:      the entry name.
 * @type:      &enum fdbox_entry_type.
 * @flags:     FDBOX_ENTRY_* bits.
 * @fsize:     the file's size (live for an open box; as preserved otherwise).
 * @seals:     the memfd's F_SEAL_* seals (live for an open box; as they were
 *             at SEAL for a sealed or restored entry; RESTORE_FD applies
 *             them).
 * @uid:       owner, as given to PUT_FD.
 * @gid:       owner group, as given to PUT_FD.
 * @ctime:     when the entry was put, seconds since the epoch.
 * @page_size: the file's page size (the huge page size for hugetlb).
 * @__reserved: zero.
 */
struct fdbox_entry_info {
	char		name[FDBOX_ENTRY_NAME_LEN];
	__u32		type;
	__u32		flags;
	__aligned_u64	fsize;
	__u32		seals;
	__u32		uid;
	__u32		gid;
	__u32		__reserved;
	__s64		ctime;
	__aligned_u64	page_size;
};

/**
 * struct fdbox_list_entries - ioctl(FDBOX_IOC_LIST_ENTRIES)
 * @size:      Input; sizeof(struct fdbox_list_entries).
 * @count:     Input: elements @entries has room for; Output: entries in the
 *             box. If they do not fit, nothing is written and EOVERFLOW.
 * @info_size: Input; the array stride, see struct fdbox_list_boxes.
 * @flags:     Input; must be zero.
 * @entries:   Input; user pointer to an array of struct fdbox_entry_info.
 * @box:       Input; the box name.
 *
 * Entries are listed in the order they were put.
 */
struct fdbox_list_entries {
	__u32		size;
	__u32		count;
	__u32		info_size;
	__u32		flags;
	__aligned_u64	entries;
	char		box[FDBOX_BOX_NAME_LEN];
};

#define FDBOX_IOC_LIST_ENTRIES	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_LIST_ENTRIES)

/**
 * struct fdbox_restore_fd - ioctl(FDBOX_IOC_RESTORE_FD)
 * @size:  Input; sizeof(struct fdbox_restore_fd).
 * @fd:    Input; an empty memfd the caller created, of the entry's kind
 *         (MFD_HUGETLB with the same huge page size for hugetlb entries;
 *         MFD_ALLOW_SEALING if the caller wants to re-apply seals), already
 *         ftruncate()d to the entry's size. The caller keeps @fd.
 * @flags: Input; must be zero.
 * @__reserved: Input; must be zero.
 * @box:   Input; the box name.
 * @name:  Input; the entry name.
 *
 * Copies the entry's preserved memory from the previous kernel into @fd,
 * applies the entry's preserved seals to it, frees the preserved memory, and
 * makes @fd's file the entry's file (GET_FD works from then on). Out-of-tree
 * code cannot put preserved folios back into a shmem or hugetlbfs mapping,
 * hence the copy. @fd must be open for writing, empty, and have no seals but
 * the entry's (create it with MFD_ALLOW_SEALING if the entry has seals
 * other than F_SEAL_SEAL). The box stays restored until FINISH.
 */
struct fdbox_restore_fd {
	__u32	size;
	__s32	fd;
	__u32	flags;
	__u32	__reserved;
	char	box[FDBOX_BOX_NAME_LEN];
	char	name[FDBOX_ENTRY_NAME_LEN];
};

#define FDBOX_IOC_RESTORE_FD	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_RESTORE_FD)

/**
 * struct fdbox_release_handover - ioctl(FDBOX_IOC_RELEASE_HANDOVER)
 * @size:   Input; sizeof(struct fdbox_release_handover).
 * @flags:  Input; must be zero.
 * @folios: Output; preserved folios given back.
 * @bytes:  Output; their size in bytes.
 *
 * Gives back the memory of a previous kernel's handover the module left
 * untouched at load (%FDBOX_FEATURE_HANDOVER_HELD: another FDBOX_KHO_VERSION,
 * or a damaged root), as the handover's release list names it; its boxes are
 * gone for good. Logged in the kernel log. Use it when no module that can
 * read the handover will come; otherwise load that module instead.
 */
struct fdbox_release_handover {
	__u32		size;
	__u32		flags;
	__aligned_u64	folios;
	__aligned_u64	bytes;
};

#define FDBOX_IOC_RELEASE_HANDOVER	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_RELEASE_HANDOVER)

/**
 * struct fdbox_rescan - ioctl(FDBOX_IOC_RESCAN)
 * @size:     Input; sizeof(struct fdbox_rescan).
 * @flags:    Input; must be zero.
 * @restored: Output; boxes of the previous kernel restored by this call.
 * @pending:  Output; boxes still pending (a transient failure again).
 *
 * Retries the previous kernel's boxes that a transient failure (ENOMEM) kept
 * from being restored at load (%FDBOX_FEATURE_RESTORE_PENDING). Nothing of
 * a pending box is claimed or freed, so a retry loses nothing. Every open of
 * /dev/fdbox retries too; this is the explicit form.
 */
struct fdbox_rescan {
	__u32	size;
	__u32	flags;
	__u32	restored;
	__u32	pending;
};

#define FDBOX_IOC_RESCAN	_IO(FDBOX_IOCTL_TYPE, FDBOX_CMD_RESCAN)

#endif /* _UAPI_LINUX_FDBOX_H */
