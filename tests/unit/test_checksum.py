"""The checksum engine: plain SHA-256 by pread, holes never allocated, the fixed-cost
sample, parallel entries with progress inside a large one, and restore checks."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from fdboxd import checksum
from fdboxd.backends.memory import MemoryBackend
from fdboxd.checksum import SAMPLE_WHOLE, Digest, Verify
from fdboxd.model import Caller
from fdboxd.store import Store, seal_in_worker

MiB = 1 << 20


def memfd(data: bytes = b"", size: int | None = None) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    if data:
        os.pwrite(fd, data, 0)
    if size is not None:
        os.ftruncate(fd, size)
    return fd


def test_full_is_the_plain_sha256() -> None:
    for n in (0, 1, 4095, CH := checksum.CHUNK, CH + 12345):
        data = os.urandom(n)
        fd = memfd(data)
        try:
            assert checksum.sha256_fd(fd) == (n, hashlib.sha256(data).hexdigest())
            assert checksum.digest_fd(fd, Verify.FULL).sha256 == hashlib.sha256(data).hexdigest()
        finally:
            os.close(fd)


def test_holes_are_hashed_as_zeros_and_never_allocated() -> None:
    size = 1 << 30  # 1 GiB holding a few bytes: mapping it to hash would fill it
    fd = memfd(size=size)
    try:
        os.pwrite(fd, b"hello", 300 * MiB)
        os.pwrite(fd, b"world", size - 5)
        before = os.fstat(fd).st_blocks
        got = checksum.sha256_fd(fd)
        assert os.fstat(fd).st_blocks == before  # no hole was filled
        h = hashlib.sha256()
        h.update(bytes(300 * MiB))
        h.update(b"hello")
        h.update(bytes(size - 5 - 300 * MiB - 5))
        h.update(b"world")
        assert got == (size, h.hexdigest())
    finally:
        os.close(fd)


def test_a_zero_filled_file_and_a_sparse_one_agree() -> None:
    a, b = memfd(bytes(3 * MiB)), memfd(size=3 * MiB)
    try:
        assert checksum.sha256_fd(a) == checksum.sha256_fd(b)
    finally:
        os.close(a)
        os.close(b)


def test_sample_is_fixed_cost_and_catches_changes() -> None:
    size = 64 * MiB
    fd = memfd(os.urandom(size))
    try:
        d = checksum.digest_fd(fd, Verify.SAMPLE)
        assert d.sha256 is None and d.sample is not None and d.size == size
        assert checksum.planned_bytes(size, Verify.SAMPLE) == checksum.SAMPLE_BLOCKS * checksum.SAMPLE_BLOCK
        assert checksum.check_fd(fd, d, Verify.SAMPLE) is None
        # zero the first sixteenth: the sample always has a block in every 1/64th
        os.pwrite(fd, bytes(4 * MiB), 0)
        assert "sample checksum mismatch" in (checksum.check_fd(fd, d, Verify.SAMPLE) or "")
        os.ftruncate(fd, size - 4096)
        assert "size" in (checksum.check_fd(fd, d, Verify.SAMPLE) or "")
    finally:
        os.close(fd)


def test_small_entries_get_the_full_sha256_even_in_sample_mode() -> None:
    data = os.urandom(SAMPLE_WHOLE)
    fd = memfd(data)
    try:
        d = checksum.digest_fd(fd, Verify.SAMPLE)
        assert d.sha256 == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


def test_check_uses_what_both_sides_allow() -> None:
    size = 16 * MiB
    fd = memfd(os.urandom(size))
    try:
        full = checksum.digest_fd(fd, Verify.FULL)
        assert full.sha256 and full.sample  # a full seal also records a sample
        os.pwrite(fd, b"X", size // 2 + 1)  # one byte: only the full check sees it (maybe)
        assert "checksum mismatch" in (checksum.check_fd(fd, full, Verify.FULL) or "")
        assert checksum.check_fd(fd, full, Verify.NONE) is None
        assert checksum.check_fd(fd, Digest(size), Verify.FULL) is None  # nothing recorded
    finally:
        os.close(fd)


def test_digest_many_runs_entries_in_parallel_with_progress_inside_each() -> None:
    sizes = [40 * MiB, 3 * MiB, 0, 17 * MiB]
    datas = [os.urandom(n) for n in sizes]
    fds = [memfd(d) for d in datas]
    calls: list[tuple[int, int]] = []
    try:
        got = checksum.digest_many(fds, Verify.FULL, lambda i, n: calls.append((i, n)))
    finally:
        for fd in fds:
            os.close(fd)
    assert [d.sha256 for d in got] == [hashlib.sha256(d).hexdigest() for d in datas]
    assert sum(n for i, n in calls if i == 0) == 40 * MiB
    assert len([1 for i, _ in calls if i == 0]) == 5  # 8 MiB chunks: moves within the entry
    assert sum(n for _, n in calls) == sum(sizes)


def test_seal_in_worker_reports_progress_within_one_large_entry() -> None:
    store = Store(MemoryBackend(), verify=Verify.FULL)
    root = Caller(0, 0)
    fd = memfd(os.urandom(48 * MiB))
    try:
        store.put(root, "vm", "ram0", fd)
    finally:
        os.close(fd)
    seen: list[tuple[str, int, int]] = []

    async def run() -> list[str]:
        return await seal_in_worker(store, root, "vm", lambda it, d, t: seen.append((it.name, d, t)))

    assert asyncio.run(run()) == ["vm"]
    assert len(seen) >= 6 and all(n == "ram0" and t == 48 * MiB for n, _, t in seen)
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen) and seen[-1][1] == 48 * MiB


@pytest.mark.parametrize("mode", list(Verify))
def test_store_records_per_mode(mode: Verify) -> None:
    store = Store(MemoryBackend(), verify=mode)
    root = Caller(0, 0)
    big, small = os.urandom(8 * MiB), os.urandom(MiB)
    for name, data in (("big", big), ("small", small)):
        fd = memfd(data)
        try:
            store.put(root, "vm", name, fd)
        finally:
            os.close(fd)
    store.seal(root, "vm")
    e = store.boxes["vm"].entries
    if mode == Verify.NONE:
        assert e["big"].sha256 is None and "sample" not in e["big"].extra
    else:
        assert e["small"].sha256 == hashlib.sha256(small).hexdigest()
        assert (e["big"].sha256 == hashlib.sha256(big).hexdigest()) == (mode == Verify.FULL)
        assert "sample" in e["big"].extra
