#!/usr/bin/env python3
"""What one ``fdbox-qemu start`` costs on the resume path, beside its floors (issue 28).

    python3 bench/vmm_start.py [--repeat 7] [--ram 64M] [--before DIR]

After a kexec each VM comes back through one ``fdbox-qemu start``: a Python interpreter
starts, imports the start path, asks fdboxd for the box (RAM, devstate), forks its helper
and execs QEMU, which starts and loads the device state. This bench measures, on the
host (TCG, the boot-sector guest of tests/qemu-guest/tick.S, a memory-backend fdboxd),
each piece side by side in one run, the best and the median of ``--repeat``:

- ``python3 -c pass``: the interpreter's own start and exit (the floor of any Python step);
- imports: ``python3 -c 'import fdboxd.qemu.cli'`` to its exit (the modules ``start``
  loads before it does anything), and how many modules that is beyond ``pass``; for
  both, also the child's CPU time (user + system), which a loaded host scatters less;
- ``fdbox-qemu start`` until it execs QEMU (``/proc/PID/exe`` polled every 0.2 ms):
  interpreter + imports + the fdboxd calls + the helper's fork;
- QEMU alone: the same QEMU argv (RAM on a memfd, the guest's arguments) from spawn to its
  QMP greeting, with no Python in front;
- the whole resume of one suspended VM: ``fdbox-qemu start`` until its ``READY=1`` (what
  fdbox-qemu@.service waits for: the guest runs again).

``--python PATH``: the interpreter of the measured rows (default: the one running the
bench; ``/usr/bin/python3`` is what the Debian package's ``fdbox-qemu`` runs, without a
development install's ``.pth`` files in its start). ``--before DIR``: also measure the fdboxd tree in DIR (e.g. ``git archive REV fdboxd |
tar -x -C DIR``) for the interpreter rows, printed beside this tree's: a before/after of a
change to the start path in one run. Numbers are for this host's load at the time: compare
rows with each other. Prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import array
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import qemuguest  # noqa: E402

from fdboxd.client import Client  # noqa: E402
from fdboxd.qemu import vm as vmmod  # noqa: E402
from fdboxd.qemu.qmp import QMPClient  # noqa: E402

EXE_POLL = 0.0002


def env_for(tree: Path) -> dict[str, str]:
    e = qemuguest.env()
    e["PYTHONPATH"] = os.pathsep.join([str(tree), e["PYTHONPATH"]])
    return e


def timed(argv: list[str], tree: Path) -> tuple[float, float]:
    """Spawn to exit and the child's CPU time (user + system), ms (in ``tree``: ``-c``
    and ``-m`` put the working directory first on sys.path)."""
    t = time.monotonic()
    p = subprocess.Popen(argv, env=env_for(tree), cwd=tree, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = (time.monotonic() - t) * 1000
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{argv}: exit {p.returncode}")
    return wall, (ru.ru_utime + ru.ru_stime) * 1000


def modules(python: str, tree: Path, code: str) -> int:
    r = subprocess.run([python, "-c", code + "; import sys; print(len(sys.modules))"], env=env_for(tree),
                       cwd=tree, check=True, capture_output=True, text=True)
    return int(r.stdout)


class Bench:
    def __init__(self, a: argparse.Namespace, tmp: Path) -> None:
        self.a, self.tmp = a, tmp
        self.image = qemuguest.build(tmp / "guest")
        self.socket = str(tmp / "fdboxd.sock")
        self.run_dir = str(tmp / "run")
        self.serial = tmp / "serial"
        self.size = vmmod.parse_size(a.ram)
        self.procs: list[subprocess.Popen[bytes]] = []

    def guest_args(self) -> list[str]:
        args = qemuguest.qemu_args(self.image, self.serial)
        i = args.index("-serial")
        return args[:i] + ["-chardev", f"file,id=ser0,path={self.serial},append=on", "-serial", "chardev:ser0"] \
            + args[i + 2:]

    def setup(self) -> None:
        log = open(self.tmp / "fdboxd.log", "wb")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "fdboxd", "--socket", self.socket, "--state-dir",
                                            str(self.tmp / "state"), "--backend", "memory"], env=env_for(ROOT),
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket):
            if time.monotonic() > deadline:
                raise SystemExit("fdboxd did not start")
            time.sleep(0.02)

    def cli(self, tree: Path, *args: str) -> None:
        subprocess.run(qemuguest.fdbox_qemu_cmd(self.socket, self.run_dir, *args), env=env_for(tree), check=True,
                       stdout=subprocess.DEVNULL)

    def qemu_alone(self) -> float:
        """The QEMU argv fdbox-qemu would exec (RAM on a memfd), spawn to QMP greeting, ms."""
        ram = os.memfd_create("bench-ram", 0)
        os.ftruncate(ram, self.size)
        qmp = str(self.tmp / "alone.qmp")
        argv = vmmod.qemu_argv(vmmod.default_qemu(), [(ram, self.size)], [], qmp) + self.guest_args()
        t = time.monotonic()
        p = subprocess.Popen(argv, pass_fds=[ram], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            while True:
                try:
                    QMPClient(qmp, timeout=10).close()
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    if p.poll() is not None:
                        raise SystemExit(f"QEMU exited: {argv}") from None
                    time.sleep(EXE_POLL)
            return (time.monotonic() - t) * 1000
        finally:
            p.kill()
            p.wait()
            os.close(ram)

    def resume(self, tree: Path, alone: list[float] | None) -> tuple[float, float]:
        """With the VM suspended: time QEMU alone into ``alone`` (if given), then
        ``fdbox-qemu start`` of the VM: (to exec, to READY=1), ms."""
        if alone is not None:
            alone.append(self.qemu_alone())
        with Client(self.socket) as c:
            assert "devstate" in {e["name"] for e in c.list("vm1")["entries"]}
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        path = str(self.tmp / "notify.sock")
        if os.path.exists(path):
            os.unlink(path)
        ns.bind(path)
        ns.settimeout(60)
        log = open(self.tmp / "qemu.log", "ab")
        t = time.monotonic()
        cmd = qemuguest.fdbox_qemu_cmd(self.socket, self.run_dir, "start", "vm1", "--ram", self.a.ram, "--",
                                       *self.guest_args())
        p = subprocess.Popen([self.a.python, *cmd[1:]],
                             env=env_for(tree) | {"NOTIFY_SOCKET": path}, cwd=tree, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=log)
        log.close()
        self.procs.append(p)
        python = os.path.realpath(f"/proc/{p.pid}/exe")
        while True:
            try:
                if os.path.realpath(f"/proc/{p.pid}/exe") != python:
                    break
            except OSError:
                raise SystemExit("fdbox-qemu start died") from None
            time.sleep(EXE_POLL)
        t_exec = time.monotonic()
        while True:
            data, anc, _, _ = ns.recvmsg(4096, socket.CMSG_SPACE(16 * array.array("i").itemsize))
            for level, kind, fds in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(fds[:len(fds) - len(fds) % a.itemsize])
                    for fd in a:
                        os.close(fd)  # a BARRIER=1 pipe: closing it releases the sender
            if b"READY=1" in data.split(b"\n"):
                break
        t_ready = time.monotonic()
        ns.close()
        return (t_exec - t) * 1000, (t_ready - t) * 1000

    def run(self) -> None:
        n = self.a.repeat
        trees = [("this tree", ROOT)] + ([("before", Path(self.a.before).resolve())] if self.a.before else [])
        py = self.a.python
        keys = ("pass", "import", "pass_cpu", "import_cpu", "exec", "ready")
        got: dict[str, list[list[float]]] = {k: [[] for _ in trees] for k in keys}
        alone: list[float] = []
        for _, tree in trees:
            timed([py, "-c", "import fdboxd.qemu.cli"], tree)  # warm: the page cache, __pycache__
        self.setup()
        log = open(self.tmp / "qemu.log", "ab")
        self.procs.append(subprocess.Popen(qemuguest.fdbox_qemu_cmd(self.socket, self.run_dir, "start", "vm1",
                                                                    "--ram", self.a.ram, "--", *self.guest_args()),
                                           env=env_for(ROOT), stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        log.close()
        if len(qemuguest.wait_ticks(self.serial, 2)) < 2:
            raise SystemExit("the guest did not tick")
        # Interleaved, the trees' order alternating, so a change in the host's load hits
        # every row alike; every row of a round right after a suspend (no TCG guest
        # running). Under load the wall times scatter; the CPU times much less.
        order = [list(enumerate(trees)), list(enumerate(trees))[::-1]]
        for k in range(n):
            for j, (i, (_, tree)) in enumerate(order[k % 2]):
                self.cli(ROOT, "suspend", "vm1")
                for key, code in (("pass", "pass"), ("import", "import fdboxd.qemu.cli")):
                    wall, cpu = timed([py, "-c", code], tree)
                    got[key][i].append(wall)
                    got[key + "_cpu"][i].append(cpu)
                e, r = self.resume(tree, alone if j == 0 else None)
                got["exec"][i].append(e)
                got["ready"][i].append(r)
        med = {k: [statistics.median(x) for x in v] for k, v in got.items()}
        best = {k: [min(x) for x in v] for k, v in got.items()}
        a_ms, a_best = statistics.median(alone), min(alone)
        rows = [("python3 -c pass", "pass"), ("python3 -c 'import fdboxd.qemu.cli'", "import"),
                ("  the same, CPU time: pass", "pass_cpu"), ("  the same, CPU time: import", "import_cpu"),
                ("fdbox-qemu start: spawn to exec of QEMU", "exec"), ("QEMU alone: spawn to QMP greeting", "alone"),
                ("fdbox-qemu start (resume): spawn to READY=1", "ready")]
        med["alone"], best["alone"] = [a_ms for _ in trees], [a_best for _ in trees]
        extra = [modules(py, tree, "import fdboxd.qemu.cli") - modules(py, tree, "pass") for _, tree in trees]

        print(f"one VM's resume, best (median) of {n}, ms ({self.a.python}; TCG, {self.a.ram} RAM; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        print(f"{'':<48}" + "".join(f"{label:>18}" for label, _ in trees))
        for label, key in rows:
            print(f"{label:<48}" + "".join(f"{b:>9.1f} ({m:>6.1f})" for b, m in zip(best[key], med[key], strict=True)))
        print(f"{'modules the start path imports beyond pass':<48}" + "".join(f"{m:>18}" for m in extra))
        for i, (label, _) in enumerate(trees):
            exe, ready, imp = best["exec"][i], best["ready"][i], best["import"][i] - best["pass"][i]
            cpu = best["import_cpu"][i] - best["pass_cpu"][i]
            print(f"{label} (best): imports {imp:.0f} ms over python3 -c pass ({cpu:.0f} ms CPU); "
                  f"the interpreter to exec {exe:.0f} ms "
                  f"({exe / ready:.0%} of the resume, {exe - best['pass'][i]:.0f} ms over python3 -c pass); "
                  f"QEMU alone to QMP {a_best:.0f} ms")

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--ram", default="64M")
    ap.add_argument("--before", help="another fdboxd tree (its parent dir) to measure beside this one")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter of the measured rows (e.g. /usr/bin/python3, a package's; default this one)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fdbox-vmm-start-") as tmp:
        b = Bench(a, Path(tmp))
        try:
            b.run()
        finally:
            b.close()


if __name__ == "__main__":
    main()
