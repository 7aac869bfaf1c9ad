"""Issue 13, protocol and resources: hostile messages get one reply each, in order, and
pin nothing; fd floods, unread replies, connection floods and idle connections are
bounded; accept() out of fds backs off instead of spinning."""

from __future__ import annotations

import json
import os
import resource
import socket
import time

import pytest
from fdboxtest import RawConnection, memfd_with, run_as_user, wait_for

from fdboxd.client import Client
from fdboxd.errors import FdboxError

OTHER = 65534
STATUS = {"method": "io.fdbox.Store.Status"}
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")


def memfds(n: int) -> list[int]:
    return [memfd_with(b"x") for _ in range(n)]


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def test_deep_nesting_gets_its_reply_and_pipelined_neighbours_theirs(daemon):
    base = daemon.settled_fd_count()
    deep = b'{"method":"io.fdbox.Store.List","parameters":{"box":' + b"[" * 5000 + b"]" * 5000 + b"}}\0"
    with RawConnection(daemon.socket) as raw:
        fds = memfds(3)
        raw.send(json.dumps(STATUS).encode() + b"\0" + deep[:20], [])
        raw.send(deep[20:] + json.dumps(STATUS).encode() + b"\0", [])  # neighbours in the same reads
        raw.send(deep, fds)
        close_all(fds)
        replies = [raw.recv() for _ in range(4)]
    assert "error" not in replies[0] and "error" not in replies[2]
    assert replies[1]["error"] == replies[3]["error"] == "io.fdbox.Store.InvalidRequest"
    assert wait_for(lambda: daemon.fd_count() == base), daemon.fd_count()
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize("message", [
    {"method": "io.fdbox.Store.\ud800"},
    {"method": "io.fdbox.Store.Get", "parameters": {"box": "\ud800", "name": "a"}},
    {"method": "\udc00.x.Y"},
    {"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "\ud800"}},
    {"method": "io.fdbox.Store.Put", "parameters": {"box": "b", "name": "n", "fd": 0, "metadata": {"k": "\ud800"}}},
    {"method": "io.fdbox.Store.Put", "parameters": {"box": "b", "name": "n", "fd": 0, "metadata": {"\udfff": "v"}}},
])
def test_lone_surrogates_are_invalid_requests_in_order(shared_daemon, message):
    with RawConnection(shared_daemon.socket) as raw:
        fds = memfds(1)
        raw.send(json.dumps(message).encode() + b"\0" + json.dumps(STATUS).encode() + b"\0", fds)
        close_all(fds)
        bad, ok = raw.recv(), raw.recv()
    assert bad["error"] == "io.fdbox.Store.InvalidRequest", bad
    assert "error" not in ok and "backend" in ok["parameters"]
    assert "Traceback" not in shared_daemon.log()


RAW_SURROGATE = b"\xed\xa0\x80"  # U+D800 as UTF-8: json.loads(bytes) takes it without any \\u
GETINFO = {"method": "org.varlink.service.GetInfo"}


def _wire(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\0"


def test_surrogates_in_a_pipelined_batch_leave_every_reply_in_step(daemon):
    """Issue 18 §5a: each reply answers its own request, with that request's fds."""
    with daemon.client() as c:
        for name in ("a", "b"):
            fd = memfd_with(b"x")
            c.put("sv", name, fd)
            os.close(fd)
    get = {"method": "io.fdbox.Store.Get", "parameters": {"box": "sv", "name": "a"}}
    batch = [  # (wire, reply expected: None for none, else (error or None, fds))
        (_wire({"method": "io.fdbox.Store.Put", "parameters": {"box": "sv", "name": "c", "fd": 0,
                                                             "metadata": {"k": "SURR"}}}), ("InvalidRequest", 0)),
        (_wire(get), (None, 1)),
        (_wire({"method": "io.fdbox.Store.Get", "parameters": {"box": "svSURR", "name": "a"}}), ("InvalidRequest", 0)),
        (_wire({"method": "io.fdbox.Store.GetBox", "parameters": {"box": "sv"}}), (None, 2)),
        (_wire({"oneway": True, "method": "io.fdbox.Store.Get", "parameters": {"box": "\ud800", "name": "a"}}), None),
        (_wire({"method": "io.fdbox.Store.Get", "parameters": {"box": "sv", "name": "b"}}), (None, 1)),
        (_wire({"oneway": True, "method": "io.fdbox.Store.Put", "parameters": {"box": "sv", "name": "dSURR", "fd": 0}}),
         None),
        (_wire({"method": "io.fdbox.Store.PutMany", "parameters": {"box": "sv", "entries": [
            {"name": "e", "fd": 0}, {"name": "f", "fd": 1, "metadata": {"SURR": "v"}}]}}), ("InvalidRequest", 0)),
        (_wire(get), (None, 1)),
        (_wire(STATUS), (None, 0)),
    ]
    with RawConnection(daemon.socket) as raw:
        for data, _ in batch:
            fds = memfds(2)
            raw.send(data.replace(b"SURR", RAW_SURROGATE), fds)
            close_all(fds)
        raw.send(_wire(GETINFO))
        for data, want in batch:
            if want is None:
                continue
            reply, nfds = raw.recv_counting_fds()
            error = reply.get("error", "").removeprefix("io.fdbox.Store.") or None
            assert (error, nfds) == want, (data, reply)
            if data.startswith(b'{"method": "io.fdbox.Store.Get"') and error is None:
                assert reply["parameters"]["fd"] == 0 and reply["parameters"]["entry"]["name"] in ("a", "b")
        assert reply["parameters"]["entries"] == 2, "a refused Put stored something"
        assert raw.recv()["parameters"]["vendor"] == "fdbox", "more replies than requests"
    log = daemon.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


@pytest.mark.parametrize("data", [
    _wire({"oneway": True, "method": "io.fdbox.Store.Get", "parameters": {"box": "\ud800", "name": "a"}}),
    _wire({"oneway": True, "method": "io.fdbox.Store.\udc00"}),
    _wire({"oneway": True, "method": "io.fdbox.Store.Put", "parameters": {"box": "b", "name": "n", "fd": 0,
                                                                         "metadata": {"\udfff": "v"}}}),
    b'{"oneway":true,"method":"io.fdbox.Store.Get","parameters":{"box":"' + RAW_SURROGATE + b'","name":"a"}}\0',
    b'{"method":"io.fdbox.Store.List","oneway":true,"parameters":{"box":' + b"[" * 40 + b"]" * 40 + b"}}\0",
], ids=["box", "method", "metadata-key", "raw-utf8", "too-deep"])
def test_a_refused_oneway_call_gets_no_reply(shared_daemon, data):
    """Issue 18 §5b: oneway means no reply, also when the message is refused."""
    with RawConnection(shared_daemon.socket) as raw:
        fds = memfds(1)
        raw.send(data + _wire(STATUS), fds)
        close_all(fds)
        first = raw.recv()
        assert "error" not in first and "backend" in first["parameters"], first
        raw.send(_wire(GETINFO))
        assert raw.recv()["parameters"]["vendor"] == "fdbox"
    assert "Traceback" not in shared_daemon.log()


def test_getbox_replies_queued_behind_unread_ones_keep_their_fds_after_a_delete(daemon):
    """GetBox sends the memory backend's own fds when the socket takes the reply at once;
    a reply that has to wait holds copies, so deleting the box meanwhile changes nothing
    a queued reply carries (and nothing is left open once all are read)."""
    with daemon.client() as c:
        fds = [memfd_with(b"slot%d" % i) for i in range(4)]
        c.put_many("qb", [(f"ram{i}", fd) for i, fd in enumerate(fds)])
        close_all(fds)
    base = daemon.settled_fd_count()
    n = 400  # far more reply bytes than a socket buffer holds: most replies queue
    with RawConnection(daemon.socket, timeout=30) as raw:
        raw.send(_wire({"method": "io.fdbox.Store.GetBox", "parameters": {"box": "qb"}}) * n)
        time.sleep(1.0)
        with daemon.client() as c:
            c.call("DeleteBox", {"box": "qb"})
        from fdboxd.varlink.protocol import recv_into

        ok = 0
        for _ in range(n):
            while (frame := raw.framer.take()) is None:
                assert recv_into(raw.sock, raw.framer)
            try:
                if "error" in frame.message:  # read after the delete: the rest are all NotFound
                    assert frame.message["error"] == "io.fdbox.Store.NotFound" and not frame.fds, frame.message
                    continue
                assert ok == _, "a GetBox answered after one that found no box"
                assert [g["entry"]["name"] for g in frame.message["parameters"]["entries"]] == [
                    f"ram{i}" for i in range(4)]
                assert [os.pread(fd, 5, 0) for fd in frame.fds] == [b"slot%d" % i for i in range(4)]
                ok += 1
            finally:
                close_all(frame.fds)
    assert 50 < ok < n, ok  # many waited in the queue, past the delete
    assert wait_for(lambda: daemon.fd_count() == base - 4), (daemon.fd_count(), base)


def test_fds_of_a_message_that_never_ends_are_capped(daemon_factory):
    d = daemon_factory("--max-fds-per-message", "8")
    base = d.settled_fd_count()
    with RawConnection(d.socket) as raw:
        raw.send(b'{"method":"io.fdbox.Store.Put","parameters":{"box":"b","name":"n","fd":0}')
        for _ in range(10):  # 10 x 8 fds, no terminator: 80 fds if nothing caps them
            fds = memfds(8)
            raw.send(b" ", fds)
            close_all(fds)
        time.sleep(0.3)
        assert d.fd_count() <= base + 8, d.fd_count() - base
        raw.send(b"\0")
        reply = raw.recv()
        assert reply["error"] == "io.fdbox.Store.InvalidRequest" and "more than 8" in reply["parameters"]["message"]
    assert wait_for(lambda: d.fd_count() == base)


def test_unread_replies_hold_a_bounded_number_of_fds(daemon_factory):
    d = daemon_factory("--max-fds-in-flight-per-connection", "32")
    base = d.settled_fd_count()
    with d.client() as c:
        fd = memfd_with(b"ram")
        c.put("vm", "ram0", fd)
        os.close(fd)
    get = json.dumps({"method": "io.fdbox.Store.Get", "parameters": {"box": "vm", "name": "ram0"}}).encode() + b"\0"
    n = 3000
    with RawConnection(d.socket, timeout=30) as raw:
        import threading

        sender = threading.Thread(target=raw.sock.sendall, args=(get * n,))
        sender.start()  # blocks once the daemon stops reading us: that is the point
        time.sleep(1.0)
        held = d.fd_count() - base - 1
        assert held <= 32 + 8, held  # the budget (plus what a socket buffer has in flight)
        with d.client() as other:  # others are served meanwhile, with fds and all
            _, got = other.get("vm", "ram0")
            os.close(got)
        replies = [raw.recv() for _ in range(n)]
        sender.join()
    assert all("error" not in r and r["parameters"]["fd"] == 0 for r in replies)
    assert wait_for(lambda: d.fd_count() == base + 1)


@needs_root
def test_per_uid_connection_quota_and_root_reserve(daemon_factory):
    d = daemon_factory("--max-connections-per-uid", "3", "--max-connections", "6", "--root-reserved-connections", "2")

    def flood() -> list[str]:
        conns, out = [], []
        for _ in range(5):
            try:
                c = Client(d.socket)
                c.status()
                conns.append(c)
                out.append("ok")
            except FdboxError as e:
                out.append(e.name)
            except OSError as e:
                out.append(type(e).__name__)
        time.sleep(3)  # hold them while root connects
        for c in conns:
            c.close()
        return out

    import threading
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run_as_user(OTHER, flood)))
    t.start()
    time.sleep(1.5)
    roots = [d.client() for _ in range(3)]  # 3 of OTHER + 3 of root = the whole table
    assert all(c.status()["backend"] for c in roots)
    for c in roots:
        c.close()
    t.join()
    assert result["ok"] == ["ok", "ok", "ok", "LimitExceeded", "LimitExceeded"], result


