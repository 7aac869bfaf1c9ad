"""Varlink framing with fds: the Framer alone, and over a real socketpair."""

from __future__ import annotations

import array
import json
import os
import socket

import pytest

from fdboxd.varlink.protocol import Framer, encode, recv_into, send_message


def memfds(n: int) -> list[int]:
    return [os.memfd_create(f"m{i}", os.MFD_CLOEXEC) for i in range(n)]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def frames(f: Framer) -> list:
    out = []
    while (fr := f.take()) is not None:
        out.append(fr)
    return out


def test_one_message():
    f = Framer()
    f.feed(b'{"method":"a"}\0')
    (fr,) = frames(f)
    assert fr.message == {"method": "a"} and fr.fds == [] and fr.error is None


def test_several_messages_in_one_read():
    f = Framer()
    f.feed(b'{"a":1}\0{"a":2}\0{"a":3}\0')
    assert [fr.message["a"] for fr in frames(f)] == [1, 2, 3]


@pytest.mark.parametrize("cut", [1, 5, 13, 14])
def test_message_split_anywhere(cut):
    raw = b'{"method":"x"}\0'
    f = Framer()
    f.feed(raw[:cut])
    assert frames(f) == []
    f.feed(raw[cut:])
    assert [fr.message for fr in frames(f)] == [{"method": "x"}]


def test_byte_by_byte():
    raw = encode({"method": "x", "parameters": {"k": "v" * 50}}) * 3
    f = Framer()
    for i in range(len(raw)):
        f.feed(raw[i : i + 1])
    assert len(frames(f)) == 3


def test_fds_belong_to_the_message_starting_in_the_read():
    fds = memfds(2)
    f = Framer()
    # The end of a previous message, then a new one that carries the fds.
    f.feed(b'{"a":')
    f.feed(b'1}\0{"b":2}\0', fds)
    a, b = frames(f)
    assert a.message == {"a": 1} and a.fds == []
    assert b.message == {"b": 2} and b.fds == fds
    for fd in fds:
        os.close(fd)


def test_fds_with_a_message_still_arriving():
    fds = memfds(1)
    f = Framer()
    f.feed(b'{"b":', fds)
    f.feed(b"2}\0")
    (fr,) = frames(f)
    assert fr.fds == fds
    os.close(fds[0])


def test_fds_on_a_bad_message_are_closed():
    fds = memfds(3)
    f = Framer()
    f.feed(b"{nope}\0", fds)
    (fr,) = frames(f)
    assert fr.error and "JSON" in fr.error and fr.fds == []
    assert not any(is_open(fd) for fd in fds)


@pytest.mark.parametrize("raw", [b"[1]\0", b"1\0", b'"s"\0', b"null\0", b"\0", b"\xff\0"])
def test_non_objects_are_errors(raw):
    f = Framer()
    f.feed(raw)
    (fr,) = frames(f)
    assert fr.message is None and fr.error


def test_oversize_message_is_refused_and_stream_resyncs():
    fds = memfds(2)
    f = Framer(max_size=100)
    f.feed(b'{"x":"' + b"a" * 60, fds)
    f.feed(b"a" * 60)
    f.feed(b'"}\0{"ok":true}\0')
    bad, good = frames(f)
    assert bad.error and "larger" in bad.error
    assert good.message == {"ok": True}
    assert not any(is_open(fd) for fd in fds)


def test_message_of_exactly_max_size_is_fine():
    body = b'{"x":"' + b"a" * 92 + b'"}'
    assert len(body) == 100
    f = Framer(max_size=100)
    f.feed(body + b"\0")
    (fr,) = frames(f)
    assert fr.error is None


def test_too_many_fds_are_refused():
    fds = memfds(3)
    f = Framer(max_fds=2)
    f.feed(b'{"a":1}\0', fds)
    (fr,) = frames(f)
    assert fr.error and "more than 2" in fr.error
    assert not any(is_open(fd) for fd in fds)


def test_truncated_fds_refuse_the_message():
    fds = memfds(1)
    f = Framer()
    f.feed(b'{"a":1}\0', fds, truncated=True)
    (fr,) = frames(f)
    assert fr.error and "truncated" in fr.error
    assert not is_open(fds[0])


def test_close_releases_partial_and_untaken():
    fds = memfds(2)
    f = Framer()
    f.feed(b'{"a":1}\0', fds[:1])
    f.feed(b'{"b":', fds[1:])
    f.close()
    assert not any(is_open(fd) for fd in fds)


# ---------------------------------------------------------------- over a real socket


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_send_and_receive_with_fds():
    a, b = _pair()
    fds = memfds(3)
    os.write(fds[2], b"third")
    send_message(a, {"method": "m", "parameters": {"fd": 2}}, fds)
    send_message(a, {"method": "n"})
    f = Framer()
    while len(f._frames) < 2:  # noqa: SLF001 - read until both are framed
        assert recv_into(b, f)
    m, n = frames(f)
    assert m.message["method"] == "m" and len(m.fds) == 3 and n.fds == []
    assert os.pread(m.fds[2], 5, 0) == b"third"
    assert all(not os.get_inheritable(fd) for fd in m.fds)  # MSG_CMSG_CLOEXEC
    for fd in fds + m.fds:
        os.close(fd)
    a.close()
    b.close()


