#!/usr/bin/env python3
"""The floors a blackout phase is measured against, in the same guest and run as the
phase (issue 18 §1), shared by bench/liveupdate.py and bench/vmm_liveupdate.py.

- ``python3 -c pass`` and ``python3 -c 'import asyncio'``: best of 3, in every kernel of
  the run (``python3 bench/floors.py`` in a stage writes ``/out/bench-floors-STAGE.json``);
- fdboxd's exec to first reply: :data:`SHELL`'s ``fdboxd_timed`` starts fdboxd and
  polls its socket with ``libexec/fdbox-call`` every 10 ms (no interpreter start of its
  own in the measurement); with nothing to restore that is the daemon's own floor.

Why a module and not a copy in each bench: the two benches' tables are read side by
side, so their floors must be the same measurement.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

OUT = Path("/out")

# Sourced by a bench's stage scripts after tests/vm/stagelib.sh; $CALL is fdbox-call's path.
SHELL = r"""
# fdboxd_timed SOCK STATE_DIR LOG TIMES ARGS...: start fdboxd in the background and
# write "exec first-answer" (date +%s.%N) to TIMES; fdboxd's pid goes to STATE_DIR.pid.
fdboxd_timed() {
    sock=$1 state=$2 flog=$3 times=$4
    shift 4
    mkdir -p "$(dirname "$sock")" "$state"
    t0=$(date +%s.%N)
    python3 -m fdboxd --socket "$sock" --state-dir "$state" "$@" > "$flog" 2>&1 &
    echo $! > "$state.pid"
    until $CALL --quiet --socket "$sock" io.fdbox.Store.Status 2> /dev/null; do
        kill -0 "$(cat "$state.pid")" 2> /dev/null || { log "fdboxd died"; cat "$flog"; exit 1; }
        sleep 0.01
    done
    echo $t0 $(date +%s.%N) > "$times"
}
floors() { python3 bench/floors.py; }
"""


def measure() -> None:
    """In the guest: the interpreter's own start, the floor of every Python step."""

    def best_of_3(code: str) -> float:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            runs.append(time.perf_counter() - t0)
        return min(runs)

    (OUT / f"bench-floors-{os.environ.get('FDBOX_VM_STAGE', '')}.json").write_text(json.dumps(
        {"python_pass_s": best_of_3("pass"), "python_asyncio_s": best_of_3("import asyncio")}))


def span(path: Path) -> float:
    """Seconds between the two timestamps of a TIMES file (NaN if it is missing)."""
    if not path.exists():
        return math.nan
    t0, t1 = (float(x) for x in path.read_text().split())
    return t1 - t0


@dataclass
class Floors:
    python_pass_s: float
    python_asyncio_s: float
    fdboxd_ready_s: float

    def line(self) -> str:
        return (f"floors in this guest (best of 3, every kernel of the run): python3 -c pass "
                f"{self.python_pass_s:.3f} s, import asyncio {self.python_asyncio_s:.3f} s, fdboxd exec to first "
                f"reply (nothing to restore) {self.fdboxd_ready_s:.3f} s")


def read(out: Path, stages: int, fresh: list[Path]) -> Floors:
    """The best of every stage's interpreter floors; ``fresh`` are fdboxd_timed TIMES files
    of daemons that had nothing to restore (the best of them is the daemon's floor)."""
    recs = [json.loads(f.read_text()) for i in range(1, stages + 1) if (f := out / f"bench-floors-{i}.json").exists()]
    return Floors(min((r["python_pass_s"] for r in recs), default=math.nan),
                  min((r["python_asyncio_s"] for r in recs), default=math.nan),
                  min((span(f) for f in fresh if f.exists()), default=math.nan))


if __name__ == "__main__":
    measure()
