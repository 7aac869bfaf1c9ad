"""In-guest steps that bring a bridged multi-queue tap through a live update.

Stage scripts (and the live-update test) call it as ``python3 tests/vm/netstage.py CMD``:

``network [--netns NS]``
    What the host's own network configuration does at boot: (the named namespace and)
    bridge ``br0`` with veth port ``vA``, whose peer ``vB`` watches the wire. Stage 1
    runs it before the VMM starts; stage 2 before fdboxd starts, so that fdboxd finds
    the bridge when it recreates the tap.
``put --socket S --box B --out F [--netns NS]``
    The VMM's part before the kexec: open tap ``vmtap0`` with two queues (IFF_TAP,
    IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE), set its MAC, MTU, owner, bridge, up;
    pass a frame each way; put the queues as ``B/net0.q0`` and ``B/net0.q1``; write
    the interface as ``ip -d -j`` sees it to ``F``.
``verify --socket S --box B --before F [--netns NS]``
    After the kexec (fdboxd recreated the tap at start): the interface matches ``F``
    attribute for attribute, the VMM gets both queues back, and frames pass both ways.
    Prints ``OK net vmtap0`` on success; anything else raises.
``qemu-taps --ifname IF --daemon-pid P --out F``
    From the host side of a QEMU that ``fdbox-qemu --tap IF`` started: which process
    holds queues of tap ``IF`` besides fdboxd (it must be exactly one QEMU), how many,
    whether each is the very file fdboxd holds (``kcmp(KCMP_FILE)``), and the interface
    as ``ip -d -j`` sees it; written to ``F`` as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: nettest
sys.path.insert(0, str(HERE.parent.parent))  # the checkout: fdboxd

from nettest import TAP_FLAGS, ip, ipn, observed, open_tap, pass_frames, setup_bridged, vnet_hdr_sz  # noqa: E402

from fdboxd import net  # noqa: E402
from fdboxd.client import Client  # noqa: E402

IFNAME = "vmtap0"
MAC = "02:00:5e:42:00:01"
MTU = "1400"
OWNER = 107  # a typical libvirt-qemu uid: any value TUNSETOWNER takes
VNET_HDR = 12  # virtio-net with VIRTIO_NET_F_MRG_RXBUF


def cmd_network(a: argparse.Namespace) -> None:
    if a.netns:
        ip("netns", "add", a.netns)
        ipn(a.netns, "link", "set", "lo", "up")
    setup_bridged(a.netns)


def cmd_put(a: argparse.Namespace) -> None:
    fds = open_tap(a.netns, IFNAME, TAP_FLAGS, queues=2)
    for fd in fds:
        fcntl.ioctl(fd, net.TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR))
    fcntl.ioctl(fds[0], net.TUNSETOWNER, OWNER)
    ipn(a.netns, "link", "set", IFNAME, "address", MAC, "mtu", MTU, "master", "br0")
    ipn(a.netns, "link", "set", IFNAME, "up")
    pass_frames(a.netns, fds, VNET_HDR, b"stage1")
    seen = observed(a.netns, IFNAME)
    with Client(a.socket) as c:
        entries = c.put_many(a.box, [("net0.q0", fds[0]), ("net0.q1", fds[1])])
    for fd in fds:
        os.close(fd)
    Path(a.out).write_text(json.dumps({"observed": seen, "entries": entries}, indent=1))
    print(f"put {IFNAME}: {seen}")


def cmd_verify(a: argparse.Namespace) -> None:
    before = json.loads(Path(a.before).read_text())
    now = observed(a.netns, IFNAME)
    diff = {k: (before["observed"][k], now.get(k)) for k in before["observed"] if before["observed"][k] != now.get(k)}
    if diff:
        raise SystemExit(f"{IFNAME} came back different (before, now): {diff}")
    if now["numqueues"] != 2 or now["master"] != "br0" or now["user"] is None:
        raise SystemExit(f"{IFNAME} is not the bridged two-queue tap it was: {now}")
    fds: dict[str, int] = {}
    try:
        with Client(a.socket) as c:
            for name in ("net0.q0", "net0.q1"):
                entry, fds[name] = c.get(a.box, name)
                if entry["type"] != "tap" or entry["extra"]["net"]["ifname"] != IFNAME:
                    raise SystemExit(f"{name} came back as {entry}")
        for name, fd in fds.items():
            if vnet_hdr_sz(fd) != VNET_HDR:
                raise SystemExit(f"{name}: vnet header size {vnet_hdr_sz(fd)}, not {VNET_HDR}")
        pass_frames(a.netns, [fds["net0.q0"], fds["net0.q1"]], VNET_HDR, b"stage2")
    finally:
        for fd in fds.values():
            os.close(fd)
    print(f"OK net {IFNAME} {json.dumps(now, sort_keys=True)}")


SYS_KCMP, KCMP_FILE = 312, 0  # x86_64


def _tap_fds(pid: int, ifname: str) -> list[int]:
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if f"\niff:\t{ifname}\n" in info:
            out.append(int(fd))
    return sorted(out)


def cmd_qemu_taps(a: argparse.Namespace) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    daemon = _tap_fds(a.daemon_pid, a.ifname)
    holders = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid != a.daemon_pid and (fds := _tap_fds(pid, a.ifname)):
            holders[pid] = fds
    qemus = {pid: fds for pid, fds in holders.items() if os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu")}
    same = {}
    for pid, fds in qemus.items():
        same[pid] = [any(libc.syscall(SYS_KCMP, pid, a.daemon_pid, KCMP_FILE, fd, d) == 0 for d in daemon) for fd in fds]
    report = {"daemon_fds": len(daemon), "holders": len(holders), "qemu": [
        {"pid": pid, "fds": len(fds), "same_file_as_fdboxd": same[pid]} for pid, fds in qemus.items()],
        "observed": observed(None, a.ifname)}
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"qemu-taps {a.ifname}: {report}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netstage", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("qemu-taps")
    s.add_argument("--ifname", required=True)
    s.add_argument("--daemon-pid", type=int, required=True)
    s.add_argument("--out", required=True)
    for name in ("network", "put", "verify"):
        s = sub.add_parser(name)
        s.add_argument("--netns", default=None, help="named namespace (default: this one)")
        if name != "network":
            s.add_argument("--socket", default="/run/fdbox/fdboxd.sock")
            s.add_argument("--box", default="vm1")
        if name == "put":
            s.add_argument("--out", required=True)
        if name == "verify":
            s.add_argument("--before", required=True)
    a = p.parse_args(argv)
    {"network": cmd_network, "put": cmd_put, "verify": cmd_verify, "qemu-taps": cmd_qemu_taps}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