@needs_root
def test_idle_non_root_connections_are_closed_roots_are_not(daemon_factory):
    d = daemon_factory("--idle-timeout", "0.5")

    def idle() -> list:
        with RawConnection(d.socket) as raw, Client(d.socket) as c:
            raw.send_json(STATUS)
            raw.recv()
            c.status()
            time.sleep(1.5)
            closed = raw.sock.recv(1) == b""  # the daemon hung up on the idle one
            return [closed, c.status()["backend"]]  # the client library connects again

    assert run_as_user(OTHER, idle)["ok"] == [True, "memory"]
    with d.client() as c:
        c.status()
        time.sleep(1.5)
        assert c.status()["backend"]


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_accept_out_of_fds_backs_off_and_recovers(daemon):
    base = daemon.settled_fd_count()
    soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (base + 6, hard))
    socks = []
    try:
        for _ in range(20):  # connect() succeeds into the backlog; accept() hits EMFILE
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(daemon.socket)
            except OSError:
                s.close()
                break
            socks.append(s)
        cpu0 = _cpu_seconds(daemon.pid)
        time.sleep(2)
        assert _cpu_seconds(daemon.pid) - cpu0 < 0.5, "accept() on EMFILE spins"
        assert daemon.log().count("accept failed") <= 2, daemon.log()[-2000:]
    finally:
        for s in socks:
            s.close()
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
    with Client(daemon.socket, timeout=10) as c:  # resumes
        assert c.status()["backend"]


