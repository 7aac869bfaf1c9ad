"""The systemd protocols fdboxd speaks itself (fdboxd.systemd), without a daemon."""

from __future__ import annotations

import os
import socket
import struct

from fdboxd.names import BOX_NAME_MAX, ENTRY_NAME_MAX
from fdboxd.systemd import (
    Activation,
    Notifier,
    encode_journal_fields,
    fdname_for,
    fdname_is_valid,
    parse_fdname,
    watchdog_interval,
)


def test_every_valid_name_pair_gives_a_valid_unambiguous_fdname():
    box = "B" * BOX_NAME_MAX
    for entry in ("e", "a.b_c@d+e=f,g-h", "x" * (ENTRY_NAME_MAX - BOX_NAME_MAX - 1),
                  "y" * (ENTRY_NAME_MAX - BOX_NAME_MAX), "z" * ENTRY_NAME_MAX):
        for b in ("v", box):
            name = fdname_for(b, entry)
            assert fdname_is_valid(name), (b, entry)
            got_box, rest = parse_fdname(name)
            assert got_box == b
            assert rest == entry or (rest.startswith("#") and len(b) + 1 + len(entry) > 255)


def test_journal_native_encoding():
    raw = encode_journal_fields({"MESSAGE": "two\nlines", "FDBOX_BOX": "vm1"})
    head = b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n"
    assert raw == head + b"FDBOX_BOX=vm1\n"


def test_notifier_abstract_address_and_fds():
    name = f"fdbox-test-{os.getpid()}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0" + name)
    rx.settimeout(5)
    n = Notifier("@" + name)
    r, w = os.pipe()
    try:
        assert n.send("FDSTORE=1\nFDNAME=vm1/ram0", [r])
        data, fds, _flags, _addr = socket.recv_fds(rx, 4096, 4)
        assert data == b"FDSTORE=1\nFDNAME=vm1/ram0" and len(fds) == 1
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)
        n.close()
        rx.close()
    assert not Notifier("").enabled and not Notifier("relative/path").send("READY=1")


def test_activation_ignores_fds_meant_for_another_process():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "varlink:vm1/ram0"}
    act = Activation.from_environ(env)
    assert act.listener is None and act.store_fds == []
    assert "LISTEN_FDS" not in env  # unset either way, so children never see them


def test_watchdog_interval():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None


def test_barrier_waits_until_the_receiver_closed_the_fd():
    """sd_notify_barrier: True once the receiver handled (closed) the pipe; False when it
    never does, after the timeout, so a helper that exits after READY=1 waits for systemd."""
    import threading

    from fdboxd.sdnotify import Notifier as LightNotifier

    assert LightNotifier is Notifier  # one definition, re-exported by fdboxd.systemd
    name = f"fdbox-test-barrier-{os.getpid()}"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0" + name)
    rx.settimeout(5)
    n = Notifier("@" + name)
    got: list[bytes] = []

    def receiver() -> None:
        data, fds, _flags, _addr = socket.recv_fds(rx, 4096, 4)
        got.append(data)
        for fd in fds:
            os.close(fd)

    try:
        t = threading.Thread(target=receiver)
        t.start()
        assert n.barrier(timeout=5)
        t.join()
        assert got == [b"BARRIER=1"]
        assert not n.barrier(timeout=0.2)  # nobody reads: the fd stays open in the queue
    finally:
        n.close()
        rx.close()
    assert not Notifier("").barrier()


def test_call_lines_are_written_together_in_order_and_soon():
    """LineHandler: a call's line (FDBOX_OP) waits at most LINE_BATCH_SECONDS on the loop;
    any other record writes what is held first, so the order is the order logged."""
    import asyncio
    import io
    import logging

    from fdboxd.systemd import LINE_BATCH_SECONDS, LineHandler

    stream = io.StringIO()
    handler = LineHandler(stream)
    log = logging.getLogger("fdboxd.test-lines")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    async def main() -> list[str]:
        seen = []
        log.info("Put vm/a", extra={"FDBOX_OP": "Put"})
        log.info("Get vm/a", extra={"FDBOX_OP": "Get"})
        seen.append(stream.getvalue())  # held
        log.warning("a warning")  # writes the held lines first
        seen.append(stream.getvalue())
        log.info("Remove vm/a", extra={"FDBOX_OP": "Remove"})
        await asyncio.sleep(LINE_BATCH_SECONDS * 3)
        seen.append(stream.getvalue())  # the timer wrote it
        return seen

    try:
        held, after_warning, later = asyncio.run(main())
        log.info("Put off the loop", extra={"FDBOX_OP": "Put"})  # no loop: written at once
    finally:
        log.removeHandler(handler)
    assert held == ""
    assert after_warning == "fdboxd: INFO Put vm/a\nfdboxd: INFO Get vm/a\nfdboxd: WARNING a warning\n"
    assert later == after_warning + "fdboxd: INFO Remove vm/a\n"
    assert stream.getvalue() == later + "fdboxd: INFO Put off the loop\n"
