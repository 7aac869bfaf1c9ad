"""200 malformed messages, many with fds attached: each gets an error reply (or a dropped
half message), no fd leaks in the daemon (/proc/PID/fd), and the daemon still serves."""

from __future__ import annotations

import json
import os

from fdboxtest import RawConnection, memfd_with, pattern, wait_for

from fdboxd.client import read_all

MAX_FDS = 7  # odd on purpose: CMSG_SPACE rounds up, so 8 fds arrive and are refused by
# the framer, 9 or more are cut by the kernel (MSG_CTRUNC): both paths are exercised.
PUT = "io.fdbox.Store.Put"


def memfds(n: int) -> list[int]:
    return [memfd_with(b"m" * 16) for _ in range(n)]


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _replying_cases() -> list[tuple[str, bytes, int, str | None]]:
    """(label, bytes, number of memfds to attach, expected error or None for any error)."""
    big = b'{"method":"' + b"a" * ((1 << 20) + 10) + b'"}\0'
    cases: list[tuple[str, bytes, int, str | None]] = []
    for i in range(12):
        cases.append(("bad json", b"{not json %d}\0" % i, i % 3, "io.fdbox.Store.InvalidRequest"))
    for doc in (b"[1,2]", b'"str"', b"42", b"null", b"true", b"[]"):
        cases.append(("not an object", doc + b"\0", 1, "io.fdbox.Store.InvalidRequest"))
        cases.append(("not an object", doc + b"\0", 0, "io.fdbox.Store.InvalidRequest"))
    for i in range(3):
        cases.append(("oversized", big, i, "io.fdbox.Store.InvalidRequest"))
    cases.append(("not utf-8", b'{"method":"\xff\xfe"}\0', 2, "io.fdbox.Store.InvalidRequest"))
    cases.append(("empty", b"\0", 1, "io.fdbox.Store.InvalidRequest"))
    for m in ("io.fdbox.Store.Nope", "io.fdbox.Store.put"):
        for n in (0, 2):
            cases.append(("unknown method", json.dumps({"method": m}).encode() + b"\0", n,
                          "org.varlink.service.MethodNotFound"))
    for m in ("com.example.Foo.Bar", "org.varlink.Nothing.X"):
        cases.append(("unknown interface", json.dumps({"method": m}).encode() + b"\0", 1,
                      "org.varlink.service.InterfaceNotFound"))
    for m in (None, 42, "NoDot", ["a"]):
        cases.append(("bad method", json.dumps({"method": m}).encode() + b"\0", 1, "io.fdbox.Store.InvalidRequest"))
    bad_params: list[object] = [
        [], "x", 5,
        {"box": 1, "name": "a", "fd": 0},
        {"box": "vm", "name": None, "fd": 0},
        {"box": "vm", "name": "a", "fd": 0, "bogus": 1},
        {"box": "vm", "name": "a", "fd": 0, "metadata": []},
        {"box": "vm", "name": "a", "fd": 0, "metadata": {"k": 1}},
        {"box": "vm", "name": "a"},
        {"box": "vm/x", "name": "a", "fd": 0},
        {"box": "vm", "name": "-a", "fd": 0},
    ]
    for p in bad_params:
        for n in (0, 1, 3):
            cases.append(("bad params", json.dumps({"method": PUT, "parameters": p}).encode() + b"\0", n, None))
    for idx in (1, 5, -1, "0", 1.5, True, None, 253, 10**12):
        for n in (0, 1):
            msg = {"method": PUT, "parameters": {"box": "vm", "name": "a", "fd": idx}}
            cases.append(("bad fd index", json.dumps(msg).encode() + b"\0", n, "io.fdbox.Store.InvalidRequest"))
    for entries in ([{"name": "a", "fd": 3}], [{"name": "a", "fd": 0}, {"name": "b", "fd": 9}],
                    [{"name": "a"}], "x", [1], [{"name": "a", "fd": 0, "x": 1}]):
        msg = {"method": "io.fdbox.Store.PutMany", "parameters": {"box": "vm", "entries": entries}}
        cases.append(("bad PutMany", json.dumps(msg).encode() + b"\0", 1, "io.fdbox.Store.InvalidRequest"))
    for other in ("Get", "List", "Status", "Seal", "GetBox", "Remove"):  # fds where none belong
        msg = {"method": f"io.fdbox.Store.{other}", "parameters": {"box": 7}}
        cases.append(("fds on a non-fd call", json.dumps(msg).encode() + b"\0", 2, None))
    for n in (MAX_FDS + 1, MAX_FDS + 2, 20, 64, 253):
        msg = {"method": PUT, "parameters": {"box": "vm", "name": "toomany", "fd": 0}}
        cases.append(("too many fds", json.dumps(msg).encode() + b"\0", n, "io.fdbox.Store.InvalidRequest"))
    return cases


