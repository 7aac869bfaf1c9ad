"""Preflight: would every entry survive a kexec now? Say so before anything is lost.

An operator runs ``fdboxctl preflight`` (Varlink ``Preflight``, D-Bus ``Preflight``)
before ``systemctl kexec``; ``fdbox-seal.service`` asks for the same checks inside its
Seal (``Seal(preflight: true)``), so a host that would lose something refuses the kexec
instead. Every check that fails is one :class:`Problem` naming the entry (or the host
part) and the fix; what cannot be checked is a warning, never a refusal. The checks:

- **backend**: the daemon's backend carries each entry's type across a kexec (LUO for
  plain memfds with ``auto``/``liveupdate``, fdbox.ko for hugetlb, KHO on);
- **cmdline**: the running kernel has ``kho=on`` (and ``liveupdate=on`` where LUO
  carries), and so does the loaded kernel's command line where it was recorded;
- **kexec**: a kernel is loaded (``/sys/kernel/kexec_loaded``); where fdbox.ko carries
  an entry and the loaded image was recorded (``/run/fdbox/kexec-kernel``), that kernel's
  ``/lib/modules/RELEASE`` has an fdbox.ko (without it the handover stays reserved until
  ``fdboxctl release-handover``). A release string is all it can compare: two builds
  of one release (the test and debug kernels here) look the same;
- **entry**: each entry can be carried at all: not a private guest_memfd, not a hugetlb
  memfd that fdbox.ko cannot seal (``F_SEAL_SEAL`` without the seals it needs: a memfd
  made without ``MFD_ALLOW_SEALING``), not 1 GiB hugetlb pages, not an unknown type, a
  tap that can be recreated, no restored box left unclaimed. Each of these is the
  entry's kind's to say (:meth:`fdboxd.kinds.Kind.preflight`: problems, what crosses,
  the room it needs); this module loops over entries and names no kind;
- **room**: the next kernel's hugetlb pool for the restore copies, memory for the
  guest_memfd copies made at seal, space on the state file system for the snapshot;
- **vm**: every running ``fdbox-qemu@VM`` has its RAM held in box VM.

What the host says is read through :mod:`fdboxd.hostfacts` (one list of paths, which a
test can point elsewhere). Entries are opened again for fresh facts (seals can be added
after a put); a preflight costs one ``get`` per entry, never a read of its memory.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import FdboxError
from .fdtypes import F_GET_SEALS, HUGE_2M
from .hostfacts import KEXEC_CMDLINE, KEXEC_KERNEL, HostFacts, cmdline_options, hugepages_reserved, option_on
from .kinds import Preflight
from .lifecycle import CARRY_BOX
from .model import BoxState, Caller, Entry

if TYPE_CHECKING:
    from .store import Store

log = logging.getLogger("fdboxd.preflight")

#: Room left on the state file system beyond the snapshot itself (a temp file's last
#: block, the directory entry).
STATE_SLACK = 16 << 10

@dataclass(frozen=True)
class Problem:
    """One reason something would not survive the kexec (or, as a warning, could not be checked)."""

    #: backend, cmdline, kexec, entry, room or vm
    check: str
    #: the fdbox error name a preflighted Seal refuses with
    error: str
    message: str
    fix: str
    box: str | None = None
    name: str | None = None

    def where(self) -> str:
        if self.box and self.name:
            return f"{self.box}/{self.name}"
        return self.box or self.check

    def line(self) -> str:
        """The one line fdboxctl prints for it: what, where, and the fix."""
        return f"{self.where()}: {self.message}" + (f"; fix: {self.fix}" if self.fix else "")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Report:
    backend: str
    entries: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "backend": self.backend, "entries": self.entries,
                "problems": [p.to_dict() for p in self.problems],
                "warnings": [w.to_dict() for w in self.warnings]}

    def refusal(self) -> FdboxError:
        """The error a Seal with ``preflight`` refuses with: the first problem's name, every line."""
        lines = "; ".join(p.line() for p in self.problems)
        return FdboxError(self.problems[0].error, f"preflight: {len(self.problems)} problem(s): {lines}")


