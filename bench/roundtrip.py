#!/usr/bin/env python3
"""Round-trip numbers for fdboxd over its Varlink socket (printed, never asserted).

- put+get round trips per second on one connection, 4 KiB memfd (a Put, a Get, then a
  Remove so the box does not grow; the Remove is timed separately);
- get-only round trips (what the protocol and fd passing cost without a manifest write);
- the time to get a 64-entry box back in one GetBox call (and to put it with PutMany).

Every change (Put, Remove, PutMany) appends one line to the manifest's journal (one
write(), no fsync; see fdboxd/manifest.py), so ``--state-dir /dev/shm`` should change
little; it is kept to show that.

Starts its own daemon (memory backend) on a temporary socket:

    python3 bench/roundtrip.py [--seconds 3] [--entries 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fdboxd.client import Client  # noqa: E402


def start_daemon(rundir: str, state_dir: str | None) -> tuple[subprocess.Popen[bytes], str]:
    sock = os.path.join(rundir, "fdboxd.sock")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdboxd", "--user", "--socket", sock, "--state-dir",
         state_dir or os.path.join(rundir, "state"), "--backend", "memory", "--log-level", "warning"],
        env=env, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"fdboxd exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(sock)
            return proc, sock
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("fdboxd did not start") from None
            time.sleep(0.02)
        finally:
            s.close()


def memfd(size: int) -> int:
    fd = os.memfd_create("bench", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, b"x" * min(size, 4096), 0)
    return fd


def bench_roundtrips(c: Client, seconds: float) -> tuple[int, float, float]:
    fd = memfd(4096)
    n = 0
    rm_time = 0.0
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        c.put("bench", "e", fd)
        _, got = c.get("bench", "e")
        os.close(got)
        t = time.perf_counter()
        c.remove("bench", "e")
        rm_time += time.perf_counter() - t
        n += 1
    elapsed = now - start - rm_time
    os.close(fd)
    return n, elapsed, rm_time


def bench_gets(c: Client, seconds: float) -> tuple[int, float]:
    """Get alone (no manifest write): the protocol and fd-passing cost."""
    fd = memfd(4096)
    c.put("bench", "g", fd)
    os.close(fd)
    n = 0
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        _, got = c.get("bench", "g")
        os.close(got)
        n += 1
    c.remove("bench", "g")
    return n, now - start


def bench_box(c: Client, entries: int, repeat: int) -> tuple[list[float], list[float]]:
    fds = [memfd(4096) for _ in range(entries)]
    puts, gets = [], []
    for r in range(repeat):
        box = f"box{r}"
        t = time.perf_counter()
        c.put_many(box, [(f"slot{i}", fd) for i, fd in enumerate(fds)])
        puts.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = c.get_box(box)
        gets.append(time.perf_counter() - t)
        assert len(got) == entries
        for _, g in got:
            os.close(g)
        c.delete_box(box)
    for fd in fds:
        os.close(fd)
    return puts, gets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="duration of the round-trip loop")
    p.add_argument("--entries", type=int, default=64, help="entries in the GetBox box")
    p.add_argument("--repeat", type=int, default=50, help="GetBox repetitions")
    p.add_argument("--state-dir", help="manifest directory (default: a temp dir)")
    a = p.parse_args()
    rundir = tempfile.mkdtemp(prefix="fdbox-bench-")
    state_dir = tempfile.mkdtemp(prefix="fdbox-bench-state-", dir=a.state_dir) if a.state_dir else None
    proc, sock = start_daemon(rundir, state_dir)
    try:
        with Client(sock) as c:
            n, elapsed, rm_time = bench_roundtrips(c, a.seconds)
            print(f"put+get round trips, 4 KiB memfd, one connection: {n / elapsed:.0f}/s "
                  f"({elapsed / n * 1e6:.0f} us each; {n} in {elapsed:.2f}s; remove {rm_time / n * 1e6:.0f} us)")
            g, gel = bench_gets(c, a.seconds)
            print(f"get-only round trips (no manifest write), one connection: {g / gel:.0f}/s "
                  f"({gel / g * 1e6:.0f} us each)")
            puts, gets = bench_box(c, a.entries, a.repeat)
            print(f"GetBox, {a.entries} entries in one reply: median {statistics.median(gets) * 1e3:.2f} ms, "
                  f"min {min(gets) * 1e3:.2f} ms ({a.repeat} runs)")
            print(f"PutMany, {a.entries} entries in one message: median {statistics.median(puts) * 1e3:.2f} ms, "
                  f"min {min(puts) * 1e3:.2f} ms")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
