"""The crash matrix: every failpoint of a live update's steps, with an error and with a
kill, on the host; after a restart nothing acknowledged is lost without being named.

Cells: backend × failpoint × action. Backends: ``memory`` (its entries cross a restart
through the fd store, never a kexec: after one they must be *reported* lost),
``kernel-model`` (``--backend kernel``, the real KernelBackend, on tests/kmodmodel.py, a
host-side /dev/fdbox whose boxes outlive every daemon, with a model kexec) and ``luo-model``
(``--backend liveupdate`` on tests/luomodel.py, the host-side /dev/liveupdate, with its
holder process and a model kexec). ``auto`` (LUO beside fdbox.ko) is not a column: its
own code is the split of mixed.py, whose one failpoint needs both devices. Failpoints: every name in :data:`fdboxd.failpoints.FAILPOINTS` under
:data:`PREFIXES`, so a point added anywhere joins the matrix by being declared; a cell
exists where the backend's path can reach the point (:func:`off_path` says why not).
Actions: ``error(EIO)`` (every hit in that daemon process) and ``kill`` (SIGKILL); the
kernel-model column runs ``kill`` only unless ``FDBOX_CRASH_MATRIX=all`` (:data:`SHORT`).

One cell is one small world (a model, a state dir, a service manager) driven through one
cycle: put, seal, unseal, remove + put, seal all (:data:`STEPS`), a restart as a package
upgrade does it, kexec + restore, claim + finish, claim + remove, put, put + delete box.
The daemon runs as under systemd: a NOTIFY_SOCKET whose other end keeps the fd store
(tests/integration/test_systemd.py's ``NotifySocket``) and passes it back in LISTEN_FDS
at each start, until a kexec ends that manager. The failpoint is armed in every daemon
until it fires; the daemon is then restarted unarmed (a kill needs it; an error is
followed by the restart a package upgrade would do) and the cycle goes on. After each
restart that follows a fault, after the upgrade, and after a last restart:

- every acknowledged entry is held or reported lost by name (its bytes are checked
  where it is taken back: the claims, the final restore);
- nothing is held twice (listed twice, or listed and reported lost);
- no LUO session is left without an owner: each outgoing session is held by a live
  process and is one the daemon accounts for (a sealed box, the index, the carried
  manifest); no incoming session is left unretrieved; the device is not held;
- fdbox.ko (model) holds exactly the boxes the daemon lists, in the same states with the
  same entries, and a sealed carried manifest while any box is sealed;
- the next seal / model kexec / restore works and brings back every sealed entry
  byte for byte (memory: reports each lost).

A cell whose point the cycle never reaches fails ("not reached"): a declared failpoint
nobody exercises is a gap. Known bugs of issue 25 are ``xfail(strict=True)`` cells
naming the item (:data:`KNOWN`), so a fix turns them red and the mark goes.
The matrix (cell → outcome) is printed at the end of the run.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import kmodmodel
import luomodel
from fdboxtest import DaemonError, DaemonProcess, make_runtime_dir, memfd_with, wait_for
from test_systemd import NotifySocket, launch_activated

from fdboxd.client import Client
from fdboxd.errors import FdboxError
from fdboxd.failpoints import FAILPOINTS
from fdboxd.lifecycle import CARRY_BOX

PREFIXES = ("seal.", "unseal.", "restore.", "start.", "reconcile.", "adopt.", "finish.", "put.", "remove.",
            "manifest.", "journal.")
POINTS = sorted(n for n in FAILPOINTS if n.startswith(PREFIXES))
ACTIONS = {"error": "error(EIO)", "kill": "kill"}
#: Actions a column runs by default, where not all (CI time: about 3 s of CPU a cell).
#: The kernel column's case is the kill: what the dead daemon left in fdbox.ko, which
#: outlives it, is what only this column has; an error there runs the same rollback as
#: in the other columns, with a live daemon to undo it (all 48 of its cells passed when
#: the column was added). ``FDBOX_CRASH_MATRIX=all`` runs every action everywhere.
SHORT: dict[str, tuple[str, ...]] = {"kernel-model": ("kill",)}
BACKENDS = ("memory", "kernel-model", "luo-model")
REPO = Path(__file__).resolve().parents[2]

#: Files on one backend's path only: a point hit nowhere else gets cells on those
#: backends alone (a LiveupdateBackend is a MemoryBackend; auto's mixed.py needs both devices).
BACKEND_FILES: dict[str, frozenset[str]] = {
    "fdboxd/backends/liveupdate.py": frozenset({"luo-model"}),
    "fdboxd/backends/luo_holder.py": frozenset({"luo-model"}),
    "fdboxd/uapi_luo.py": frozenset({"luo-model"}),
    "fdboxd/backends/kernel.py": frozenset({"kernel-model"}),
    "fdboxd/backends/mixed.py": frozenset(),
    "fdboxd/uapi.py": frozenset({"kernel-model"}),
}


def _hit_files() -> dict[str, set[str]]:
    """Every ``failpoints.hit("NAME")`` under fdboxd/: name → the files that hit it."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "fdboxd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            f = node.func if isinstance(node, ast.Call) else None
            if isinstance(f, ast.Attribute) and f.attr == "hit" and isinstance(f.value, ast.Name) \
                    and f.value.id == "failpoints" and node.args and isinstance(node.args[0], ast.Constant):
                found.setdefault(str(node.args[0].value), set()).add(str(path.relative_to(REPO)))
    return found


