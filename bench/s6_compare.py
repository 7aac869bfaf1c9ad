#!/usr/bin/env python3
"""fdboxd beside s6-fdholderd, same work, same machine, one run: prints the ratios.

Both daemons are driven by small C clients built here from ``bench/clients/``: s6's
through its own library (libs6, Debian's ``libs6-dev``), fdboxd's over raw Varlink with
libc only, so neither side pays for a Python client. The workloads are written once
(``harness.h``); only the protocol differs:

- single pairs: store + retrieve + delete of one entry (fdboxd: Put + Get + Remove),
  and each daemon's CPU per request over that run (``/proc/PID/stat``);
- a whole box of 64 back: s6 ``getdump`` on a daemon holding exactly those 64,
  fdboxd ``GetBox``;
- 64 VMs each take back 4 entries at once (a resume after a kexec): 64 processes, one
  connection each, released together; the time until the last has its fds and the p99
  per VM (fdboxd: one ``GetBox`` each; s6, which has no boxes: 4 retrieves each);
- with 10,000 and 100,000 entries held (in boxes of 250): one store + delete
  (Put + Remove), and a full list;
- p50/p99 latency of single requests with 50 concurrent clients (10,000 held);
- RSS of each daemon.

fdboxd runs with the memory backend and its state directory on disk (``--state-dir``
moves it), at its default log level. Every held entry is an fd in each daemon, so a level
needs RLIMIT_NOFILE above it: a level the hard limit cannot hold is reported as
skipped, never estimated. Numbers are printed, never asserted; the end says for each of issue 18's targets whether
this run met it:

    python3 bench/s6_compare.py [--seconds 3] [--levels 10000,100000]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIENTS = Path(__file__).resolve().parent / "clients"
PER_BOX = 250
CONCURRENT = 50
VMS, VM_ENTRIES = 64, 4
#: Issue 18's targets, checked by targets() against the rows.
TARGETS = ("single pairs ≥ 0.5× s6", "a 64-entry box back ≤ 2× s6's time", "daemon CPU per request ≤ 100 µs")


def build(out: Path) -> tuple[Path, Path]:
    cc = os.environ.get("CC", "gcc")
    fdbox, s6 = out / "fdbox_client", out / "s6_client"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(fdbox), str(CLIENTS / "fdbox_client.c")], check=True)
    inc = "/usr/include/" + subprocess.run([cc, "-dumpmachine"], capture_output=True, text=True).stdout.strip()
    subprocess.run([cc, "-O2", "-Wall", f"-I{inc}", "-o", str(s6), str(CLIENTS / "s6_client.c"), "-ls6", "-lskarnet"],
                   check=True)
    return fdbox, s6


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by both daemons
    return hard


def wait_socket(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.05)
        finally:
            s.close()


def start_s6(d: Path, maxfds: int) -> subprocess.Popen[bytes]:
    """s6-fdholder-daemon as its docs show it: a rules dir granting uid its rights by env."""
    env = d / "rules" / "uid" / str(os.getuid()) / "env"
    env.mkdir(parents=True)
    (env.parent / "allow").write_text("")
    for var, val in (("S6_FDHOLDER_STORE_REGEX", ".*"), ("S6_FDHOLDER_RETRIEVE_REGEX", ".*"),
                     ("S6_FDHOLDER_LIST", "1"), ("S6_FDHOLDER_GETDUMP", "1")):
        (env / var).write_text(val + "\n")
    sock = str(d / "s6.sock")
    proc = subprocess.Popen(["s6-fdholder-daemon", "-c", str(max(CONCURRENT, VMS) + 14), "-n", str(maxfds),
                             "-i", str(d / "rules"), sock], stdin=subprocess.DEVNULL)
    wait_socket(sock, proc, "s6-fdholder-daemon")
    return proc


def start_fdboxd(d: Path, state_dir: Path, max_entries: int, tree: Path) -> subprocess.Popen[bytes]:
    sock = str(d / "fdboxd.sock")
    log = open(d / "fdboxd.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdboxd", "--user", "--socket", sock, "--state-dir", str(state_dir),
         "--backend", "memory", "--max-entries", str(max_entries),
         "--max-boxes", str(max_entries // PER_BOX + CONCURRENT + VMS + 16)],
        env={**os.environ, "PYTHONPATH": str(tree)}, cwd=str(tree),  # -m puts the cwd first on sys.path
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    log.close()
    wait_socket(sock, proc, "fdboxd")
    return proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Side:
    def __init__(self, name: str, client: Path, sock: str, proc: subprocess.Popen[bytes]) -> None:
        self.name, self.client, self.sock, self.proc = name, client, sock, proc

    def run(self, *args: object) -> dict[str, float]:
        out = subprocess.run([str(self.client), self.sock, *map(str, args)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{self.name} client {args}: {out.stderr.strip()}")
        return {k: float(v) for k, v in (kv.split("=") for kv in out.stdout.split())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="duration of the single-pair loop")
    p.add_argument("--levels", default="10000,100000", help="entries held for Put+Remove and List")
    p.add_argument("--state-dir", help="parent of fdboxd's state directory (default: a temp dir on disk)")
    p.add_argument("--repeat", type=int, default=300, help="repetitions of the box, Put+Remove and List runs")
    p.add_argument("--fdboxd-tree", type=Path, default=REPO,
                   help="run fdboxd from this checkout (e.g. an older commit, for before/after)")
    a = p.parse_args()
    levels = [int(x) for x in a.levels.split(",") if x]
    hard = raise_nofile()
    if shutil.which("s6-fdholder-daemon") is None:
        raise SystemExit("s6-fdholder-daemon not found: apt-get install s6 libs6-dev skalibs-dev")
    work = Path(tempfile.mkdtemp(prefix="fdbox-s6-bench-", dir="/var/tmp"))
    state = Path(tempfile.mkdtemp(prefix="fdbox-s6-bench-state-", dir=a.state_dir or "/var/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    rows: list[tuple[str, str, float, float, str]] = []  # metric, unit, s6, fdboxd, better
    try:
        fdbox_client, s6_client = build(work)
        room = max(levels + [CONCURRENT * 2]) + 1000
        s6p = start_s6(work, min(room, hard - 64))
        procs.append(s6p)
        fbp = start_fdboxd(work, state, room, a.fdboxd_tree)
        procs.append(fbp)
        sides = [Side("s6-fdholderd", s6_client, str(work / "s6.sock"), s6p),
                 Side("fdboxd", fdbox_client, str(work / "fdboxd.sock"), fbp)]

        def both(metric: str, unit: str, key: str, better: str, *args: object) -> None:
            vals = [s.run(*args)[key] for s in sides]
            rows.append((metric, unit, vals[0], vals[1], better))
            print(f"  {metric}: s6 {vals[0]:.1f} {unit}, fdboxd {vals[1]:.1f} {unit}", flush=True)

        print(f"s6-fdholderd pid {s6p.pid}, fdboxd pid {fbp.pid}; RLIMIT_NOFILE {hard}", flush=True)
        both("whole box of 64 back (getdump / GetBox), median", "us", "median_us", "lower", "box64", a.repeat)
        cpu, pairs = [], []
        for s in sides:
            c0 = cpu_seconds(s.proc.pid)
            out = s.run("pairs", a.seconds)
            cpu.append((cpu_seconds(s.proc.pid) - c0) / (3 * out["pairs"]) * 1e6)
            pairs.append(out["pairs_per_s"])
        rows.append(("single pairs (store+retrieve+delete / Put+Get+Remove)", "pairs/s", pairs[0], pairs[1], "higher"))
        rows.append(("daemon CPU per request, over the pairs", "us", cpu[0], cpu[1], "lower"))
        print(f"  single pairs: s6 {pairs[0]:.0f}/s, fdboxd {pairs[1]:.0f}/s; "
              f"CPU per request s6 {cpu[0]:.1f} us, fdboxd {cpu[1]:.1f} us", flush=True)
        vms = [s.run("vms", VMS, VM_ENTRIES) for s in sides]
        rows.append((f"{VMS} VMs each take back {VM_ENTRIES} entries at once: until all answered", "ms",
                     vms[0]["wall_ms"], vms[1]["wall_ms"], "lower"))
        rows.append((f"{VMS} VMs each take back {VM_ENTRIES} entries at once: p99 per VM", "ms",
                     vms[0]["p99_ms"], vms[1]["p99_ms"], "lower"))
        print(f"  {VMS} VMs x {VM_ENTRIES} entries: all answered s6 {vms[0]['wall_ms']:.1f} ms, "
              f"fdboxd {vms[1]['wall_ms']:.1f} ms; p99 per VM s6 {vms[0]['p99_ms']:.1f} ms, "
              f"fdboxd {vms[1]['p99_ms']:.1f} ms", flush=True)
        held = 0
        for level in levels:
            if level + 200 > hard - 64:
                print(f"  {level} entries held: skipped, RLIMIT_NOFILE hard limit is {hard} "
                      f"(every held entry is an fd in both daemons)", flush=True)
                rows.append((f"{level} held", "skipped", float("nan"), float("nan"), f"RLIMIT_NOFILE {hard}"))
                continue
            for s in sides:
                s.run("fill", (level - held) // PER_BOX, PER_BOX, held // PER_BOX)
            held = level
            both(f"{level} held: one Put+Remove, median", "us", "median_us", "lower", "putremove", a.repeat)
            both(f"{level} held: one Put+Remove, p99", "us", "p99_us", "lower", "putremove", a.repeat)
            both(f"{level} held: full List", "ms", "median_ms", "lower", "list", max(5, a.repeat // 30), level)
            if level == levels[0]:
                both(f"{CONCURRENT} concurrent clients ({level} held), p50", "us", "p50_us", "lower",
                     "conc", CONCURRENT, 300)
                both(f"{CONCURRENT} concurrent clients ({level} held), p99", "us", "p99_us", "lower",
                     "conc", CONCURRENT, 300)
            rss = [rss_mib(s.proc.pid) for s in sides]
            rows.append((f"{level} held: RSS", "MiB", rss[0], rss[1], "lower"))
            print(f"  {level} held: RSS s6 {rss[0]:.1f} MiB, fdboxd {rss[1]:.1f} MiB", flush=True)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)

    print()
    print("| | s6-fdholderd | fdboxd | fdboxd ÷ s6 |")
    print("|---|---|---|---|")
    for metric, unit, s6v, fbv, better in rows:
        if unit == "skipped":
            print(f"| {metric} | skipped | skipped | {better} |")
            continue
        ratio = fbv / s6v if s6v else float("inf")
        word = "(higher is better)" if better == "higher" else "(lower is better)"
        print(f"| {metric} | {s6v:.1f} {unit} | {fbv:.1f} {unit} | {ratio:.2f}× {word} |")
    print()
    for line in targets(rows):
        print(line)
    return 0


def targets(rows: list[tuple[str, str, float, float, str]]) -> list[str]:
    """Issue 18's targets, each met or NOT met by this run's rows."""
    by = {metric: (s6v, fbv) for metric, _, s6v, fbv, _ in rows}
    pairs = by["single pairs (store+retrieve+delete / Put+Get+Remove)"]
    box = by["whole box of 64 back (getdump / GetBox), median"]
    cpu = by["daemon CPU per request, over the pairs"][1]
    checks = [(pairs[1] / pairs[0], pairs[1] >= 0.5 * pairs[0], "×"),
              (box[1] / box[0], box[1] <= 2 * box[0], "×"),
              (cpu, cpu <= 100, " µs")]
    return [f"target: {what}: {value:.2f}{unit} — {'met' if ok else 'NOT met'}"
            for what, (value, ok, unit) in zip(TARGETS, checks, strict=True)]


if __name__ == "__main__":
    sys.exit(main())
