"""contrib/c/fdbox-example.c: built with the system compiler, run against a real daemon."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from fdboxtest import REPO, memfd_with

from fdboxd.client import read_all

SRC = REPO / "contrib" / "c"


def c_pattern(size: int) -> bytes:
    return bytes(((i * 31 + (i >> 12)) & 0xFF) for i in range(size))


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> str:
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.fail("make and a C compiler are needed to build contrib/c (apt install build-essential)")
    out = tmp_path_factory.mktemp("cbuild")
    p = subprocess.run(["make", "-C", str(SRC), f"O={out}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return str(out / "fdbox-example")


def run(example: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([example, *args], capture_output=True, text=True, timeout=60)


def test_c_put_then_c_get(daemon, example):
    p = run(example, "put", daemon.socket, "vm1", "ram0", str(3 * 1024 * 1024 + 17))
    assert p.returncode == 0, p.stderr
    p = run(example, "get", daemon.socket, "vm1", "ram0")
    assert p.returncode == 0, p.stderr
    assert "pattern verified" in p.stdout


def test_c_put_python_get(daemon, client, example):
    assert run(example, "put", daemon.socket, "vm1", "ram1", "100000").returncode == 0
    entry, fd = client.get("vm1", "ram1")
    assert entry["type"] == "memfd" and entry["metadata"] == {"writer": "fdbox-example.c"}
    assert read_all(fd) == c_pattern(100000)
    os.close(fd)


def test_python_put_c_get_and_detects_corruption(daemon, client, example):
    good = memfd_with(c_pattern(50000))
    # A nested "error" key must not be mistaken for an error reply.
    client.put("vm2", "good", good, {"error": "not really"})
    os.close(good)
    p = run(example, "get", daemon.socket, "vm2", "good")
    assert p.returncode == 0, p.stderr
    bad = bytearray(c_pattern(50000))
    bad[40000] ^= 0xFF
    fd = memfd_with(bytes(bad))
    client.put("vm2", "bad", fd)
    os.close(fd)
    p = run(example, "get", daemon.socket, "vm2", "bad")
    assert p.returncode == 3 and "byte 40000 differs" in p.stderr


def test_c_reports_daemon_errors(daemon, example):
    p = run(example, "get", daemon.socket, "vm1", "missing")
    assert p.returncode == 2 and "io.fdbox.Store.NotFound" in p.stderr
    assert run(example, "put", daemon.socket, "vm1", "ram0", "4096").returncode == 0
    p = run(example, "put", daemon.socket, "vm1", "ram0", "4096")
    assert p.returncode == 2 and "io.fdbox.Store.AlreadyExists" in p.stderr
    assert run(example, "get", daemon.socket, "bad/box", "x").returncode == 1