def backends_of(point: str, hits: dict[str, set[str]]) -> set[str]:
    """The host backends whose path reaches ``point`` (by where the code hits it)."""
    out: set[str] = set()
    for path in hits.get(point, set()):
        out |= BACKEND_FILES.get(path, frozenset(BACKENDS))
    return out

#: Cells that fail today because of a data-loss bug of issue 25 another branch fixes:
#: (backend or "*", failpoint, action or "*") → the item and what goes wrong. None now:
#: the LUO sessions a failed seal or unseal left without an owner (the "(crash matrix)"
#: cells) are matched to the manifest at start-up (fdboxd/reconcile.py).
KNOWN: dict[tuple[str, str, str], str] = {}

#: Failpoints reached only after another fault: point → the spec armed beside it.
TRIGGERS: dict[str, str] = {
    "seal.rollback": "seal.after_carry=1*error(EIO)",  # a seal that fails after a box is sealed
}

#: Failpoints the cycle does not reach, by prefix → why (no cells; the print lists them).
OFF_CYCLE: dict[str, str] = {
    "manifest.compact_": "compaction runs in a child after 1 MiB of journal (the cycle writes a few KiB)",
}

#: Prefixes a backend never reaches → why (no cells for that backend).
OFF_BACKEND: dict[str, dict[str, str]] = {
    "memory": {"restore.": "nothing crosses a kexec on memory: nothing is restored",
               "finish.": "nothing crosses a kexec on memory: nothing is finished",
               "reconcile.after_carried_read": "nothing crosses a kexec on memory: no manifest is carried",
               "start.before_carry_drop": "nothing crosses a kexec on memory: no manifest is carried"},
    "kernel-model": {"adopt.": "fdbox.ko holds every entry: nothing is mirrored into the fd store, nothing adopted"},
}

#: Failpoints reached only when the model's kexec damages a carried file: point → (box's
#: session, token) whose first byte flips (token 1: the box's first entry by name).
CORRUPT: dict[str, tuple[str, int]] = {
    "restore.verify_drop": ("vm1", 1),  # a proven mismatch is the only drop
}

_RESULTS: dict[tuple[str, str, str], str] = {}

#: The model's world is a network namespace of its own (its holder's reclaim socket, the
#: processes its kexec kills): making one needs root.
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the LUO model's world is a network namespace: needs root")


def _known(backend: str, point: str, action: str) -> str | None:
    for (b, p, a), reason in KNOWN.items():
        if b in ("*", backend) and p == point and a in ("*", action):
            return reason
    return None


