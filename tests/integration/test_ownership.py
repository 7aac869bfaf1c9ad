"""Caller identity comes from SO_PEERCRED: a child that dropped to another uid with
``os.setresuid`` cannot take or remove root's entries and lists only its own."""

from __future__ import annotations

import os

import pytest
from fdboxtest import memfd_with, run_as_user

from fdboxd.client import Client, read_all
from fdboxd.errors import FdboxError

OTHER = 65534
THIRD = 65533

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")


def _put(c: Client, box: str, name: str, data: bytes) -> None:
    fd = memfd_with(data)
    try:
        c.put(box, name, fd)
    finally:
        os.close(fd)


def test_other_user_cannot_get_or_remove_roots_entry(daemon, client):
    _put(client, "rootbox", "secret", b"root's memory")

    def attempt() -> dict:
        out = {}
        with Client(daemon.socket) as c:
            for op, fn in (("get", lambda: c.get("rootbox", "secret")),
                           ("remove", lambda: c.remove("rootbox", "secret")),
                           ("get_box", lambda: c.get_box("rootbox")),
                           ("delete_box", lambda: c.delete_box("rootbox")),
                           ("seal", lambda: c.seal("rootbox")),
                           ("seal_all", lambda: c.seal()),
                           ("put_into", lambda: _put(c, "rootbox", "mine", b"x"))):
                try:
                    fn()
                    out[op] = "ok"
                except FdboxError as e:
                    out[op] = e.name
        return out

    res = run_as_user(OTHER, attempt)["ok"]
    # Acting on root's box or entry answers as for a missing one (no name oracle); only a
    # put, which would create the box, must say the name is taken, and seal-all is root's.
    assert res == {"get": "NotFound", "remove": "NotFound", "get_box": "NotFound", "delete_box": "NotFound",
                   "seal": "NotFound", "seal_all": "PermissionDenied", "put_into": "PermissionDenied"}, res
    entry, fd = client.get("rootbox", "secret")  # still there, untouched
    assert read_all(fd) == b"root's memory" and entry["uid"] == 0
    os.close(fd)


def test_non_root_list_shows_only_own_entries(daemon, client):
    _put(client, "shared", "root-entry", b"r")
    _put(client, "rootonly", "r2", b"r")

    def own_put_and_list(box: str, name: str):  # type: ignore[no-untyped-def]
        def fn() -> dict:
            with Client(daemon.socket) as c:
                _put(c, box, name, b"user data " + name.encode())
                listing = c.list()
                entry, fd = c.get(box, name)
                data = read_all(fd).decode()
                os.close(fd)
                return {"entries": [(e["box"], e["name"], e["uid"]) for e in listing["entries"]],
                        "boxes": sorted(b["name"] for b in listing["boxes"]), "data": data,
                        "status": c.status()}
        return fn

    a = run_as_user(OTHER, own_put_and_list("ubox", "u-entry"))["ok"]
    assert a["entries"] == [["ubox", "u-entry", OTHER]]
    assert a["boxes"] == ["ubox"]
    assert a["data"] == "user data u-entry"
    b = run_as_user(THIRD, own_put_and_list("tbox", "t-entry"))["ok"]
    assert b["entries"] == [["tbox", "t-entry", THIRD]]  # neither root's nor OTHER's
    assert b["status"]["lost"] == []
    # root sees everything, with the right owners
    owners = {(e["box"], e["name"]): e["uid"] for e in client.list()["entries"]}
    assert owners == {("shared", "root-entry"): 0, ("rootonly", "r2"): 0,
                      ("ubox", "u-entry"): OTHER, ("tbox", "t-entry"): THIRD}


def test_root_may_get_and_remove_users_entry(daemon, client):
    def fn() -> None:
        with Client(daemon.socket) as c:
            _put(c, "userbox", "ram", b"user ram")

    run_as_user(OTHER, fn)
    entry, fd = client.get("userbox", "ram")
    assert entry["uid"] == OTHER and read_all(fd) == b"user ram"
    os.close(fd)
    client.remove("userbox", "ram")

    def gone() -> None:
        with Client(daemon.socket) as c:
            c.get("userbox", "ram")

    assert run_as_user(OTHER, gone) == {"error": "NotFound", "message": "no entry userbox/ram"}


def test_user_cannot_put_into_anothers_box(daemon, client):
    def fn() -> None:
        with Client(daemon.socket) as c:
            _put(c, "hers", "ram", b"x")

    run_as_user(OTHER, fn)
    assert run_as_user(THIRD, fn)["error"] == "PermissionDenied"
