"""fdboxd: the daemon. Wires a backend, the manifest, the store and the front-ends
onto one asyncio loop, and runs until SIGTERM/SIGINT.

Run ``fdboxd --help``. With no options as root it is the system daemon
(``/run/fdbox/fdboxd.sock``, ``/var/lib/fdbox``, the kernel backend if ``/dev/fdbox``
exists); ``--user`` (the default for non-root) keeps everything in directories the user
owns and uses the memory backend unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import __version__, deps, paths
from .backends import DEVICE_PATH, LUO_DEVICE_PATH, OPEN_RETRY_S, open_backend
from .errors import FdboxError
from .fdtypes import MEMORY_TYPES, FdType
from .hostfacts import HostFacts
from .manifest import Manifest
from .model import Caller
from .names import BoxRules
from .preflight import Preflighter
from .statelock import StateLock
from .checksum import DEFAULT_VERIFY, Verify
from .limits import Budget, Limits, add_arguments, from_args
from .store import Store
from .varlink.protocol import MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE
from .varlink.server import VarlinkServer, bind_socket, socket_identity, unlink_socket
from .service import Service
from .varlink.service import StoreService

log = logging.getLogger("fdboxd")


@dataclass
class Config:
    socket: str
    state_dir: str
    backend: str = "auto"
    device: str = DEVICE_PATH
    luo_wait: float | None = None  # --liveupdate-wait (None: the backend's default)
    allowed_types: frozenset[FdType] = MEMORY_TYPES
    limits: Limits = field(default_factory=Limits)
    budget: Budget = field(default_factory=Budget)
    box_rules: BoxRules = field(default_factory=BoxRules)
    user: bool = False  # --user: serve only our own uid, on a 0600 socket in a checked directory
    max_fds: int = MAX_FDS_PER_MESSAGE
    max_message_size: int = MAX_MESSAGE_SIZE
    bus: str | None = None  # D-Bus front-end: "system", "session" or an address
    log_level: str = "info"
    verify: Verify = DEFAULT_VERIFY


def build_parser() -> argparse.ArgumentParser:
    """fdboxd's command line; also what the man page and bash completion are generated from."""
    p = argparse.ArgumentParser(prog="fdboxd", description="fdbox daemon: named boxes of file descriptors.",
                                epilog="exit codes: 0 stopped by SIGTERM/SIGINT, 1 could not start (a missing "
                                "optional package, the socket or bus name taken, another fdboxd on the state "
                                "directory, a bad state directory; one line on stderr says which), 2 bad command line.")
    p.add_argument("--user", action="store_true", default=None,
                   help="run as a user daemon: socket and state under the user's own directories")
    p.add_argument("--socket", help="Varlink socket path (default: /run/fdbox/fdboxd.sock as root)")
    p.add_argument("--state-dir", help="where manifest.json lives (default: /var/lib/fdbox as root)")
    p.add_argument("--backend", choices=["auto", "memory", "kernel", "liveupdate"], default="auto",
                   help="kernel: fdbox.ko (/dev/fdbox); liveupdate: LUO (/dev/liveupdate, plain memfds); "
                        "auto: plain memfds on LUO if it works, the rest on fdbox.ko if loaded, else memory")
    p.add_argument("--device", default=DEVICE_PATH, help=argparse.SUPPRESS)
    p.add_argument("--liveupdate-wait", type=float, default=OPEN_RETRY_S, metavar="SECONDS",
                   help="while another process (luod, systemd) holds /dev/liveupdate, retry opening it "
                        "this long before a seal (or start-up) fails with the holder named; default: %(default)g")
    p.add_argument("--verify", choices=[v.value for v in Verify], default=DEFAULT_VERIFY.value,
                   help="checksums at seal and restore: full (SHA-256 of every byte), sample "
                        "(whole SHA-256 up to 4 MiB, fixed-cost sample above), none (size only); "
                        "default: %(default)s")
    p.add_argument("--allow-type", action="append", default=[], metavar="TYPE",
                   choices=[t.value for t in FdType],
                   help="also accept fds of this type (tap, other); memfd types are always accepted")
    p.add_argument("--max-fds-per-message", type=int, default=MAX_FDS_PER_MESSAGE,
                   help="fds in one message, however many reads it spans (default: %(default)s)")
    add_arguments(p)
    p.add_argument("--box-owners", metavar="FILE",
                   help="reserve box names: lines of 'PATTERN UID-or-USER'; a name that matches may be "
                        "created only by that user (or root). Names 'UID.*' always belong to UID")
    p.add_argument("--bus", help="also serve D-Bus: system, session, or a bus address")
    p.add_argument("--log-level", default=os.environ.get("FDBOX_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"fdboxd {__version__}")
    return p


def parse_args(argv: list[str] | None = None) -> Config:
    p = build_parser()
    a = p.parse_args(argv)
    user = a.user if a.user is not None else os.geteuid() != 0
    if a.liveupdate_wait < 0:
        p.error("--liveupdate-wait must be >= 0")
    if not 1 <= a.max_fds_per_message <= MAX_FDS_PER_MESSAGE:
        p.error(f"--max-fds-per-message must be 1..{MAX_FDS_PER_MESSAGE}")
    try:
        limits, budget = from_args(a)
        box_rules = BoxRules.load(a.box_owners) if a.box_owners else BoxRules()
    except (ValueError, OSError) as e:
        p.error(str(e))
    return Config(
        socket=a.socket or paths.default_socket(user),
        state_dir=a.state_dir or paths.default_state_dir(user),
        backend=a.backend,
        device=a.device,
        luo_wait=a.liveupdate_wait,
        allowed_types=MEMORY_TYPES | {FdType(t) for t in a.allow_type},
        limits=limits,
        budget=budget,
        user=user,
        box_rules=box_rules,
        max_fds=a.max_fds_per_message,
        bus=a.bus,
        log_level=a.log_level,
        verify=Verify(a.verify),
    )


class Daemon:
    """Everything the running daemon owns, so tests and front-ends can reach it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Before anything is read or taken (the manifest, LUO sessions from the fd store
        # or the holder): one daemon per state directory, for its whole life.
        self.state_lock = StateLock.acquire(config.state_dir)
        from . import systemd as sd  # standard library only

        # Under systemd: the Varlink listener and the fdstore's fds come in LISTEN_FDS;
        # the fds are adopted before the store is built so that it reconciles them.
        self.activation = sd.Activation.from_environ()
        t0 = time.perf_counter()
        # systemd's fd store keeps sealed LUO sessions where the manager carries it across
        # kexec (systemd >= 261), the holder process elsewhere (fdboxd.backends.liveupdate).
        uses_luo = config.backend in ("auto", "liveupdate") and os.path.exists(LUO_DEVICE_PATH)
        fdstore = sd.FdStoreKeeper.from_environ() if uses_luo else None
        luo_sessions = [fd for _name, fd in self.activation.luo_sessions]
        self.activation.luo_sessions = []
        self.backend = open_backend(config.backend, config.device, luo_wait=config.luo_wait,
                                    luo_sessions=luo_sessions, fdstore=fdstore)
        t1 = time.perf_counter()
        refused = sd.adopt_store_fds(self.activation, self.backend, Manifest(config.state_dir))
        self.store = Store(self.backend, Manifest(config.state_dir), limits=config.limits,
                           allowed_types=config.allowed_types, verify=config.verify,
                           box_rules=config.box_rules)
        self.systemd = sd.SystemdIntegration(self.store, self.activation, refused)
        if self.store.status()["restored"]:
            # After a kexec: check every entry against the checksum it was sealed with
            # before anyone can take it back (mismatches are dropped and reported lost).
            t2 = time.perf_counter()
            failed = self.store.verify_restored()
            t3 = time.perf_counter()
            log.info("verified restored entries: %d failed", len(failed))
            # One line per phase of the blackout's restore side (bench/liveupdate.py reads it).
            log.info("restore timing: backend_ms=%.1f store_ms=%.1f verify_ms=%.1f verify=%s",
                     (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, config.verify)
            from . import timeline

            try:
                self.store.mark_restored(kernel_up=timeline.kernel_boot_time(),
                                         restore_begin=timeline.process_start_time())
            except OSError as e:  # a record of the live update must never hold up the restore
                log.warning("live update timeline: cannot read the start times: %s", e)
        # What no kernel carries comes back now: the taps' recorded interfaces (fdboxd.kinds.tap).
        self.store.start_kinds()
        # What Preflight checks besides the store (fdboxd.hostfacts: the files it reads).
        self.preflighter = Preflighter(config.backend, HostFacts())
        self.stopping = asyncio.Event()
        self.varlink: VarlinkServer | None = None
        self.frontends: list[Any] = []  # objects with an async close()
        self._bound: tuple[str, tuple[int, int]] | None = None  # the socket file we made

    def limits(self) -> dict[str, int]:
        lim, bud = self.config.limits, self.config.budget
        return {
            "max_boxes": lim.max_boxes,
            "max_entries_per_box": lim.max_entries_per_box,
            "max_entries": lim.max_entries_total,
            "max_boxes_per_uid": lim.max_boxes_per_uid,
            "max_entries_per_uid": lim.max_entries_per_uid,
            "max_bytes_per_uid": lim.max_bytes_per_uid,
            "max_entry_size": lim.max_entry_size,
            "max_fds_per_message": self.config.max_fds,
            "max_message_size": self.config.max_message_size,
            "max_connections": bud.max_connections,
            "max_connections_per_uid": bud.connections_per_uid,
            "max_fds_in_flight_per_connection": bud.fds_per_connection,
            "max_fds_in_flight_per_uid": bud.fds_per_uid,
            "idle_timeout": int(bud.idle_timeout),
        }

    async def start(self, listener: Any = None) -> None:
        """Open the front-ends. ``listener``: an already-bound socket (socket activation)."""
        if listener is None:
            listener, self.activation.listener = self.activation.listener, None
        if listener is None and self.config.user:
            paths.ensure_private_dir(os.path.dirname(self.config.socket))
        if listener is not None:
            sock = listener  # the socket unit's: it owns the file
        else:
            sock = bind_socket(self.config.socket, 0o600 if self.config.user else 0o666)
            self._bound = (self.config.socket, socket_identity(self.config.socket))
        service = Service(self.store, self.limits(), self.preflighter)  # one, for every front-end
        self.varlink = VarlinkServer(
            StoreService(service), sock,
            max_message_size=self.config.max_message_size, max_fds=self.config.max_fds,
            log_op=log_op, budget=self.config.budget,
            # A --user daemon holds one user's files: nobody else's, not even root's.
            allowed_uids=frozenset({os.getuid()}) if self.config.user else None,
        )
        service.connection_usage = self.varlink.usage
        if self.config.bus:
            from .dbus import DBusFrontend  # dbus-fast is imported only when --bus is given

            self.frontends.append(await DBusFrontend(service, log_op).start(self.config.bus))
        self.systemd.attach(self.config.state_dir)
        st = self.store.status()
        log.info("fdboxd %s ready on %s: backend %s, %d boxes, %d entries, %d lost, %d adopted",
                 __version__, self.config.socket, st["backend"], st["boxes"], st["entries"],
                 len(st["lost"]), len(st["adopted"]))
        # Everything built so far (imports, the restored store) lives as long as the
        # daemon: keep it out of the cyclic collector's full passes, which otherwise walk
        # every object on the loop thread (measured, 10,000 entries, a loaded 2-core host:
        # 145 ms per full pass, 0 ms once frozen). Refcounting still frees what is removed;
        # entries put later are walked until the next restart.
        gc.freeze()
        # Only now, with every file held where a restart finds it again (the fd store's
        # mirror has them) and the reconciled snapshot written: the carried manifest is
        # dropped and LUO FINISHes what it carried. A start that failed before this left
        # both (every session with its keeper, the carried manifest in the kernel), for the
        # next start to read again.
        self.store.started()
        self.systemd.ready()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.start()
            await self.stopping.wait()
        finally:
            await self.close()  # also after a failed start: nothing bound is left behind

    async def close(self) -> None:
        self.systemd.stopping()
        for fe in reversed(self.frontends):
            await fe.close()
        if self.varlink is not None:
            self.varlink.close()
        if self._bound is not None:
            unlink_socket(*self._bound)  # a socket file left behind would only mislead
            self._bound = None
        # Only the memory backend's references die with the process; the kernel keeps its own.
        log_what_stop_drops(self.backend, in_fd_store=self.systemd.mirror)
        self.backend.close()
        if self.store.manifest is not None:
            self.store.manifest.close()  # the journal, and a compaction still running
        self.systemd.close()
        log.info("fdboxd stopped")
        self.state_lock.release()  # last: everything above may still write the state directory


def log_what_stop_drops(backend: Any, in_fd_store: bool, shown: int = 8) -> None:
    """Say at stop what the memory backend's process-held entries become (issue 25 §21).

    ``--backend memory`` holds each entry as an fd of this process and nothing else: when
    the process exits they are gone. Outside systemd's fd store that is a loss, logged
    as warnings: one line naming the count, the size, why and what would keep them, and
    one line per box with its entries and sizes (the first ``shown``). Under the unit's
    fd store (``in_fd_store``, fdboxd.systemd's mirror) they stay there: one info line.
    Other backends' references outlive the process; nothing is said for them here.
    """
    if backend.name != "memory":
        return
    boxes = {name: b for name, b in sorted(backend.inventory().items()) if b.entries}
    n = sum(len(b.entries) for b in boxes.values())
    if not n:
        return

    def size(v: int) -> str:
        for unit in ("B", "KiB", "MiB", "GiB"):
            if v < 1024 or unit == "GiB":
                return f"{v}{unit}" if unit == "B" else f"{v:.1f}{unit}"
            v /= 1024  # type: ignore[assignment]
        return str(v)  # pragma: no cover

    def count(k: int, one: str, many: str) -> str:
        return f"{k} {one if k == 1 else many}"

    what = f"{count(n, 'entry', 'entries')} in {count(len(boxes), 'box', 'boxes')}"
    if in_fd_store:
        log.info("stopping: %s %s in systemd's fd store (a restart of the unit gets %s back; a stop without "
                 "FileDescriptorStorePreserve=yes drops %s)", what, "stays" if n == 1 else "stay",
                 "it" if n == 1 else "them", "it" if n == 1 else "them")
        return
    total = sum(e.size for b in boxes.values() for e in b.entries.values())
    log.warning("stopping: %s (%s) %s dropped: --backend memory holds %s in this process only, and it is "
                "exiting; what keeps entries across a daemon restart: systemd's fd store (run fdboxd as "
                "fdboxd.service) or --backend kernel, liveupdate or auto", what, size(total),
                "is" if n == 1 else "are", "it" if n == 1 else "them")
    for name, b in boxes.items():
        entries = sorted(b.entries.values(), key=lambda e: e.name)
        listed = ", ".join(f"{e.name} ({size(e.size)})" for e in entries[:shown])
        more = f", and {len(entries) - shown} more" if len(entries) > shown else ""
        log.warning("stopping: dropped %s: %s, %s: %s%s", name, count(len(entries), "entry", "entries"),
                    size(sum(e.size for e in entries)), listed, more, extra={"FDBOX_BOX": name})


_UNLOGGED = frozenset({"List", "Status", "GetInfo", "GetInterfaceDescription"})


def log_op(caller: Caller, method: Any, params: dict[str, Any], error: FdboxError | None) -> None:
    """One log line per state-changing call (reads are not logged)."""
    op = str(method).rpartition(".")[2]
    if op in _UNLOGGED or not log.isEnabledFor(logging.INFO):
        return
    box, name = params.get("box"), params.get("name")
    where = f"{box}/{name}" if name else f"{box}" if box else "*"
    from .systemd import hold_call_line  # loaded by setup_logging already: a dict lookup

    refused = "" if error is None else f" refused: {error}"
    if hold_call_line(f"fdboxd: INFO {op} {where} by uid {caller.uid} pid {caller.pid}{refused}\n"):
        return  # the same line the handler below writes, without a LogRecord
    fields = {"FDBOX_OP": op, "FDBOX_BOX": box, "FDBOX_ENTRY": name}  # journal fields (fdboxd.systemd)
    if error is None:
        log.info("%s %s by uid %d pid %d", op, where, caller.uid, caller.pid, extra=fields)
    else:
        log.info("%s %s by uid %d pid %d refused: %s", op, where, caller.uid, caller.pid, error, extra=fields)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: the memory backend holds an fd per entry."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the fd limit from %d to %d: %s", soft, hard, e)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    missing = [d.problem() for d, used in ((deps.DBUS, bool(config.bus)),
                                           (deps.NET, FdType.TAP in config.allowed_types)) if used]
    if any(missing):
        for line in filter(None, missing):
            print(f"fdboxd: {line}", file=sys.stderr)
        return 1
    from .systemd import setup_logging  # journal fields under journald, plain lines otherwise

    setup_logging(config.log_level)
    raise_fd_limit()
    try:
        asyncio.run(_main(config))
    except FdboxError as e:
        log.error("%s", e.message)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


async def _main(config: Config) -> None:
    await Daemon(config).run()


if __name__ == "__main__":
    sys.exit(main())