@dataclass(frozen=True)
class Preflighter:
    """What the preflight needs besides the store: the backend asked for and the host."""

    requested_backend: str = "auto"
    facts: HostFacts = field(default_factory=HostFacts)

    def run(self, store: Store, caller: Caller, box: str | None = None) -> Report:
        """Every check; with ``box`` (a preflighted Seal of one box), only its entries and VM."""
        report = _Checks(store, caller, self.requested_backend, self.facts, box).run()
        for p in report.problems:
            log.warning("preflight: %s", p.line(), extra={"FDBOX_PREFLIGHT": p.check, "FDBOX_BOX": p.box,
                                                          "FDBOX_ENTRY": p.name})
        log.info("preflight: %s (%d entries, %d problems, %d warnings)", "ok" if report.ok else "refused",
                 report.entries, len(report.problems), len(report.warnings))
        return report


class _Checks:
    def __init__(self, store: Store, caller: Caller, requested: str, facts: HostFacts,
                 only: str | None = None) -> None:
        self.store, self.caller, self.requested, self.facts = store, caller, requested, facts
        self.only = only
        self.backend = store.backend
        self.report = Report(store.backend.name)
        self.needs_kho = False
        self.needs_luo = False
        self.needs_kmod = False
        self.hugetlb_pages = 0  # 2 MiB pages the restore copies into
        self.gmem_bytes = 0  # guest_memfd bytes copied at seal
        self.inodes: dict[str, set[tuple[int, int]]] = {}  # box -> held memfds, for the vm check
        self.unopened: set[str] = set()  # boxes with a memfd entry that could not be opened

    def problem(self, check: str, error: str, message: str, fix: str, box: str | None = None,
                name: str | None = None) -> None:
        self.report.problems.append(Problem(check, error, message, fix, box, name))

    def warn(self, check: str, message: str, fix: str = "") -> None:
        self.report.warnings.append(Problem(check, "", message, fix))

    def run(self) -> Report:
        for b in sorted(self.store.boxes.values(), key=lambda b: b.name):
            if self.only is not None and b.name != self.only:
                continue
            mine = [e for e in sorted(b.entries.values(), key=lambda e: e.name) if e.owned_by(self.caller)]
            if b.state == BoxState.RESTORED:
                self._restored(b.name, mine)
                continue
            for e in mine:
                self.report.entries += 1
                self._entry(b.name, b.state, e)
        self._kernel()
        self._device()
        self._room()
        if self.caller.is_root:
            self._vms()
        return self.report

    # ------------------------------------------------------------------ entries

    def _restored(self, box: str, entries: list[Entry]) -> None:
        left = [e.name for e in entries if not e.claimed]
        if left:
            self.report.entries += len(left)
            self.problem("entry", "InvalidRequest",
                         f"is restored and {len(left)} of its entries ({', '.join(left[:4])}"
                         f"{', …' if len(left) > 4 else ''}) were never taken back: a second kexec does not carry them",
                         f"take them back (Get/GetBox; RestoreInto for a guest_memfd) or `fdboxctl finish {box}`, "
                         "then seal", box)

    def _entry(self, box: str, state: BoxState, e: Entry) -> None:
        kind = self.store.kind(e.type)
        seals = page = None
        if kind.carried_by_backend:  # its memory crosses the kexec: a new fd of it for fresh facts
            self.needs_kho = True
            seals, page, ino = self._fresh(box, e)
            if ino is not None:
                self.inodes.setdefault(box, set()).add(ino)
            elif kind.mapped_by_vmm:
                self.unopened.add(box)  # its VM's mappings cannot be compared
        verdict = kind.preflight(box, e, state, seals, page)
        for error, message, fix in verdict.problems:
            self.problem("entry", error, message, fix, box, e.name)
        if verdict.problems or verdict.carrier is None:
            return
        self.hugetlb_pages += verdict.hugetlb_pages
        self.gmem_bytes += verdict.copy_bytes
        # Checked whatever the backend, so that every problem shows at once.
        self._carried(box, e, verdict)
        if verdict.via_luo and (self.backend.name in ("liveupdate", "liveupdate+kernel") or (
                self.backend.name == "memory" and self.requested in ("auto", "liveupdate"))):
            self.needs_luo = True
        elif self.backend.next_kernel_module:
            self.needs_kmod = True

    def _fresh(self, box: str, e: Entry) -> tuple[int | None, int | None, tuple[int, int] | None]:
        """The entry's seals, page size and (dev, inode) now, from a new fd of it."""
        try:
            fd = self.store.backend_for(e.type).get(box, e.name)
        except (FdboxError, OSError):
            return e.seals, None, None
        try:
            st = os.fstat(fd)
            try:
                seals: int | None = fcntl.fcntl(fd, F_GET_SEALS)
            except OSError:
                seals = e.seals
            page = os.fstatvfs(fd).f_bsize
            return seals, page, (st.st_dev, st.st_ino)
        finally:
            os.close(fd)

    def _carried(self, box: str, e: Entry, verdict: Preflight) -> bool:
        """Whether the daemon's backend carries the verdict's carrier across a kexec; a problem if not."""
        b = self.backend
        if not b.survives_kexec:
            if b.name == "memory":
                self.problem("backend", "BackendUnavailable", "is held by the memory backend, which does not "
                             f"cross a kexec: {self._why_memory()}", self._memory_fix(), box, e.name)
            else:
                self.problem("backend", "BackendUnavailable", f"cannot cross: the {b.name} backend reports KHO off "
                             "in this boot", "boot with kho=on, then restart fdboxd", box, e.name)
            return False
        if verdict.carrier is None or not b.accepts(verdict.carrier):
            what, fix = verdict.unaccepted
            self.problem("backend", "UnsupportedType", what.format(backend=b.name), fix, box, e.name)
            return False
        why = b.seal_refusal(verdict.carrier)  # the kernel backend beside LUO and a plain memfd
        if why is not None:
            what, _, fix = why.partition("; fix: ")
            self.problem("backend", "UnsupportedType",
                         f"is {'carried as ' if verdict.carrier != e.type else ''}{what}", fix, box, e.name)
            return False
        return True

    def _why_memory_facts(self) -> str:
        if self.requested == "memory":
            return "fdboxd runs with --backend memory or --user"
        luo = "LUO is absent (no /dev/liveupdate)" if not self.facts.luo_present() else "LUO did not open"
        ko = "fdbox.ko is not loaded" if not self.facts.module_loaded() else "/dev/fdbox did not open"
        return f"{luo} and {ko}"

    def _memory_fix(self) -> str:
        return ("boot a kernel with LUO and kho=on liveupdate=on (plain memfds) and/or load fdbox.ko (hugetlb), "
                "then restart fdboxd with --backend auto")

    # ------------------------------------------------------------------ the kernels

    def _kernel(self) -> None:
        f = self.facts
        loaded = f.kexec_loaded()
        if loaded is None:
            self.problem("kexec", "BackendUnavailable", "cannot read /sys/kernel/kexec_loaded: this kernel cannot "
                         "kexec", "use a kernel built with CONFIG_KEXEC_FILE")
        elif not loaded:
            self.problem("kexec", "BackendUnavailable", "no kexec kernel is loaded",
                         "load one: kexec -s -l KERNEL --initrd=INITRD --command-line=\"... kho=on liveupdate=on\" "
                         f"and record that command line in /{KEXEC_CMDLINE}")
        need = [k for k, on in (("kho", self.needs_kho), ("liveupdate", self.needs_luo)) if on]
        running = f.cmdline()
        if running is None:
            self.warn("cmdline", "cannot read /proc/cmdline: the running kernel's options are not checked")
        else:
            missing = [k for k in need if not option_on(cmdline_options(running), k)]
            if missing:
                self.problem("cmdline", "BackendUnavailable", "the running kernel was booted without "
                             f"{' '.join(k + '=on' for k in missing)}: nothing can be handed over",
                             f"reboot with {' '.join(k + '=on' for k in missing)} on the command line")
        if loaded:
            nxt = f.kexec_cmdline()
            if nxt is None:
                self.warn("kexec", "the loaded kernel's command line cannot be checked (the kernel does not "
                          f"expose it, and /{KEXEC_CMDLINE} does not record it)",
                          f"write the command line you load to /{KEXEC_CMDLINE}")
            else:
                missing = [k for k in need if not option_on(cmdline_options(nxt), k)]
                if missing:
                    self.problem("kexec", "BackendUnavailable", "the loaded kernel's command line (recorded in "
                                 f"/{KEXEC_CMDLINE}) lacks {' '.join(k + '=on' for k in missing)}: the next "
                                 "kernel would not take the handover",
                                 f"load it again with {' '.join(k + '=on' for k in missing)}")
            if self.needs_kmod:
                self._next_module()

    def _next_module(self) -> None:
        """fdbox.ko must exist for the kernel the kexec boots, or what it holds stays
        reserved there: checked where the loaded image was recorded (the kernel keeps no
        name of it), as a warning where it was not."""
        f = self.facts
        image = f.kexec_kernel()
        if image is None:
            self.warn("kexec", "which kernel is loaded is not recorded, so whether it has fdbox.ko is not checked",
                      f"write the path of the kernel image you load to /{KEXEC_KERNEL}")
            return
        release = f.kernel_release(image)
        if release is None:
            self.warn("kexec", f"the loaded kernel {image} (recorded in /{KEXEC_KERNEL}) is not a bzImage "
                      "this can read: whether it has fdbox.ko is not checked")
            return
        module = self.backend.next_kernel_module or "fdbox"
        built = f.module_built_for(release, module)
        if not built:
            where = (f"/lib/modules/{release} has no {module}.ko" if built is False
                     else f"there is no /lib/modules/{release}")
            self.problem("kexec", "BackendUnavailable", f"the loaded kernel {image} is {release} and {where}: "
                         f"what {module}.ko holds would stay reserved there, its boxes unrestored",
                         f"build {module}.ko for it (dkms install {module} -k {release}), or load a kernel that has it")

    def _device(self) -> None:
        """Another process holding /dev/liveupdate (luod, a tool) now would make the seal
        wait and then fail: say who, before the kexec is asked for."""
        if not self.needs_luo:
            return
        luo = getattr(self.backend, "luo", self.backend)  # MixedBackend's LUO side, or the backend
        probe = getattr(luo, "device_busy", None)
        reason = probe() if probe is not None else None
        if reason is not None:
            self.problem("backend", "BackendUnavailable", f"{reason}: a seal retries for --liveupdate-wait "
                         f"({getattr(luo, 'wait', 0):g} s), then fails",
                         "stop the process holding /dev/liveupdate (or let it finish) before systemctl kexec")

    def _why_memory(self) -> str:
        """Why auto ended on the memory backend: the backend's own problem lines say it best."""
        lines = [p for p in self.backend.problems() if p.startswith("LUO not used")]
        return "; ".join(lines) if lines else self._why_memory_facts()

    # ------------------------------------------------------------------ room

    def _room(self) -> None:
        f = self.facts
        mem = f.meminfo()
        if self.report.entries and self.backend.manifest_huge_pages:
            # the manifest carried in the sealed set (fdboxd.lifecycle)
            self.hugetlb_pages += self.backend.manifest_huge_pages
            free = mem.get("HugePages_Free")
            if free is not None and free < self.backend.manifest_huge_pages and CARRY_BOX not in self.backend.inventory():  # else reused
                self.problem("room", "LimitExceeded", "no free 2 MiB huge page for the manifest fdboxd carries "
                             "in the sealed set (with --backend kernel beside LUO it crosses in a hugetlb memfd)",
                             "reserve one more (sysctl vm.nr_hugepages), or restart fdboxd with --backend auto")
        if self.hugetlb_pages:
            nxt = f.kexec_cmdline() if f.kexec_loaded() else None
            source = f"/{KEXEC_CMDLINE}" if nxt is not None else "the running command line (assumed reused)"
            pool = hugepages_reserved(nxt if nxt is not None else f.cmdline(), HUGE_2M)
            if pool is None:
                self.warn("room", f"{source} reserves no 2 MiB huge pages (hugepages=): the restore copies "
                          f"{self.hugetlb_pages} pages of hugetlb memory into new ones",
                          f"boot the next kernel with hugepages={self.hugetlb_pages} or more, or set "
                          "vm.nr_hugepages before fdboxd starts")
            elif pool < self.hugetlb_pages:
                self.problem("room", "LimitExceeded", f"the next kernel reserves {pool} 2 MiB huge pages "
                             f"(hugepages= in {source}) but restoring the hugetlb entries copies into "
                             f"{self.hugetlb_pages}", f"load the next kernel with hugepages={self.hugetlb_pages} "
                             "or more")
        if self.gmem_bytes:
            avail = mem.get("MemAvailable")
            if avail is None:
                self.warn("room", "cannot read MemAvailable in /proc/meminfo: the guest_memfd copies are not checked")
            elif avail < self.gmem_bytes:
                self.problem("room", "LimitExceeded", f"sealing copies {_mib(self.gmem_bytes)} of guest_memfd "
                             f"into memfds but only {_mib(avail)} is available", "free memory (or stop a VM) "
                             "before the kexec")
        manifest = self.store.manifest
        if manifest is not None and self.report.entries:
            need = self.store.snapshot_bytes() + STATE_SLACK
            free = f.free_bytes(manifest.dir)
            if free is None:
                self.warn("room", f"cannot statvfs {manifest.dir}: the snapshot's room is not checked")
            elif free < need:
                self.problem("room", "BackendUnavailable", f"the state file system ({manifest.dir}) has "
                             f"{free} bytes free, and the seal writes a snapshot of about {need}",
                             f"free space on {manifest.dir} or start fdboxd with a --state-dir that has room")

    # ------------------------------------------------------------------ VMs

    def _vms(self) -> None:
        by_vm: dict[str, list[Any]] = {}
        for proc in self.facts.vm_processes():
            by_vm.setdefault(proc.vm, []).append(proc)
        for vm, procs in sorted(by_vm.items()):
            if self.only is not None and vm != self.only:
                continue
            unit = f"fdbox-qemu@{vm}.service"
            b = self.store.boxes.get(vm)
            ram = [e for e in b.entries.values() if self.store.kind(e.type).carried_by_backend] if b is not None else []
            if not ram:
                self.problem("vm", "NotFound", f"VM {vm} runs ({unit}, pid {procs[0].pid}) but fdbox holds no RAM "
                             "for it: its memory would be lost silently",
                             f"restart it with fdbox-qemu start {vm} (RAM in box {vm}), or stop it before the "
                             "kexec", vm)
                continue
            if vm in self.unopened:
                continue
            held = self.inodes.get(vm, set())
            for p in procs:
                stray = (p.memfds or frozenset()) - held
                if stray:
                    self.problem("vm", "NotFound", f"VM {vm} ({unit}, pid {p.pid}) maps {len(stray)} memfd(s) that "
                                 f"fdbox does not hold in box {vm}: that memory would be lost",
                                 "give the VM only memory fdbox-qemu put in its box", vm)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
