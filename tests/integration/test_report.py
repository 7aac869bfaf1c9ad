"""``fdboxctl report`` / ``LastLiveUpdate`` (issue 18 §4) on a real daemon: the same
timeline over Varlink, the command line and D-Bus (a real dbus-daemon, real busctl).
The restore half (kernel_up … first_get) needs a kexec: tests/vm/test_liveupdate.py."""

from __future__ import annotations

import json
import os

from fdboxtest import memfd_with
from test_ctl import ctl, put_memfd
from test_dbus import busctl, bus, dbus_daemon  # noqa: F401  (fixtures)

from fdboxd.client import Client


def test_report_after_put_seal_unseal(daemon):
    put_memfd(daemon, "vm1", "ram0", b"ram" * 1000)
    put_memfd(daemon, "vm1", "devstate", b"device state")
    assert ctl(daemon, "report", check=True).stdout.strip().endswith("vm1: in progress")
    ctl(daemon, "seal", "vm1", check=True)
    ctl(daemon, "unseal", "vm1", check=True)

    with Client(daemon.socket) as c:
        [r] = c.last_live_update()
    assert [p["phase"] for p in r["phases"]] == ["put", "seal_begin", "seal_end", "unsealed"]
    assert r["box"] == "vm1" and r["state"] == "open" and r["complete"]
    assert all(isinstance(p["duration_usec"], int) and p["duration_usec"] >= 0 for p in r["phases"][1:])
    assert r["phases"][0]["time"] <= r["phases"][-1]["time"]

    out = json.loads(ctl(daemon, "report", "--json", check=True).stdout)
    assert out == {"boxes": [r]}
    text = ctl(daemon, "report", check=True).stdout
    assert text.splitlines()[0].split() == ["BOX", "PHASE", "TIME", "TOOK"]
    assert "seal_end" in text and "vm1: complete" in text


def test_no_live_update_yet(daemon):
    assert ctl(daemon, "report", check=True).stdout.strip() == "no live update recorded"
    assert json.loads(ctl(daemon, "report", "--json", check=True).stdout) == {"boxes": []}


def test_report_over_dbus(dbus_daemon, bus):  # noqa: F811
    fd = memfd_with(b"x" * 4096)
    try:
        with Client(dbus_daemon.socket) as c:
            c.put("vm1", "ram0", fd)
            c.seal("vm1")
    finally:
        os.close(fd)
    out = busctl(bus, "--json=short", "call", "io.fdbox1", "/io/fdbox1", "io.fdbox1.Manager", "LastLiveUpdate")
    assert out.returncode == 0, out.stderr
    [r] = json.loads(out.stdout)["data"][0]
    assert r["box"]["data"] == "vm1" and r["state"]["data"] == "sealed" and r["complete"]["data"] is False
    assert set(r["phases"]["data"]) == {"put", "seal_begin", "seal_end"}
    assert set(r["durations"]["data"]) == {"seal_begin", "seal_end"}
