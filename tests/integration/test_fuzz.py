"""10,000 mutated messages with random fds of random types, pipelined in batches.

The invariant of the Varlink server (fdboxd/varlink/server.py): every request gets
exactly one reply, in order (none when it is a JSON object saying ``"oneway": true``,
refused or not), or the connection is closed after a framing error. Each batch ends
with a GetInfo sentinel: exactly one reply per expected reply must come before the
sentinel's, and none after; each reply carries the fds its own request's method
returns (a Get's one, a GetBox's one per entry, an error none). At the end the daemon
holds its baseline fds plus one per stored entry (the memory backend's references)
and logged no internal error.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import time

from fdboxtest import RawConnection, memfd_with

MESSAGES = 10_000
BATCH = 25
SEED = 1313

SEEDS: list[dict] = [
    {"method": "io.fdbox.Store.Put", "parameters": {"box": "fz", "name": "a", "fd": 0}},
    {"method": "io.fdbox.Store.Put", "parameters": {"box": "fz2", "name": "b.1", "fd": 1, "metadata": {"k": "v"}}},
    {"method": "io.fdbox.Store.PutMany", "parameters": {"box": "fz", "entries": [{"name": "c", "fd": 0},
                                                                                  {"name": "d", "fd": 1}]}},
    {"method": "io.fdbox.Store.Get", "parameters": {"box": "fz", "name": "a"}},
    {"method": "io.fdbox.Store.GetBox", "parameters": {"box": "fz"}},
    {"method": "io.fdbox.Store.List", "parameters": {"box": "fz"}},
    {"method": "io.fdbox.Store.List", "parameters": {}},
    {"method": "io.fdbox.Store.Remove", "parameters": {"box": "fz", "name": "a"}},
    {"method": "io.fdbox.Store.Status"},
    {"method": "io.fdbox.Store.Unseal", "parameters": {"box": "fz2"}},
    {"method": "io.fdbox.Store.Finish", "parameters": {"box": "fz"}},
    {"method": "org.varlink.service.GetInterfaceDescription", "parameters": {"interface": "io.fdbox.Store"}},
    {"oneway": True, "method": "io.fdbox.Store.Get", "parameters": {"box": "fz", "name": "a"}},
    {"oneway": True, "method": "io.fdbox.Store.Put", "parameters": {"box": "fz", "name": "e", "fd": 0}},
]
TOKENS = [b"[" * 64, b"[" * 3000, b"{" * 40, b'"\\ud800"', b'"\\udfff\\ud800"', b"\xff\xfe", b"-1", b"1e999", b"null",
          b"true", b"1.5", b'"fd"', b'"box"', b'"\\u0000"', b"9" * 40, b'{"x":' * 10, b"]", b"}", b",", b":",
          b'"' + "é".encode() * 3 + b'"', b'"' + b"A" * 300 + b'"', b'"../etc"', b'"fdboxd.manifest"',
          b'"\xed\xa0\x80"']  # the last: U+D800 as raw UTF-8, which json.loads(bytes) takes
SENTINEL = json.dumps({"method": "org.varlink.service.GetInfo"}).encode() + b"\0"


def random_fd(rng: random.Random) -> list[int]:
    """One or two fds of a random type (a pipe gives both ends)."""
    kind = rng.randrange(9)
    if kind <= 2:
        return [memfd_with(b"z" * rng.randrange(0, 64))]
    if kind == 3:
        return list(os.pipe())
    if kind == 4:
        a, b = socket.socketpair()
        return [a.detach(), b.detach()]
    if kind == 5:
        return [os.eventfd(0)]
    if kind == 6:
        return [os.open("/dev/null", os.O_RDWR)]
    if kind == 7:
        return [os.open("/tmp", os.O_PATH | os.O_DIRECTORY)]
    ep = select.epoll()
    try:
        return [os.dup(ep.fileno())]
    finally:
        ep.close()


def mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(7)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(1, 256)
        elif op == 1:
            data[pos:pos] = rng.choice(TOKENS)
        elif op == 2 and data:
            del data[pos:pos + rng.randrange(1, 8)]
        elif op == 3:
            end = min(len(data), pos + rng.randrange(1, 16))
            data[pos:pos] = data[pos:end]
        elif op == 4:
            data[pos:pos] = json.dumps(rng.choice(["\ud800", "x" * 70, 7, [], {}, -3, "ram0"])).encode()
        elif op == 6:  # a lone surrogate inside a string: a method, a box, a key
            quotes = [i for i, ch in enumerate(data) if ch == ord('"')]
            if quotes:
                q = rng.choice(quotes) + 1
                data[q:q] = rng.choice([b"\\ud800", b"\\udc01x", b"\\ud83d\\ude00", b"\xed\xb0\x81"])
        # op 5: leave as is (a valid message now and then)
    return bytes(data).replace(b"\0", b"")


def message(rng: random.Random) -> bytes:
    while True:
        raw = mutate(rng, json.dumps(rng.choice(SEEDS)).encode())
        # A message that could ask for several replies (more) is not sent: the count of
        # replies must be known. Nothing else is filtered.
        if b"more" not in raw and b"GetInfo" not in raw:
            return raw + b"\0"


def parsed(data: bytes) -> dict | None:
    """The message as the daemon reads it (json.loads of the bytes), if it is an object."""
    try:
        doc = json.loads(data[:-1])
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def replies_expected(data: bytes) -> int:
    doc = parsed(data)
    return 0 if doc is not None and doc.get("oneway") is True else 1


def fds_expected(data: bytes, reply: dict) -> int:
    """What the reply to ``data`` must carry: only a successful Get or GetBox has fds."""
    method = (parsed(data) or {}).get("method")
    if "error" in reply:
        return 0
    if method == "io.fdbox.Store.Get":
        return 1
    if method == "io.fdbox.Store.GetBox":
        return len(reply["parameters"]["entries"])
    return 0


def test_ten_thousand_mutated_messages_one_reply_each_in_order_no_fd_leak(daemon):
    rng = random.Random(SEED)
    with daemon.client() as c:
        c.status()
    time.sleep(0.3)
    baseline = daemon.fd_count()
    sent = replies = oneway = 0
    errors: dict[str, int] = {}
    with RawConnection(daemon.socket, timeout=30) as raw:
        while sent < MESSAGES:
            batch = [message(rng) for _ in range(BATCH)]
            for data in batch:
                fds = [fd for _ in range(rng.randrange(0, 4)) for fd in random_fd(rng)]
                try:
                    raw.send(data, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
            raw.send(SENTINEL)
            answered = [data for data in batch if replies_expected(data)]
            for i, data in enumerate(answered):
                reply, nfds = raw.recv_counting_fds()
                assert isinstance(reply, dict) and ("error" in reply or "parameters" in reply), reply
                assert "continues" not in reply
                params = reply.get("parameters") or {}
                assert "vendor" not in params, f"reply {i} of {len(answered)} is the sentinel's: one went missing"
                assert nfds == fds_expected(data, reply), (data, reply, nfds)
                if "error" in reply:
                    errors[reply["error"]] = errors.get(reply["error"], 0) + 1
                replies += 1
            assert raw.recv()["parameters"]["vendor"] == "fdbox", "more replies than requests"
            sent += len(batch)
            oneway += len(batch) - len(answered)
    assert replies + oneway == sent >= MESSAGES and oneway > MESSAGES // 50, oneway
    assert errors.get("io.fdbox.Store.InvalidRequest", 0) > MESSAGES // 4, errors  # the fuzz did bite
    with daemon.client() as c:
        stored = c.status()["entries"]
    deadline = time.monotonic() + 10
    while daemon.fd_count() != baseline + stored and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.fd_count() == baseline + stored, (daemon.fd_count(), baseline, stored)
    log = daemon.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert daemon.alive()
