"""``fdbox-qemu``: run QEMU on RAM that fdbox keeps (see :mod:`fdboxd.qemu`).

::

    fdbox-qemu [--socket PATH] start VM --ram SIZE [--hugetlb 2M|1G] [--tap IFNAME[,queues=N][,bridge=BR]]... -- QEMU-ARGS...
    fdbox-qemu [--socket PATH] suspend VM... | suspend --all
    fdbox-qemu [--socket PATH] status [VM] [--json]
    fdbox-qemu [--socket PATH] upgrade VM... [--qemu PATH] [--json] [-- QEMU-ARGS...] | upgrade --all

Exit codes as fdboxctl: 0 done, 1 usage or unexpected, 2 argparse usage, and
``fdboxd.errors.EXIT_CODES[name]`` (10 and up) for each fdbox error name; a suspend of
several VMs (and an upgrade of several) exits with the code of the first VM (in the
order given) that failed, after all were tried, and each failed VM's stderr line names it
(``VM NAME: ...``). ``start`` becomes QEMU (exec), so once QEMU runs its exit status is QEMU's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import EXIT_CODES, FdboxError
from . import taps, vm

# `start` is on the resume blackout path, once per VM: it imports only what it needs
# before it execs QEMU. fleet (threads, the suspend/status of many VMs) is imported by
# the commands that use it; the QMP client and sd_notify by the helper after its fork.


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fdbox-qemu", description="Run QEMU on guest RAM held by fdboxd, "
                                "so the VM survives a QEMU restart and a host kexec.")
    p.add_argument("--socket", help="fdboxd's socket (default: $FDBOX_SOCKET, the system socket, or the user one)")
    p.add_argument("--run-dir", default=None,
                   help="where the per-VM QMP sockets live (default: /run/fdbox/qemu as root, else the user's runtime dir)")
    p.add_argument("--version", action="version", version=f"fdbox-qemu {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="boot the VM, or resume it if its box holds a devstate",
                       usage="fdbox-qemu start VM --ram SIZE [--hugetlb 2M|1G] [--tap IFNAME[,queues=N][,bridge=BR]]... "
                       "-- QEMU-ARGS...")
    s.add_argument("vm", metavar="VM")
    s.add_argument("--ram", action="append", required=True, metavar="SIZE",
                   help="guest RAM (64M, 1G, …); repeat for one NUMA node per ramN entry")
    s.add_argument("--hugetlb", choices=sorted(vm.HUGETLB_SIZES), help="back the RAM with hugetlb memfds of this page size")
    s.add_argument("--tap", action="append", default=[], metavar="IFNAME[,queues=N][,bridge=BR]",
                   help="a tap held in the box as tap.IFNAME.qN (created, on bridge BR, if the box has none); "
                   "QEMU gets -netdev tap,id=IFNAME,fd(s)=…: add -device virtio-net-pci,netdev=IFNAME to QEMU-ARGS")
    s.add_argument("--qemu", default=vm.default_qemu(), help="QEMU binary (default: $FDBOX_QEMU or qemu-system-x86_64)")
    s = sub.add_parser("suspend", help="save each VM's device state into its box as devstate and quit its QEMU "
                       "(several VMs: side by side)", usage="fdbox-qemu suspend VM... | suspend --all [--json]")
    s.add_argument("vm", metavar="VM", nargs="*")
    s.add_argument("--all", action="store_true", help="every VM whose QEMU fdbox-qemu started (none running: nothing to do)")
    s.add_argument("--json", action="store_true", help="one JSON line per VM: the phase times, or the error")
    s = sub.add_parser("upgrade", help="replace each VM's running QEMU by a new one on the same RAM and taps: the new "
                       "QEMU starts first, then only device state moves (several VMs: side by side)",
                       usage="fdbox-qemu upgrade VM... [--qemu PATH] [--json] [-- QEMU-ARGS...] | upgrade --all")
    s.add_argument("vm", metavar="VM", nargs="*")
    s.add_argument("--all", action="store_true", help="every VM whose QEMU answers")
    s.add_argument("--qemu", default=None, help="the new QEMU binary (default: the one the VM's start recorded, "
                   "else $FDBOX_QEMU or qemu-system-x86_64)")
    s.add_argument("--json", action="store_true", help="one JSON line per VM: pids, versions, phase times, or the error")
    s = sub.add_parser("status", help="one VM's box, entries and QEMU state; no VM: a line for every VM fdbox holds")
    s.add_argument("vm", metavar="VM", nargs="?")
    s.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is QEMU's, unchanged (argparse would eat options).
    qemu_args: list[str] = []
    dashdash = "--" in argv
    if dashdash:
        cut = argv.index("--")
        argv, qemu_args = argv[:cut], argv[cut + 1:]
    p = parser()
    a = p.parse_args(argv)
    if qemu_args and a.command not in ("start", "upgrade"):
        p.error("only start and upgrade take QEMU-ARGS after --")
    run_dir = a.run_dir or vm.default_run_dir()
    try:
        if a.command == "start":
            args = qemu_args
            sizes = [vm.parse_size(s) for s in a.ram]
            tap_specs = [taps.parse_tap(t) for t in a.tap]
            return vm.start(a.vm, sizes, a.hugetlb, args, socket_path=a.socket, run_dir=run_dir, qemu=a.qemu,
                            taps=tap_specs)
        if a.command == "suspend":
            return _suspend(p, a, run_dir)
        if a.command == "upgrade":
            return _upgrade(p, a, run_dir, qemu_args if dashdash else None)
        if a.vm is None:
            from . import fleet

            rows = fleet.status_all(socket_path=a.socket, run_dir=run_dir)
            if a.json:
                print(json.dumps(rows, sort_keys=True))
            else:
                _print_table(rows)
            return 0
        r = vm.status(a.vm, socket_path=a.socket, run_dir=run_dir)
        if a.json:
            print(json.dumps(r, sort_keys=True))
        else:
            print(f"vm:      {a.vm}")
            print(f"state:   {r['state']}")
            print(f"qemu:    {r['qemu']}" + (f" (QEMU {r['qemu_version']})" if "qemu_version" in r else ""))
            print(f"box:     {r['box'] or '-'}")
            for e in r["entries"]:
                print(f"entry:   {e['name']} {e['type']} {int(e['size']) >> 10} KiB")
            if r["resumable"]:
                print("resume:  devstate present; `fdbox-qemu start` resumes the guest")
        return 0
    except FdboxError as e:
        print(f"fdbox-qemu: {e.name}: {e.message}", file=sys.stderr)
        return EXIT_CODES[e.name]
    except OSError as e:  # an error failpoint (FDBOX_FAILPOINTS), or a system call nothing above named
        print(f"fdbox-qemu: BackendUnavailable: {e}", file=sys.stderr)
        return EXIT_CODES["BackendUnavailable"]


def _suspend(p: argparse.ArgumentParser, a: argparse.Namespace, run_dir: str) -> int:
    if a.all == bool(a.vm):
        p.error("suspend takes VM names or --all, not both and not neither")
    from . import fleet

    if a.all:
        outcomes = fleet.suspend_all(socket_path=a.socket, run_dir=run_dir)
        if not outcomes and not a.json:
            print("no VM running")
    else:
        outcomes = fleet.suspend_many(a.vm, socket_path=a.socket, run_dir=run_dir)
    return _report(outcomes, a.json, lambda vm, r: (
        f"{vm}: suspended ({r['was']} before); devstate {r['devstate_bytes'] >> 10} KiB; "
        f"stop {r['stop_ms']:.1f} ms, save {r['save_ms']:.1f} ms, put {r['put_ms']:.1f} ms, "
        f"quit {r['quit_ms']:.1f} ms"))


def _upgrade(p: argparse.ArgumentParser, a: argparse.Namespace, run_dir: str, qemu_args: list[str] | None) -> int:
    if a.all == bool(a.vm):
        p.error("upgrade takes VM names or --all, not both and not neither")
    if qemu_args is not None and (a.all or len(a.vm) != 1):
        p.error("QEMU-ARGS after -- are for one VM: with several, each keeps the ones its start recorded")
    from . import fleet

    if a.all:
        outcomes = fleet.upgrade_all(socket_path=a.socket, run_dir=run_dir, qemu=a.qemu)
        if not outcomes and not a.json:
            print("no VM running")
    else:
        # A unit's `systemctl reload` (ExecReload=): the unit's one VM gets MAINPID= and READY=1.
        notify = os.environ.pop("NOTIFY_SOCKET", None)
        outcomes = fleet.upgrade_many(a.vm, socket_path=a.socket, run_dir=run_dir, qemu=a.qemu, qemu_args=qemu_args,
                                      notify=notify)
    return _report(outcomes, a.json, lambda vm, r: (
        f"{vm}: upgraded ({r['was']}): QEMU pid {r['old_pid']} ({r['old_qemu']}) -> {r['new_pid']} "
        f"({r['new_qemu']}); new QEMU up in {r['spawn_ms']:.1f} ms, guest paused {r['blackout_ms']:.1f} ms, "
        f"old quit in {r['quit_ms']:.1f} ms"))


def _report(outcomes: Any, as_json: bool, line: Callable[[str, dict[str, Any]], str]) -> int:
    """Print each VM's outcome of suspend or upgrade (one line, or JSON); the exit code of the
    first error, 0 if none. Each error line names its VM (``VM NAME:`` unless the message
    starts so): with several VMs, the exit status is one VM's, and stderr says which."""
    code = 0
    for o in outcomes:
        if o.error is not None:
            message = o.error.message
            if not message.startswith(f"VM {o.vm} ") and not message.startswith(f"VM {o.vm}:"):
                message = f"VM {o.vm}: {message}"
            print(f"fdbox-qemu: {o.error.name}: {message}", file=sys.stderr)
            if as_json:
                print(json.dumps({"vm": o.vm, "error": o.error.name, "message": o.error.message}, sort_keys=True))
            code = code or EXIT_CODES[o.error.name]
            continue
        r = o.result or {}
        print(json.dumps(r, sort_keys=True) if as_json else line(o.vm, r))
    sys.stdout.flush()
    return code


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'VM':<16} {'STATE':<11} {'BOX':<9} {'RAM':<15} {'DEVSTATE':>9}  TAPS")
    for r in rows:
        ram = f"{r['ram_bytes'] >> 20} MiB" if r["ram_bytes"] else "-"
        dev = f"{r['devstate_bytes'] >> 10} KiB" if r["devstate_bytes"] is not None else "-"
        taps = ",".join(t["ifname"] + (f"x{t['queues']}" if t["queues"] > 1 else "") for t in r["taps"]) or "-"
        kind = "/".join(t.replace("memfd-hugetlb", "hugetlb") for t in r["ram_type"])
        ram += f" {kind}" if kind and kind != "memfd" else ""
        print(f"{r['vm']:<16} {r['state']:<11} {r['box'] or '-':<9} {ram:<15} {dev:>9}  {taps}")


if __name__ == "__main__":
    sys.exit(main())
