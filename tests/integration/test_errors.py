"""Every fdbox error name, produced over the socket by a request that deserves it.

The triggers share one daemon (each in its own box), run one request through
:mod:`fdboxd.client` and check the exact ``io.fdbox.Store.<Name>`` that came back; the
connection must still answer afterwards (errors are replies, never a dropped connection).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable

import pytest
from fdboxtest import DaemonProcess, RawConnection, memfd_with, run_as_user

from fdboxd.client import Client
from fdboxd.errors import ERROR_NAMES, FdboxError

NOBODY = 65534


def _put(c: Client, box: str, name: str, data: bytes = b"data") -> None:
    fd = memfd_with(data)
    try:
        c.put(box, name, fd)
    finally:
        os.close(fd)


def t_not_found(d: DaemonProcess, c: Client, box: str) -> None:
    c.get(box, "ram0")


def t_already_exists(d: DaemonProcess, c: Client, box: str) -> None:
    _put(c, box, "ram0")
    _put(c, box, "ram0")


def t_invalid_name(d: DaemonProcess, c: Client, box: str) -> None:
    _put(c, box + "/bad", "ram0")


def t_unsupported_type(d: DaemonProcess, c: Client, box: str) -> None:
    r, w = os.pipe()
    try:
        c.put(box, "pipe", r)
    finally:
        os.close(r)
        os.close(w)


def t_sealed(d: DaemonProcess, c: Client, box: str) -> None:
    _put(c, box, "ram0")
    c.seal(box)
    _put(c, box, "ram1")


def t_not_sealed(d: DaemonProcess, c: Client, box: str) -> None:
    _put(c, box, "ram0")
    c.unseal(box)


def t_permission_denied(d: DaemonProcess, c: Client, box: str) -> None:
    _put(c, box, "ram0")

    def other_user() -> None:  # a put into root's box: the one refusal that is not NotFound
        with Client(d.socket) as oc:
            _put(oc, box, "mine")

    res = run_as_user(NOBODY, other_user)
    raise FdboxError(res["error"], res["message"])  # re-raised here: the child saw it


def t_limit_exceeded(d: DaemonProcess, c: Client, box: str) -> None:
    fd = memfd_with(b"x")
    try:
        c.put(box, "ram0", fd, {f"k{i}": "v" for i in range(33)})
    finally:
        os.close(fd)


def t_backend_unavailable(d: DaemonProcess, c: Client, box: str, restore: bool = True) -> None:
    # The manifest cannot be replaced (its path is now a directory): the put is undone.
    manifest = os.path.join(d.state_dir, "manifest.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest)
    os.mkdir(manifest)
    try:
        _put(c, box, "ram0")
    finally:
        if restore:
            os.rmdir(manifest)  # the next change writes a fresh one


def t_invalid_request(d: DaemonProcess, c: Client, box: str) -> None:
    c.call("Put", {"box": box, "name": "ram0", "fd": 0})  # no fd attached


TRIGGERS: dict[str, Callable[[DaemonProcess, Client, str], None]] = {
    "NotFound": t_not_found,
    "AlreadyExists": t_already_exists,
    "InvalidName": t_invalid_name,
    "UnsupportedType": t_unsupported_type,
    "Sealed": t_sealed,
    "NotSealed": t_not_sealed,
    "PermissionDenied": t_permission_denied,
    "LimitExceeded": t_limit_exceeded,
    "BackendUnavailable": t_backend_unavailable,
    "InvalidRequest": t_invalid_request,
}


def test_every_error_name_has_a_trigger():
    assert set(TRIGGERS) == set(ERROR_NAMES)


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_error_over_the_socket(shared_daemon, name):
    with shared_daemon.client() as c:
        with pytest.raises(FdboxError) as ei:
            TRIGGERS[name](shared_daemon, c, f"box-{name}")
        assert ei.value.name == name, ei.value
        assert ei.value.message
        assert c.status()["version"]  # same connection still answers


def test_error_reply_is_a_varlink_error_on_the_wire(daemon):
    with RawConnection(daemon.socket) as raw:
        raw.send_json({"method": "io.fdbox.Store.Get", "parameters": {"box": "vm", "name": "x"}})
        reply = raw.recv()
        assert reply["error"] == "io.fdbox.Store.NotFound"
        assert reply["parameters"]["box"] == "vm" and reply["parameters"]["message"]


def test_backend_unavailable_leaves_nothing_behind(daemon):
    with daemon.client() as c:
        with pytest.raises(FdboxError) as ei:
            t_backend_unavailable(daemon, c, "vm", restore=False)
        assert ei.value.name == "BackendUnavailable"
        assert c.status()["entries"] == 0  # the put was undone
        os.rmdir(os.path.join(daemon.state_dir, "manifest.json"))
        _put(c, "vm", "ram0")  # and works again once the manifest can be written
        assert c.status()["entries"] == 1


def test_entry_limits(daemon_factory):
    d = daemon_factory("--max-entries-per-box", "2", "--max-entries", "3", "--max-boxes", "2")
    with d.client() as c:
        _put(c, "a", "e1")
        _put(c, "a", "e2")
        with pytest.raises(FdboxError) as ei:
            _put(c, "a", "e3")
        assert (ei.value.name, ei.value.params.get("limit")) == ("LimitExceeded", "entries_per_box")
        _put(c, "b", "e1")
        with pytest.raises(FdboxError) as ei:
            _put(c, "b", "e2")
        assert (ei.value.name, ei.value.params.get("limit")) == ("LimitExceeded", "entries")
        c.remove("b", "e1")
        with pytest.raises(FdboxError) as ei:
            _put(c, "c", "e1")
        assert (ei.value.name, ei.value.params.get("limit")) == ("LimitExceeded", "boxes")


def test_unreachable_daemon_is_backend_unavailable(tmp_path):
    with pytest.raises(FdboxError) as ei:
        Client(str(tmp_path / "nothing.sock"))
    assert ei.value.name == "BackendUnavailable"


def test_daemon_starts_with_a_broken_manifest_directory_refused(daemon_factory, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "manifest.json").write_text('{"schema": 99, "boxes": {}}')
    d = daemon_factory(state_dir=state, start=False)
    with pytest.raises(Exception) as ei:
        d.start()
    assert "schema" in str(ei.value)
    shutil.rmtree(state)