def test_thousands_of_pipelined_requests_in_one_write_all_answered(shared_daemon):
    n = 3000
    with RawConnection(shared_daemon.socket, timeout=30) as raw:
        import threading

        sender = threading.Thread(target=raw.sock.sendall, args=((json.dumps(STATUS).encode() + b"\0") * n,))
        sender.start()
        replies = [raw.recv() for _ in range(n)]
        sender.join()
    assert all("backend" in r["parameters"] for r in replies)
    assert "Traceback" not in shared_daemon.log()


@needs_root
def test_one_users_fd_flood_is_capped_per_uid_and_root_is_still_served(daemon_factory):
    d = daemon_factory("--max-fds-per-message", "32", "--max-fds-in-flight-per-uid", "64")
    base = d.settled_fd_count()

    def flood() -> int:
        conns = []
        for _ in range(10):  # 10 connections x unfinished messages of 8-fd sends: 320 fds if uncapped
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            s.setblocking(False)
            s.send(b'{"method":"io.fdbox.Store.Put","parameters":{"box":"b","name":"n","fd":0}')
            conns.append(s)
        import array

        for _ in range(4):
            for s in conns:
                fds = memfds(8)
                try:
                    s.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
                except OSError:
                    pass  # the daemon stopped reading us: that is the point
                finally:
                    close_all(fds)
        time.sleep(3)  # root's turn, while these stay open
        for s in conns:
            s.close()
        return 0

    import threading
    t = threading.Thread(target=lambda: run_as_user(OTHER, flood))
    t.start()
    time.sleep(1.5)
    held = d.fd_count() - base
    with d.client(timeout=5) as c:  # root: served at once, fds and all
        fd = memfd_with(b"root")
        c.put("rootvm", "ram0", fd)
        os.close(fd)
        _, got = c.get("rootvm", "ram0")
        os.close(got)
    t.join()
    # the uid's budget, plus one read's worth per connection and the sockets themselves
    assert held <= 64 + 10 * 8 + 10, held
    assert wait_for(lambda: d.fd_count() == base + 1)
