"""``fdbox-qemu``: run QEMU on RAM that fdbox keeps (see :mod:`fdboxd.qemu`).

::

    fdbox-qemu [--socket PATH] start VM --ram SIZE [--hugetlb 2M|1G] [--tap IFNAME[,queues=N][,bridge=BR]]... -- QEMU-ARGS...
    fdbox-qemu [--socket PATH] suspend VM
    fdbox-qemu [--socket PATH] status VM

Exit codes as fdboxctl: 0 done, 1 usage or unexpected, 2 argparse usage, and
``fdboxd.errors.EXIT_CODES[name]`` (10 and up) for each fdbox error name. ``start``
becomes QEMU (exec), so once QEMU runs its exit status is QEMU's.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import __version__
from ..errors import EXIT_CODES, FdboxError
from . import taps, vm


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
    s = sub.add_parser("suspend", help="save the device state into the box as devstate and quit QEMU")
    s.add_argument("vm", metavar="VM")
    s.add_argument("--json", action="store_true", help="print the phase times as JSON")
    s = sub.add_parser("status", help="the VM's box, entries and QEMU state")
    s.add_argument("vm", metavar="VM")
    s.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" is QEMU's, unchanged (argparse would eat options).
    qemu_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, qemu_args = argv[:cut], argv[cut + 1:]
    p = parser()
    a = p.parse_args(argv)
    if qemu_args and a.command != "start":
        p.error("only start takes QEMU-ARGS after --")
    run_dir = a.run_dir or vm.default_run_dir()
    try:
        if a.command == "start":
            args = qemu_args
            sizes = [vm.parse_size(s) for s in a.ram]
            tap_specs = [taps.parse_tap(t) for t in a.tap]
            return vm.start(a.vm, sizes, a.hugetlb, args, socket_path=a.socket, run_dir=run_dir, qemu=a.qemu,
                            taps=tap_specs)
        if a.command == "suspend":
            r = vm.suspend(a.vm, socket_path=a.socket, run_dir=run_dir)
            if a.json:
                print(json.dumps(r, sort_keys=True))
            else:
                print(f"{a.vm}: suspended ({r['was']} before); devstate {r['devstate_bytes'] >> 10} KiB; "
                      f"stop {r['stop_ms']:.1f} ms, save {r['save_ms']:.1f} ms, put {r['put_ms']:.1f} ms, "
                      f"quit {r['quit_ms']:.1f} ms")
            return 0
        r = vm.status(a.vm, socket_path=a.socket, run_dir=run_dir)
        if a.json:
            print(json.dumps(r, sort_keys=True))
        else:
            print(f"vm:      {a.vm}")
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


if __name__ == "__main__":
    sys.exit(main())
