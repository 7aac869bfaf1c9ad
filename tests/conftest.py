"""Shared fixtures: a real fdboxd process on a temp socket, and clients for it.

``daemon`` starts ``python3 -m fdboxd --socket <tmp> --state-dir <tmp>`` from this
checkout and waits until the socket answers a connect. ``daemon_factory`` does the same
with extra arguments or environment (the D-Bus and net tests pass ``--bus ...`` or
``--allow-type tap``). Each daemon's stderr goes to ``<runtime>/fdboxd.log``; a daemon
that dies or never answers fails the test with that log. The helpers themselves are in
``tests/fdboxtest.py``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fdboxtest import DaemonProcess, make_runtime_dir  # noqa: E402

from fdboxd.client import Client  # noqa: E402

DaemonFactory = Callable[..., DaemonProcess]


@pytest.fixture
def daemon_factory() -> Iterator[DaemonFactory]:
    """``daemon_factory(*args, env=None, state_dir=None)`` → a started DaemonProcess."""
    started: list[DaemonProcess] = []
    dirs: list[Path] = []

    def factory(*args: str, env: dict[str, str] | None = None, state_dir: Path | str | None = None,
                start: bool = True) -> DaemonProcess:
        rt = make_runtime_dir()
        dirs.append(rt)
        d = DaemonProcess(rt, args, env, Path(state_dir) if state_dir else None)
        started.append(d)
        return d.start() if start else d

    yield factory
    for d in started:
        d.stop(timeout=5)
    for rt in dirs:
        shutil.rmtree(rt, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> DaemonProcess:
    return daemon_factory()


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    c = daemon.client()
    yield c
    c.close()




@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProcess]:
    """One default daemon for a whole module, for tests that use their own box names
    and leave it usable (faster than a daemon per test)."""
    rt = make_runtime_dir()
    d = DaemonProcess(rt).start()
    yield d
    d.stop(timeout=5)
    shutil.rmtree(rt, ignore_errors=True)