def off_path(backend: str, point: str, hits: dict[str, set[str]]) -> str | None:
    """Why ``point`` has no cell on ``backend`` (None: it has)."""
    if backend not in backends_of(point, hits):
        return "not on this backend's path (hit only in another backend's code)"
    for prefix, why in [*OFF_CYCLE.items(), *OFF_BACKEND.get(backend, {}).items()]:
        if point.startswith(prefix):
            return why
    if point in CORRUPT and backend == "memory":
        return "needs a carried file damaged in flight (the model's kexec)"
    return None


def actions_of(backend: str) -> tuple[str, ...]:
    if os.environ.get("FDBOX_CRASH_MATRIX") == "all":
        return tuple(ACTIONS)
    return SHORT.get(backend, tuple(ACTIONS))


def on_path(backend: str, point: str, hits: dict[str, set[str]]) -> bool:
    return off_path(backend, point, hits) is None


def _cells() -> Iterator[Any]:
    hits = _hit_files()
    for backend in BACKENDS:
        for point in POINTS:
            if not on_path(backend, point, hits):
                continue  # the matrix's print lists why
            for action in actions_of(backend):
                marks = [NEEDS_ROOT] if backend == "luo-model" else []
                reason = _known(backend, point, action)
                if reason:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                yield pytest.param(backend, point, action, id=f"{backend}:{point}:{action}", marks=marks)


# --------------------------------------------------------------------------- the world


class KernelModelDaemon(DaemonProcess):
    """fdboxd on tests/kmodmodel.py's /dev/fdbox (``--backend kernel``)."""

    def __init__(self, runtime_dir: Path, model_dir: Path, args: list[str]) -> None:
        super().__init__(runtime_dir, args)
        self.model_dir = model_dir

    def command(self) -> list[str]:
        return kmodmodel.daemon_command(self.model_dir, ["--socket", self.socket, "--state-dir", self.state_dir,
                                                         "--log-level", "debug", *self.args])


class ModelDaemon(DaemonProcess):
    """fdboxd started in the model's world (tests/luomodel.py's ``daemon`` command)."""

    def __init__(self, runtime_dir: Path, model_dir: Path, args: list[str]) -> None:
        super().__init__(runtime_dir, args)
        self.model_dir = model_dir

    def command(self) -> list[str]:
        return luomodel.daemon_command(self.model_dir, ["--socket", self.socket, "--state-dir", self.state_dir,
                                                        "--log-level", "debug", *self.args])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fd_sha(fd: int) -> str:
    size = os.fstat(fd).st_size
    return sha(os.pread(fd, size, 0) if size else b"")


