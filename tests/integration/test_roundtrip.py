"""Put and get real memfds through a real daemon: bytes, processes, boxes, restarts."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading

import pytest
from fdboxtest import REPO, RawConnection, memfd_with, pattern, sha256_of_fd

from fdboxd.client import Client, read_all
from fdboxd.errors import FdboxError
from fdboxd.varlink.protocol import close_fds, recv_into

GETTER = """
import hashlib, os, sys
from fdboxd.client import Client, read_all
with Client(sys.argv[1]) as c:
    entry, fd = c.get(sys.argv[2], sys.argv[3])
    print(entry["type"], entry["size"], hashlib.sha256(read_all(fd)).hexdigest(), os.getpid())
"""


def test_put_then_get_in_another_process(daemon, client):
    data = pattern(3 * 4096 + 123, seed=5)
    fd = memfd_with(data, "guest-ram")
    client.put("vm1", "ram0", fd, {"slot": "0"})
    os.close(fd)  # the daemon holds its own reference now
    out = subprocess.run(
        [sys.executable, "-c", GETTER, daemon.socket, "vm1", "ram0"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    typ, size, digest, pid = out.stdout.split()
    assert int(pid) != os.getpid()
    assert (typ, int(size)) == ("memfd", len(data))
    assert digest == hashlib.sha256(data).hexdigest()


def test_get_returns_the_same_file_not_a_copy(client):
    fd = memfd_with(b"\0" * 4096)
    client.put("vm1", "shared", fd)
    _, got = client.get("vm1", "shared")
    os.pwrite(fd, b"written after put", 100)
    assert os.pread(got, 17, 100) == b"written after put"
    assert os.fstat(got).st_ino == os.fstat(fd).st_ino
    os.close(fd)
    os.close(got)


def test_entry_records_type_size_owner_metadata(client):
    fd = memfd_with(pattern(8192))
    e = client.put("vm2", "ram0", fd, {"numa": "1", "role": "ram"})
    os.close(fd)
    assert e["type"] == "memfd" and e["size"] == 8192
    assert (e["uid"], e["gid"]) == (os.getuid(), os.getgid())
    assert e["metadata"] == {"numa": "1", "role": "ram"}
    listed = client.list("vm2")
    assert [x["name"] for x in listed["entries"]] == ["ram0"]
    assert listed["boxes"] == [{"name": "vm2", "state": "open", "entries": 1, "size": 8192, "owner": os.getuid()}]


def test_put_many_and_get_box_64_entries_one_round_trip(daemon, client):
    datas = {f"slot{i:02d}": pattern(4096 + i, seed=i) for i in range(64)}
    fds = [memfd_with(d) for d in datas.values()]
    entries = client.put_many("big", list(zip(datas, fds, strict=True)))
    for fd in fds:
        os.close(fd)
    assert [e["name"] for e in entries] == list(datas)
    # On the wire: one request, one reply message carrying all 64 fds.
    with RawConnection(daemon.socket) as raw:
        raw.send_json({"method": "io.fdbox.Store.GetBox", "parameters": {"box": "big"}})
        while (frame := raw.framer.take()) is None:
            assert recv_into(raw.sock, raw.framer)
        close_fds(frame.fds)
        assert len(frame.fds) == 64 and len(frame.message["parameters"]["entries"]) == 64
        assert raw.framer.take() is None
    got = client.get_box("big")
    assert len(got) == 64
    try:
        for entry, fd in got:
            assert read_all(fd) == datas[entry["name"]]
    finally:
        for _, fd in got:
            os.close(fd)


def test_put_many_is_all_or_nothing(client):
    good = memfd_with(b"ok")
    r, w = os.pipe()
    with pytest.raises(FdboxError) as ei:
        client.put_many("atomic", [("a", good), ("b", r)])
    assert ei.value.name == "UnsupportedType"
    with pytest.raises(FdboxError) as ei:
        client.list("atomic")
    assert ei.value.name == "NotFound"
    for fd in (good, r, w):
        os.close(fd)


def test_seal_unseal_cycle(client):
    fd = memfd_with(pattern(4096))
    client.put("vm3", "ram0", fd)
    os.close(fd)
    assert client.seal("vm3") == ["vm3"]
    entry = client.list("vm3")["entries"][0]
    assert entry["sha256"] == hashlib.sha256(pattern(4096)).hexdigest()
    assert client.status()["sealed"] == 1
    _, got = client.get("vm3", "ram0")  # sealed boxes still hand out fds
    os.close(got)
    client.unseal("vm3")
    client.remove("vm3", "ram0")
    client.delete_box("vm3")
    assert client.status()["boxes"] == 0


def test_fifty_concurrent_clients(daemon):
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with Client(daemon.socket, timeout=30) as c:
                for j in range(4):
                    data = pattern(4096 + j, seed=i * 10 + j)
                    fd = memfd_with(data)
                    c.put(f"c{i}", f"e{j}", fd)
                    os.close(fd)
                    _, got = c.get(f"c{i}", f"e{j}")
                    ok = read_all(got) == data
                    os.close(got)
                    assert ok, f"client {i} entry {j} came back different"
                c.delete_box(f"c{i}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    with daemon.client() as c:
        assert c.status()["entries"] == 0


def test_slow_client_does_not_block_others(daemon):
    request = b'{"method":"org.varlink.service.GetInterfaceDescription","parameters":{"interface":"io.fdbox.Store"}}\0'
    with daemon.client() as c:
        reply_size = len(str(c.call("org.varlink.service.GetInterfaceDescription",
                                    {"interface": "io.fdbox.Store"})[0]))
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(daemon.socket)
    slow.settimeout(2.0)
    requests = 0
    try:
        # Keep asking and never read, until the daemon stops reading us (our send stalls).
        for _ in range(20_000):
            try:
                slow.sendall(request * 16)
            except TimeoutError:
                break
            requests += 16
        else:
            pytest.fail("the daemon never stopped reading a client that does not read")
        # The replies owed could not all fit in the socket buffers: the daemon holds them.
        assert requests * reply_size > 4 << 20
        with Client(daemon.socket, timeout=5) as c:
            for i in range(20):
                fd = memfd_with(pattern(4096, seed=i))
                c.put("others", f"e{i}", fd)
                os.close(fd)
                _, got = c.get("others", f"e{i}")
                assert sha256_of_fd(got) == hashlib.sha256(pattern(4096, seed=i)).hexdigest()
                os.close(got)
            assert c.status()["entries"] == 20
    finally:
        slow.close()
    with daemon.client() as c:  # and the daemon is fine once the slow one goes away
        assert c.status()["entries"] == 20


def test_restart_with_memory_backend_reports_lost_entries(daemon):
    with daemon.client() as c:
        for name in ("ram0", "ram1"):
            fd = memfd_with(b"x" * 100)
            c.put("vm9", name, fd)
            os.close(fd)
        fd = memfd_with(b"y")
        c.put("other", "disk", fd)
        os.close(fd)
    manifest = os.path.join(daemon.state_dir, "manifest.json")
    assert os.path.exists(manifest)
    daemon.restart()
    with daemon.client() as c:
        st = c.status()
        assert st["entries"] == 0 and st["boxes"] == 2  # emptied, kept for their owner
        lost = sorted((x["box"], x["name"], x["type"]) for x in st["lost"])
        assert lost == [("other", "disk", "memfd"), ("vm9", "ram0", "memfd"), ("vm9", "ram1", "memfd")]
        assert c.list()["entries"] == []
    daemon.restart()  # still reported: the manifest keeps them until acknowledged
    with daemon.client() as c:
        assert len(c.status()["lost"]) == 3
        assert c.acknowledge_lost("vm9") == 2
        assert [x["box"] for x in c.status()["lost"]] == ["other"]


def test_daemon_stops_cleanly_on_sigterm(daemon, client):
    fd = memfd_with(b"x")
    client.put("vm", "a", fd)
    os.close(fd)
    client.close()
    assert daemon.stop() == 0
    daemon.start()  # again on the same paths (a stale socket file is replaced)
    with daemon.client() as c:
        assert [x["name"] for x in c.status()["lost"]] == ["a"]
