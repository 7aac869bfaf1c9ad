"""Network helpers for the tap tests, on the host and in the VM guest (stdlib + fdboxd.net).

Namespaces are entered the way fdboxd does it (:func:`fdboxd.net.in_netns`: a thread
that ``setns()``es); interfaces are set up with ``ip`` (tests may shell out, the
product may not). Frames are plain Ethernet with an experimental ethertype.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import time

from fdboxd import net

ETH_TEST = 0x88B5  # IEEE 802 local experimental ethertype
ETH_P_ALL = 0x0003
TAP_FLAGS = net.IFF_TAP | net.IFF_NO_PI | net.IFF_VNET_HDR | net.IFF_MULTI_QUEUE


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {out.stderr}")
    return out


def ipn(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip`` in the named namespace ``ns`` (None: this process's own)."""
    return ip(*(("-n", ns) if ns else ()), *args, check=check)


def link_json(ns: str | None, ifname: str) -> dict:
    return json.loads(ipn(ns, "-d", "-j", "link", "show", "dev", ifname).stdout)[0]


def in_ns(name: str | None, fn):  # type: ignore[no-untyped-def]
    if name is None:
        return net.in_netns(None, fn)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return net.in_netns(fd, fn)
    finally:
        os.close(fd)


def open_tap(ns: str | None, ifname: str, flags: int, queues: int = 1) -> list[int]:
    """Open ``queues`` fds of tap ``ifname`` in ``ns``, the way a VMM does."""

    def opener() -> list[int]:
        fds = []
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fcntl.ioctl(fd, net.TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
            fds.append(fd)
        return fds

    return in_ns(ns, opener)


def packet_socket(ns: str | None, ifname: str) -> socket.socket:
    """An AF_PACKET socket bound to ``ifname`` inside ``ns`` (sockets keep their netns)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((ifname, 0))
        return s

    return in_ns(ns, make)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def frame(dst: str, src: str, payload: bytes) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ETH_TEST) + payload.ljust(46, b"\0")


def wait_frame(sock: socket.socket, payload: bytes, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select([sock], [], [], left)
        if r:
            data = sock.recv(65536)
            if data[12:14] == struct.pack("!H", ETH_TEST) and payload in data:
                return data
    raise AssertionError(f"frame {payload!r} never arrived")


def read_tap_frame(fds: list[int], hdr: int, payload: bytes, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        r, _, _ = select.select(fds, [], [], left)
        for fd in r:
            data = os.read(fd, 65536)[hdr:]
            if data[12:14] == struct.pack("!H", ETH_TEST) and payload in data:
                return data
    raise AssertionError(f"frame {payload!r} never reached the tap")


def vnet_hdr_sz(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, net.TUNGETVNETHDRSZ, buf, True)
    return struct.unpack("i", buf)[0]


def observed(ns: str | None, ifname: str) -> dict:
    """The recordable attributes as ``ip -d -j`` shows them (independent of pyroute2)."""
    j = link_json(ns, ifname)
    info = j.get("linkinfo", {})
    data = info.get("info_data", {})
    return {
        "mac": j["address"],
        "mtu": j["mtu"],
        "up": "UP" in j["flags"],
        "master": j.get("master"),
        "kind": info.get("info_kind"),
        "pi": data.get("pi"),
        "vnet_hdr": data.get("vnet_hdr"),
        "multi_queue": data.get("multi_queue"),
        "numqueues": data.get("numqueues"),
        "user": data.get("user"),
        "group": data.get("group"),
    }


def setup_bridged(ns: str | None) -> None:
    """br0 with veth port vA; vB (its peer, outside the bridge) watches the wire."""
    ipn(ns, "link", "add", "br0", "type", "bridge")
    ipn(ns, "link", "add", "vA", "type", "veth", "peer", "name", "vB")
    ipn(ns, "link", "set", "vA", "master", "br0")
    for dev in ("br0", "vA", "vB"):
        ipn(ns, "link", "set", dev, "up")


GUEST_MAC = "02:aa:bb:cc:dd:01"  # the VM's own address: a port's MAC is local to the bridge


def pass_frames(ns: str | None, fds: list[int], hdr: int, tag: bytes) -> None:
    """A guest frame tap → bridge → vB, and vB → bridge → tap (learned on the tap's port)."""
    sniff = packet_socket(ns, "vB")
    try:
        out = f"to-wire-{tag.decode()}".encode()
        os.write(fds[0], bytes(hdr) + frame("02:aa:bb:cc:dd:ee", GUEST_MAC, out))
        got = wait_frame(sniff, out)
        assert got[6:12] == mac_bytes(GUEST_MAC)
        back = f"to-tap-{tag.decode()}".encode()
        vb_mac = link_json(ns, "vB")["address"]
        sniff.send(frame(GUEST_MAC, vb_mac, back))
        got = read_tap_frame(fds, hdr, back)
        assert got[:6] == mac_bytes(GUEST_MAC)
    finally:
        sniff.close()