def test_two_hundred_malformed_messages_leak_nothing(daemon_factory):
    d = daemon_factory("--max-fds-per-message", str(MAX_FDS))
    # The fixture's readiness probe may still be open in the daemon for a moment: the
    # baseline is the count once it has stayed the same for half a second.
    baseline = d.settled_fd_count()
    with d.client() as c:  # warm up every code path once (fd type detection, replies)
        fd = memfd_with(b"warm")
        c.put("warm", "up", fd)
        os.close(fd)
        _, got = c.get("warm", "up")
        os.close(got)
        c.delete_box("warm")
    assert wait_for(lambda: d.fd_count() == baseline), "a well-formed session left fds behind"

    cases = _replying_cases()
    sent = 0
    with RawConnection(d.socket) as raw:
        for label, data, nfds, expected in cases:
            fds = memfds(nfds)
            try:
                raw.send(data, fds)
            finally:
                close_all(fds)
            reply = raw.recv()
            sent += 1
            assert "error" in reply, (label, data[:80], reply)
            if expected is not None:
                assert reply["error"] == expected, (label, data[:80], reply)
            assert "fd" not in reply.get("parameters", {}), (label, reply)
        # Several bad messages in one write, fds on the second: one reply each, in order.
        fds = memfds(2)
        raw.send(b"{bad}\0[1]\0" + json.dumps({"method": "io.fdbox.Store.Nope"}).encode() + b"\0", fds)
        close_all(fds)
        assert [raw.recv()["error"] for _ in range(3)] == [
            "io.fdbox.Store.InvalidRequest", "io.fdbox.Store.InvalidRequest", "org.varlink.service.MethodNotFound"]
        sent += 3
        # A message split over writes with fds on its first part.
        fds = memfds(1)
        raw.send(b'{"method":"io.fdbox.Store.Put","parame', fds)
        close_all(fds)
        raw.send(b'ters":{"box":"vm","name":"a","fd":1}}\0')
        assert raw.recv()["error"] == "io.fdbox.Store.InvalidRequest"
        sent += 1

    # Half messages (with and without fds), then hang up.
    halves = [b'{"method":"io.fdbox.Store.Put","parameters":{"box":"vm"', b"{", b'{"method":"io.fdbox.St',
              b"x" * 70000, b'{"method": "io.fdbox.Store.Status"}\0{"meth']
    while sent < 200:
        data = halves[sent % len(halves)]
        fds = memfds(sent % 4)
        with RawConnection(d.socket) as half:
            try:
                half.send(data, fds)
            finally:
                close_all(fds)
        sent += 1
    assert sent >= 200

    assert wait_for(lambda: d.fd_count() == baseline, timeout=10), (
        f"daemon holds {d.fd_count()} fds, had {baseline}: {sorted(os.listdir(f'/proc/{d.pid}/fd'))}")
    assert d.alive()
    with d.client() as c:  # still serves, fds and all
        fd = memfd_with(pattern(4096))
        c.put("after", "ram0", fd)
        os.close(fd)
        _, got = c.get("after", "ram0")
        assert read_all(got) == pattern(4096)
        os.close(got)
        assert c.status()["entries"] == 1