@dataclass
class World:
    """One cell's world: the daemon, the model (luo-model), and what was acknowledged."""

    backend: str
    point: str
    spec: str
    root: Path
    model: luomodel.ModelProcess | kmodmodel.ModelProcess | None = None
    daemon: DaemonProcess | None = None
    armed: bool = True
    fired: list[str] = field(default_factory=list)
    acked: dict[tuple[str, str], str] = field(default_factory=dict)  # held or reported lost, by name
    maybe: dict[tuple[str, str], str] = field(default_factory=dict)  # the reply never came
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _syncs: int = 0

    def __post_init__(self) -> None:
        rt = make_runtime_dir()
        self.manager = NotifySocket(rt / "notify")  # systemd's end: READY=1 and the fd store
        if self.backend == "luo-model":
            self.model = luomodel.ModelProcess(self.root / "model")
            self.daemon = ModelDaemon(rt, self.root / "model", ["--backend", "liveupdate", "--liveupdate-wait", "1"])
        elif self.backend == "kernel-model":
            self.model = kmodmodel.ModelProcess(self.root / "model")
            self.daemon = KernelModelDaemon(rt, self.root / "model", ["--backend", "kernel"])
        else:
            self.daemon = DaemonProcess(rt, ["--backend", "memory"])
        self.runtime = rt

    # ---------------------------------------------------------------- the daemon

    def env(self) -> dict[str, str]:
        if not self.armed:
            return {}
        spec = f"{self.point}={self.spec}"
        trigger = TRIGGERS.get(self.point)
        return {"FDBOX_FAILPOINTS": f"{trigger},{spec}" if trigger else spec}

    def start(self) -> None:
        """Start (armed until the point fired); a start the fault broke is restarted unarmed."""
        d = self.daemon
        assert d is not None
        mark = len(d.log())
        try:
            self.launch()
        except DaemonError as e:
            if not self.armed or not (self.named(mark) or "exited with -9" in str(e)):
                raise  # a start that fails by itself fails the cell
            self.fault("start")
            self.launch()  # unarmed: this one must come up (DaemonError fails the cell)
            self.check("after the start that followed the failed one")
            return
        if self.armed and self.named(mark):
            self.fault("start")  # it came up after the error: it goes on, unarmed from now

    def launch(self) -> None:
        """As systemd starts the service: NOTIFY_SOCKET, and its fd store in LISTEN_FDS."""
        d = self.daemon
        assert d is not None
        env = {**self.env(), "NOTIFY_SOCKET": self.manager.path}
        self.settle()
        with self.manager.lock:
            kept = sorted(self.manager.store.items())
        if kept:
            launch_activated(d, kept, env)
        else:
            d.env = env
            d.start()

    def settle(self) -> None:
        """Wait until the manager has applied every message the last daemon sent, as
        systemd has before it starts the unit again (it reads the notify socket in
        order): a marker datagram queued behind them, then seen. Without it a loaded host
        restarts from an fd store that misses the last FDSTORE/FDSTOREREMOVE."""
        self._syncs += 1
        marker = str(self._syncs)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(f"FDBOX_TEST_SYNC={marker}".encode(), self.manager.path)

        def seen() -> bool:
            with self.manager.lock:
                return any(m.get("FDBOX_TEST_SYNC") == marker for m in reversed(self.manager.messages))

        assert wait_for(seen, 60), "the notify socket's reader never got to the marker"

    def named(self, mark: int) -> bool:
        assert self.daemon is not None
        return f"failpoint {self.point}" in self.daemon.log()[mark:]

    def fault(self, where: str) -> None:
        if self.armed:
            self.fired.append(where)
            self.armed = False

    def died(self, wait: float = 0.0) -> bool:
        """Whether the daemon has exited (waiting up to ``wait`` s: a kill races the reply)."""
        d = self.daemon
        assert d is not None
        if d.proc is None:
            return False
        try:
            d.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return False
        return True

    def down(self, where: str) -> None:
        """Stop the daemon as systemd would (a dead one is noted as the point's kill)."""
        d = self.daemon
        assert d is not None
        if self.died():
            self.notes.append(f"{where}: the daemon had died (rc {d.proc.returncode if d.proc else '?'})")
            self.fault(where)
            d.kill()
        else:
            d.stop()

    def restart(self, where: str = "restart") -> None:
        self.down(where)
        self.start()

    def kexec(self) -> None:
        """What a kexec does: fdboxd stopped (systemd-shutdown), then the new kernel."""
        self.down("kexec")
        self.settle()  # the old world's last messages, before its fd store goes
        with self.manager.lock:  # the old world's service manager, and its fd store, are gone
            for fd in self.manager.store.values():
                os.close(fd)
            self.manager.store.clear()
        if self.model is not None:
            self.model.kexec()  # carries open sessions, kills the old world (the holder)
            if self.armed and self.point in CORRUPT:
                self.model.corrupt(*CORRUPT[self.point])
        self.start()

    def client(self) -> Client:
        assert self.daemon is not None
        return self.daemon.client(timeout=30)

    def step(self, name: str, fn: Callable[[Client], None]) -> None:
        """Run one step of the cycle; a fault is noted, and an unarmed restart follows it."""
        d = self.daemon
        assert d is not None
        mark = len(d.log())
        err: BaseException | None = None
        try:
            with self.client() as c:
                fn(c)
        except (FdboxError, OSError, KeyError) as e:
            err = e
        died = self.died(5.0 if isinstance(err, OSError) else 0.0)
        hit = died or self.named(mark) or (err is not None and f"failpoint {self.point}" in str(err))
        if hit:
            self.fault(name)
        if err is not None:
            self.notes.append(f"{name}: {type(err).__name__}: {err}")
        if hit:
            self.restart(name)
            self.check(f"after the restart that followed {name}")

    def check(self, when: str) -> None:
        """The invariants, now: what a restart after the fault left (added to problems)."""
        with self.client() as c:
            self.problems += check_accounted(self, c, when) + check_sessions(self, c, when) + check_kernel(self, c, when)

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
        self.manager.close()
        if self.model is not None:
            self.model.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)

    # ---------------------------------------------------------------- client steps

    def put(self, c: Client, box: str, name: str, data: bytes) -> None:
        fd = memfd_with(data, name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.maybe[(box, name)] = sha(data)
        try:
            c.put(box, name, fd)
        except FdboxError:
            self.maybe.pop((box, name), None)  # refused: not there
            raise
        finally:
            os.close(fd)
        self.acked[(box, name)] = self.maybe.pop((box, name))

    def remove(self, c: Client, box: str, name: str) -> None:
        old = self.acked.pop((box, name), None)
        if old is not None:
            self.maybe[(box, name)] = old
        try:
            c.remove(box, name)
        except FdboxError:
            if old is not None:
                self.acked[(box, name)] = self.maybe.pop((box, name))  # refused: still there
            raise
        self.maybe.pop((box, name), None)

    def delete_box(self, c: Client, box: str) -> None:
        held = {k: self.acked.pop(k) for k in list(self.acked) if k[0] == box}
        self.maybe.update(held)
        try:
            c.delete_box(box)
        except FdboxError:
            for k, v in held.items():
                self.acked[k] = self.maybe.pop(k)  # refused: all still there
            raise
        for k in held:
            self.maybe.pop(k, None)

    def claim(self, c: Client, box: str, name: str) -> None:
        entry, fd = c.get(box, name)
        try:
            want = self.acked.get((box, name)) or self.maybe.get((box, name))
            assert fd_sha(fd) == want, f"{box}/{name}: bytes differ from what was put"
        finally:
            os.close(fd)

    def finish(self, c: Client, box: str) -> None:
        """Finish releases what is unclaimed: what it leaves listed stays acknowledged."""
        held_before = {k for k in (*self.acked, *self.maybe) if k[0] == box}
        for k in held_before:
            if k in self.acked:
                self.maybe[k] = self.acked.pop(k)
        c.finish(box)
        after = {(e["box"], e["name"]) for e in c.list(box)["entries"]}
        for k in held_before:
            if k in after and k in self.maybe:
                self.acked[k] = self.maybe.pop(k)


def blob(tag: str, size: int = 12288) -> bytes:
    return (hashlib.sha256(tag.encode()).digest() * (size // 32 + 1))[:size]


STEPS: list[tuple[str, Callable[[World, Client], None]]] = [
    ("put", lambda w, c: (w.put(c, "vm1", "ram0", blob("ram0")), w.put(c, "vm1", "ram1", blob("ram1")),
                          w.put(c, "vm2", "r", blob("r")))),
    ("seal vm1", lambda w, c: c.seal("vm1")),
    ("unseal vm1", lambda w, c: c.unseal("vm1")),
    ("remove+put", lambda w, c: (w.remove(c, "vm1", "ram1"), w.put(c, "vm1", "ram2", blob("ram2")))),
    ("seal all", lambda w, c: c.seal(None)),
]


def run_cycle(w: World) -> None:
    w.start()
    for name, fn in STEPS:
        w.step(name, lambda c, fn=fn: fn(w, c))
    w.restart("upgrade")  # a package upgrade while sealed: the fd store and the holder give back
    w.check("after the upgrade restart")
    w.kexec()  # (a restart without a kexec also follows every fault, and ends every cell)
    w.step("claim+finish", lambda c: (w.claim(c, "vm1", "ram0"), w.finish(c, "vm1")))
    w.step("claim+remove", lambda c: (w.claim(c, "vm2", "r"), w.remove(c, "vm2", "r")))
    w.step("put vm3", lambda c: w.put(c, "vm3", "x", blob("x")))
    w.step("put+delete vm4", lambda c: (w.put(c, "vm4", "x", blob("vm4")), w.delete_box(c, "vm4")))


# --------------------------------------------------------------------------- the checks


def held_and_lost(c: Client) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict[str, str]]:
    listing = c.list()
    held = [(e["box"], e["name"]) for e in listing["entries"]]
    states = {b["name"]: b["state"] for b in listing["boxes"]}
    lost = [(x["box"], x["name"]) for x in c.status()["lost"]]
    return held, lost, states


def check_accounted(w: World, c: Client, when: str) -> list[str]:
    problems = []
    held, lost, _ = held_and_lost(c)
    for key in sorted(w.acked):
        if key not in held and key not in lost:
            problems.append(f"{when}: acknowledged {key[0]}/{key[1]} is neither held nor reported lost")
    dup = {k for k in held if held.count(k) > 1}
    if dup:
        problems.append(f"{when}: held twice: {sorted(dup)}")
    both = sorted(set(held) & set(lost))
    if both:
        problems.append(f"{when}: held and reported lost at once: {both}")
    return problems


def check_kernel(w: World, c: Client, when: str) -> list[str]:
    """What fdbox.ko (the model) holds is what the daemon lists: nothing held unaccounted."""
    if not isinstance(w.model, kmodmodel.ModelProcess):
        return []
    kboxes = w.model.state()["boxes"]
    listing = c.list()
    states = {b["name"]: b["state"] for b in listing["boxes"]}
    entries: dict[str, set[str]] = {}
    for e in listing["entries"]:
        entries.setdefault(e["box"], set()).add(e["name"])
    problems = []
    carried = kboxes.pop(CARRY_BOX, None)
    if any(s == "sealed" for s in states.values()) and (carried is None or carried["state"] != "sealed"):
        problems.append(f"{when}: boxes are sealed, and fdbox.ko holds no sealed carried manifest ({carried})")
    for name, kb in sorted(kboxes.items()):
        if name not in states:
            problems.append(f"{when}: fdbox.ko holds box {name} ({kb['state']}) the daemon does not list")
        elif kb["state"] != states[name] or set(kb["entries"]) != entries.get(name, set()):
            problems.append(f"{when}: box {name}: fdbox.ko holds {kb['state']} {kb['entries']}, the daemon "
                            f"lists {states[name]} {sorted(entries.get(name, set()))}")
    for name in sorted(set(states) - set(kboxes)):
        problems.append(f"{when}: the daemon lists box {name}, fdbox.ko does not hold it")
    return problems


def check_sessions(w: World, c: Client, when: str) -> list[str]:
    if not isinstance(w.model, luomodel.ModelProcess):
        return []
    st = w.model.state()
    _held, _lost, states = held_and_lost(c)
    sealed = {b for b, s in states.items() if s == "sealed"}
    want = sealed | ({"fdboxd:index", "fdboxd.manifest"} if sealed else set())
    problems = []
    out = {s["name"]: s for s in st["outgoing"]}
    for name, s in sorted(out.items()):
        if not s["holders"]:
            problems.append(f"{when}: LUO session {name} has no holder")
    if set(out) != want:
        problems.append(f"{when}: LUO sessions {sorted(out)}, the daemon accounts for {sorted(want)}")
    for s in st["incoming"]:
        if not s["retrieved"]:
            problems.append(f"{when}: incoming LUO session {s['name']} left unretrieved")
    if st["device_open"]:
        problems.append(f"{when}: /dev/liveupdate (model) still open while idle")
    return problems


def final_round(w: World) -> list[str]:
    """Seal everything, kexec, restore: every sealed entry back byte for byte (memory:
    every one reported lost)."""
    problems = []
    with w.client() as c:
        try:
            c.seal(None)
        except FdboxError as e:
            if e.name != "NotFound":
                problems.append(f"final seal refused: {e.name}: {e.message}")
        listing = c.list()
        sealed_boxes = {b["name"] for b in listing["boxes"] if b["state"] == "sealed"}
        crossing = {(e["box"], e["name"]) for e in listing["entries"] if e["box"] in sealed_boxes}
    want = {k: w.acked.get(k) or w.maybe.get(k) for k in crossing}
    w.kexec()
    with w.client() as c:
        held, lost, _states = held_and_lost(c)
        for key, digest in sorted(want.items()):
            if key in held:
                entry, fd = c.get(*key)
                try:
                    if fd_sha(fd) != digest:
                        problems.append(f"after the final kexec: {key[0]}/{key[1]} came back with other bytes")
                finally:
                    os.close(fd)
            elif w.backend == "memory":
                if key not in lost:
                    problems.append(f"after the final kexec: {key[0]}/{key[1]} vanished without a report")
            else:
                problems.append(f"after the final kexec: {key[0]}/{key[1]} did not cross "
                                f"({'reported lost' if key in lost else 'not even reported'})")
        problems += check_sessions(w, c, "after the final restore")
        problems += check_kernel(w, c, "after the final restore")
    return problems


@pytest.fixture(scope="module", autouse=True)
def _print_matrix(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not _RESULTS:
        return
    lines = ["", f"crash matrix ({len(_RESULTS)} cells): failpoint × action → outcome"]
    hits = _hit_files()
    for backend in BACKENDS:
        for point in POINTS:
            why = off_path(backend, point, hits)
            if why:
                lines.append(f"  no cell {backend}:{point}: {why}")
    for backend, acts in SHORT.items():
        if actions_of(backend) == acts:
            lines.append(f"  {backend}: {', '.join(acts)} only (FDBOX_CRASH_MATRIX=all runs every action)")
    width = max(len(p) for _b, p, _a in _RESULTS) + 2
    for backend in BACKENDS:
        lines.append(f"  [{backend}]")
        for point in POINTS:
            row = [f"{a}: {_RESULTS[(backend, point, a)]}" for a in ACTIONS if (backend, point, a) in _RESULTS]
            if row:
                lines.append(f"    {point:<{width}}" + " | ".join(row))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # the log, not a captured stream
        print("\n".join(lines), flush=True)


@pytest.mark.parametrize(("backend", "point", "action"), list(_cells()))
def test_cell(backend: str, point: str, action: str, tmp_path: Path) -> None:
    w = World(backend, point, ACTIONS[action], tmp_path)
    outcome = "?"
    try:
        run_cycle(w)
        problems: list[str] = list(w.problems)
        if not w.fired:
            problems.append(f"{point} was not reached by the cycle ({', '.join(n for n, _ in STEPS)}, "
                            "upgrade, kexec, claim, finish, remove, put, delete box): give it a step")
        w.restart()  # the restart after which everything must be accounted for
        with w.client() as c:
            problems += check_accounted(w, c, "after the restart")
            problems += check_sessions(w, c, "after the restart")
            problems += check_kernel(w, c, "after the restart")
        problems += final_round(w)
        outcome = (f"fired in {w.fired[0]}; " if w.fired else "NOT REACHED; ") + (
            "ok" if not problems else f"{len(problems)} problems" + (" (xfail: known)"
                                                                      if _known(backend, point, action) else ""))
        assert not problems, "\n".join(problems + ["notes:"] + w.notes + ["daemon log tail:", w.daemon.log()[-3000:]
                                                                         if w.daemon else ""])
    except BaseException as e:
        if outcome == "?":
            outcome = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        raise
    finally:
        _RESULTS[(backend, point, action)] = outcome
        w.close()