def test_real_msg_ctrunc_closes_what_arrived():
    a, b = _pair()
    fds = memfds(6)
    a.sendmsg([encode({"method": "m"})], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    f = Framer(max_fds=4)  # recv_into makes room for 4: the kernel truncates the rest
    before = set(os.listdir("/proc/self/fd"))
    assert recv_into(b, f)
    (fr,) = frames(f)
    assert fr.error and "truncated" in fr.error
    assert set(os.listdir("/proc/self/fd")) <= before  # nothing installed stays open
    for fd in fds:
        os.close(fd)
    a.close()
    b.close()


def test_end_of_stream():
    a, b = _pair()
    a.close()
    assert recv_into(b, Framer()) is False
    b.close()


def test_encode_is_nul_terminated_compact_json():
    raw = encode({"a": [1, "é"]})
    assert raw.endswith(b"\0") and b"\0" not in raw[:-1]
    assert json.loads(raw[:-1]) == {"a": [1, "é"]}


# ---------------------------------------------------------------- hostile input (issue 13)


def test_deep_nesting_is_an_error_frame_and_neighbours_survive():
    fds = memfds(2)
    f = Framer()
    deep = b'{"method":"m","parameters":{"box":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    f.feed(b'{"a":1}\0' + deep[:10], fds)  # the fds belong to the deep message
    f.feed(deep[10:] + b'\0{"b":2}\0')
    a, bad, b = frames(f)
    assert a.message == {"a": 1} and b.message == {"b": 2}
    assert bad.error and "deeper" in bad.error and bad.fds == []
    assert not any(is_open(fd) for fd in fds)


def test_moderate_nesting_past_the_limit_is_refused():
    f = Framer()
    f.feed(b'{"p":' + b"[" * 40 + b"]" * 40 + b"}\0")
    (fr,) = frames(f)
    assert fr.error and "deeper" in fr.error


def test_lone_surrogates_are_refused_pairs_are_not():
    f = Framer()
    f.feed(b'{"method":"\\ud800"}\0{"m":{"k":"\\udfff"}}\0{"\\udabc":1}\0{"ok":"\\ud83d\\ude00"}\0')
    a, b, c, ok = frames(f)
    assert all(x.error and "surrogate" in x.error for x in (a, b, c))
    assert ok.error is None and ok.message == {"ok": "\U0001f600"}


def test_lone_surrogates_in_raw_utf8_are_refused_like_escaped_ones():
    # json.loads(bytes) decodes with 'surrogatepass': ED A0 80 is U+D800 with no \\u in sight.
    f = Framer()
    f.feed(b'{"method":"\xed\xa0\x80"}\0{"m":{"k\xed\xbf\xbf":"v"}}\0{"ok":"\xed\x9f\xbf"}\0')
    a, b, ok = frames(f)
    assert all(x.error and "surrogate" in x.error for x in (a, b))
    assert ok.error is None and ok.message == {"ok": "\ud7ff"}


def test_a_refused_document_keeps_its_oneway():
    f = Framer()
    f.feed(b'{"oneway":true,"method":"\\ud800"}\0{"oneway":true,"p":' + b"[" * 40 + b"]" * 40 + b"}\0"
           b'{"oneway":false,"method":"\\ud800"}\0{"oneway":true,\0')
    a, b, c, d = frames(f)
    assert a.error and a.oneway and b.error and b.oneway
    assert c.error and not c.oneway
    assert d.error and not d.oneway  # not JSON: nothing in it can be believed, it gets its answer


def test_fd_cap_counts_every_read_of_one_message_and_closes_at_once():
    f = Framer(max_fds=4)
    first, second = memfds(3), memfds(3)
    f.feed(b'{"a":', first)
    assert f.fd_count == 3
    f.feed(b'"x"', second)  # 6 > 4: every fd of the message is closed now, not at its NUL
    assert f.fd_count == 0 and not any(is_open(fd) for fd in first + second)
    third = memfds(1)
    f.feed(b" ", third)
    assert not is_open(third[0])
    f.feed(b"}\0")
    (fr,) = frames(f)
    assert fr.error and "more than 4" in fr.error


def test_fd_count_follows_frames_taken():
    f = Framer()
    fds = memfds(2)
    f.feed(b'{"a":1}\0', fds)
    assert f.fd_count == 2
    fr = f.take()
    assert f.fd_count == 0 and fr.fds == fds
    close_all = [os.close(fd) for fd in fds]
    assert len(close_all) == 2


def test_short_ctrunc_is_the_daemon_out_of_fds_not_the_peer():
    f = Framer(max_fds=8)
    fds = memfds(2)
    f.feed(b'{"a":1}\0', fds, truncated=True)
    (fr,) = frames(f)
    assert fr.error_name == "BackendUnavailable" and "out of file descriptors" in fr.error
    assert not any(is_open(fd) for fd in fds)


def test_encode_never_fails_on_what_a_peer_sent():
    raw = encode({"error": "x", "parameters": {"box": "\ud800", "é": "ü"}})
    assert raw.isascii() and raw.endswith(b"\0")
