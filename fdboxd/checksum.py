"""Checksums of held memory: what seal records and what restore checks.

A VM is stopped while its box is sealed and again until it is restored, so integrity
checking is on the blackout path. Its cost is the operator's choice,
``fdboxd --verify=full|sample|none``:

- ``full``: the SHA-256 of every byte (``Entry.sha256``, the plain SHA-256 a client can
  compute itself). Cost grows with RAM: about 1.4 GB/s per core on the development
  host, roughly ten times slower under TCG.
- ``sample`` (default, see the README for the measurements): entries up to
  :data:`SAMPLE_WHOLE` bytes are hashed whole as above; larger ones get a *sample
  digest* over :data:`SAMPLE_BLOCKS` blocks of :data:`SAMPLE_BLOCK` bytes at seeded,
  stratified offsets (one per 1/64th of the file, salt recorded), plus the size. Cost is
  constant per entry, so restore stays flat in RAM size; it catches a truncated,
  shifted, zeroed or wrong file, not a single flipped bit.
- ``none``: the size only.

Reading is done with ``pread`` into one reused buffer, never by mapping the file
(mapping a sparse memfd to hash it would allocate every hole), and holes found with
``SEEK_DATA``/``SEEK_HOLE`` are hashed as zeros without being read. ``hashlib`` and
``preadv`` release the GIL, so :func:`digest_many` hashes entries in parallel threads,
one per CPU; a single entry is one thread (SHA-256 is sequential), and reports its
progress per chunk so a large entry does not look stuck.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class Verify(str, enum.Enum):
    FULL = "full"
    SAMPLE = "sample"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


#: The default, chosen from bench measurements (README "Checksums").
DEFAULT_VERIFY = Verify.SAMPLE

CHUNK = 8 << 20  # bytes per pread and per progress report
SAMPLE_WHOLE = 4 << 20  # in sample mode, entries up to this size are hashed whole
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 64 << 10
_SAMPLE_TAG = b"fdbox-sample-v1\0"

_zeros: bytes | None = None


def _zero_chunk() -> bytes:
    global _zeros
    if _zeros is None:
        _zeros = bytes(CHUNK)
    return _zeros


@dataclass(frozen=True)
class Digest:
    """What a seal records for one entry. ``sha256``: whole-file SHA-256 or None;
    ``sample``: ``"s1:<salt>:<hex>"`` or None (see :func:`sample_digest`)."""

    size: int
    sha256: str | None = None
    sample: str | None = None


Progress = Callable[[int], None]  # called with the number of bytes just hashed


def planned_bytes(size: int, mode: Verify) -> int:
    """How many bytes hashing an entry of ``size`` in ``mode`` reads (progress totals)."""
    if mode == Verify.NONE:
        return 0
    if mode == Verify.FULL or size <= SAMPLE_WHOLE:
        return size
    return SAMPLE_BLOCKS * SAMPLE_BLOCK


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The data (non-hole) ranges of ``[start, end)``; all of it if the fs cannot tell."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from pos to EOF
                break
            return [(start, end)]  # EINVAL & co: no hole support, read everything
        if data >= end:
            break
        try:
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        out.append((data, hole))
        pos = hole
    return out


def sha256_fd(fd: int, size: int | None = None, progress: Progress | None = None) -> tuple[int, str]:
    """Size and SHA-256 of the file behind ``fd``, by ``pread`` (no cursor moved, no mapping).

    Holes are hashed as zeros without being read. If the file shrinks meanwhile, the
    digest covers what was there and the returned size says so.
    """
    if size is None:
        size = os.fstat(fd).st_size
    h = hashlib.sha256()
    buf = bytearray(min(CHUNK, max(size, 1)))
    mv = memoryview(buf)
    pos = 0

    def zeros(n: int) -> None:
        z = _zero_chunk()
        while n > 0:
            k = min(n, CHUNK)
            h.update(z[:k] if k < CHUNK else z)
            n -= k
            if progress is not None:
                progress(k)

    for data, hole in data_extents(fd, 0, size) + [(size, size)]:
        zeros(data - pos)
        pos = data
        while pos < hole:
            n = os.preadv(fd, [mv[: min(len(buf), hole - pos)]], pos)
            if n <= 0:  # shrank under us
                return pos, h.hexdigest()
            h.update(mv[:n])
            pos += n
            if progress is not None:
                progress(n)
    return size, h.hexdigest()


def _sample_offsets(size: int, salt: bytes) -> list[int]:
    stride = size // SAMPLE_BLOCKS
    seed = hashlib.sha256(salt).digest()
    offs = []
    for i in range(SAMPLE_BLOCKS):
        r = int.from_bytes(hashlib.sha256(seed + i.to_bytes(4, "little")).digest()[:8], "little")
        off = (i * stride + r % max(stride, 1)) & ~4095
        offs.append(min(off, size - SAMPLE_BLOCK))
    return offs


def sample_digest(fd: int, size: int, salt: bytes, progress: Progress | None = None) -> str:
    """``"s1:<salt hex>:<sha256 hex>"`` over the size and the sampled blocks."""
    h = hashlib.sha256(_SAMPLE_TAG + salt + size.to_bytes(8, "little"))
    for i, off in enumerate(_sample_offsets(size, salt), 1):
        block = os.pread(fd, SAMPLE_BLOCK, off)
        h.update(off.to_bytes(8, "little") + len(block).to_bytes(4, "little"))
        h.update(block)
        if progress is not None and i % 16 == 0:  # four reports per entry
            progress(16 * SAMPLE_BLOCK)
    return f"s1:{salt.hex()}:{h.hexdigest()}"


def digest_fd(fd: int, mode: Verify, progress: Progress | None = None) -> Digest:
    """What to record for one entry at seal time, in ``mode``."""
    size = os.fstat(fd).st_size
    if mode == Verify.NONE:
        return Digest(size)
    if mode == Verify.FULL or size <= SAMPLE_WHOLE:
        size, sha = sha256_fd(fd, size, progress)
        # A full digest also records a sample, so a daemon restoring with
        # --verify=sample can still check a large entry cheaply.
        sample = sample_digest(fd, size, os.urandom(8)) if size > SAMPLE_WHOLE else None
        return Digest(size, sha, sample)
    return Digest(size, None, sample_digest(fd, size, os.urandom(8), progress))


def check_fd(fd: int, recorded: Digest, mode: Verify) -> str | None:
    """Check a restored file against what its seal recorded. None if it passes,
    else the reason. ``mode`` is the restoring daemon's; it uses the best check
    that both it allows and the seal recorded."""
    size = os.fstat(fd).st_size
    if size != recorded.size:
        return f"size {size}, sealed as {recorded.size}"
    if mode == Verify.NONE:
        return None
    use_full = recorded.sha256 is not None and (
        mode == Verify.FULL or recorded.sample is None or size <= SAMPLE_WHOLE)
    if use_full:
        got_size, sha = sha256_fd(fd, size)
        if (got_size, sha) != (recorded.size, recorded.sha256):
            return (f"checksum mismatch: {got_size} bytes sha256 {sha[:16]}…, "
                    f"sealed as {recorded.size} bytes {(recorded.sha256 or '')[:16]}…")
        return None
    if recorded.sample is not None:
        try:
            _, salt_hex, _ = recorded.sample.split(":")
            salt = bytes.fromhex(salt_hex)
        except ValueError:
            return f"unreadable sample digest {recorded.sample!r}"
        got = sample_digest(fd, size, salt)
        if got != recorded.sample:
            return f"sample checksum mismatch: {got[-16:]}, sealed as {recorded.sample[-16:]}"
    return None


def workers(n_items: int) -> int:
    return max(1, min(n_items, os.cpu_count() or 1))


def digest_many(
    fds: Sequence[int], mode: Verify,
    progress: Callable[[int, int], None] | None = None,
) -> list[Digest]:
    """:func:`digest_fd` for many files, one thread per CPU, biggest first.

    ``progress(index, nbytes)`` is called from the worker threads, serialised by a lock,
    after each chunk of entry ``index``. An exception in any entry is raised here after
    the others have stopped.
    """
    if not fds:
        return []
    lock = threading.Lock()

    def one(i: int) -> Digest:
        report = None
        if progress is not None:
            def report(n: int) -> None:
                with lock:
                    progress(i, n)
        return digest_fd(fds[i], mode, report)

    order = sorted(range(len(fds)), key=lambda i: -os.fstat(fds[i]).st_size)
    out: list[Digest | None] = [None] * len(fds)
    with ThreadPoolExecutor(workers(len(fds)), thread_name_prefix="fdbox-sum") as pool:
        futures = {i: pool.submit(one, i) for i in order}
        for i, f in futures.items():
            out[i] = f.result()
    return [d for d in out if d is not None]


def check_many(items: Sequence[tuple[int, Digest]], mode: Verify) -> list[str | None]:
    """:func:`check_fd` for many files in parallel; results in input order."""
    if not items:
        return []
    with ThreadPoolExecutor(workers(len(items)), thread_name_prefix="fdbox-check") as pool:
        return list(pool.map(lambda it: _check_or_reason(*it, mode), items))


def _check_or_reason(fd: int, recorded: Digest, mode: Verify) -> str | None:
    try:
        return check_fd(fd, recorded, mode)
    except OSError as e:
        return f"cannot read: {e}"
