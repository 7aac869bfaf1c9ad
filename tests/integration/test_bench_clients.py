"""bench/s6_compare.py's C clients build and do their work against both daemons.

Nothing here times anything (numbers belong to the benchmark): it keeps the
benchmark from rotting, so its next run compares what it says it compares.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import s6_compare  # noqa: E402

needs_s6 = pytest.mark.skipif(
    shutil.which("s6-fdholder-daemon") is None and not os.environ.get("CI"),
    reason="s6 not installed (scripts/install-deps installs it)",
)


@needs_s6
def test_both_clients_run_every_mode(tmp_path, daemon_factory):
    fdbox_client, s6_client = s6_compare.build(tmp_path)
    s6 = s6_compare.start_s6(tmp_path, 2000)
    try:
        d = daemon_factory("--max-boxes", "100")
        sides = [s6_compare.Side("s6", s6_client, str(tmp_path / "s6.sock"), s6),
                 s6_compare.Side("fdboxd", fdbox_client, d.socket, d.proc)]  # type: ignore[arg-type]
        for side in sides:
            assert side.run("box64", 3)["median_us"] > 0  # 64 fds back, counted by the client
            assert side.run("pairs", 0.2)["pairs_per_s"] > 0
            side.run("fill", 2, 250)
            assert side.run("putremove", 5)["p99_us"] > 0
            assert side.run("list", 2, 500)["median_ms"] > 0
            assert side.run("conc", 4, 30)["p99_us"] > 0
        with d.client() as c:
            st = c.status()
        assert st["entries"] == 500 and st["boxes"] >= 2
    finally:
        s6.terminate()
        s6.wait(10)
