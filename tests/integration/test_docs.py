"""The docs as a reader uses them (issue 21 §3): the README is a landing page under 250
lines, every relative link and anchor resolves, and every shell block is either run
here as it is (``sh tested``) or marked as an example (``sh example``).

A ``sh tested`` block runs in bash with ``-e``, with ``fdboxd``/``fdboxctl``/
``fdbox-qemu`` on PATH as small shims for this checkout (what ``pip install .`` would
put there), a runtime and state directory of its own, and ``$FDBOX_SOCKET`` pointing
at the user daemon's socket (the tests run as root, whose default is the system one).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fdboxtest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = {"", "sh", "bash", "shell", "console"}
FENCE = re.compile(r"^(\s*)```(.*)$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, info string, body) of every fenced block."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m:
            start, info, body = i + 1, m.group(2).strip(), []
            i += 1
            while i < len(lines) and not FENCE.match(lines[i]):
                body.append(lines[i][len(m.group(1)):])
                i += 1
            out.append((start, info, "\n".join(body)))
        i += 1
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    fenced = {n for start, _, body in _blocks(text) for n in range(start, start + body.count("\n") + 2)}
    return {_slug(line.lstrip("#")) for n, line in enumerate(text.split("\n"), 1)
            if line.startswith("#") and n not in fenced}


def test_the_readme_is_a_landing_page():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines < 250, f"README.md has {lines} lines; move detail to docs/"
    text = (REPO / "README.md").read_text()
    for doc in (REPO / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in text, f"the README does not link docs/{doc.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_anchors_resolve(doc: Path):
    bad = []
    text = doc.read_text()
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with that anchor")
    assert not bad, bad


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shell_block_is_tested_or_an_example(doc: Path):
    untagged = [f"{doc.name}:{n} ```{info}" for n, info, _ in _blocks(doc.read_text())
                if info.split(" ")[0] in SHELLS and info not in ("sh tested", "sh example")]
    assert not untagged, "tag each as ```sh tested (run by this test) or ```sh example: " + ", ".join(untagged)


def _tested_blocks() -> list[tuple[str, str]]:
    return [(f"{d.relative_to(REPO)}:{n}", body) for d in DOCS for n, info, body in _blocks(d.read_text())
            if info == "sh tested"]


def test_some_block_is_tested():
    assert _tested_blocks(), "no ```sh tested block: the docs' first steps are never run"


def _run_block(body: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run a ``sh tested`` block as a reader would; (the bash run, its runtime directory)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, module in (("fdboxd", "fdboxd"), ("fdboxctl", "fdboxd.ctl"), ("fdbox-qemu", "fdboxd.qemu")):
        shim = bin_dir / name
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m {module} \"$@\"\n")
        shim.chmod(0o755)
    run_dir, home = tmp_path / "run", tmp_path / "home"
    run_dir.mkdir(mode=0o700)
    home.mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO), "HOME": str(home),
        "XDG_RUNTIME_DIR": str(run_dir), "XDG_STATE_HOME": str(home / "state"),
        "FDBOX_SOCKET": str(run_dir / "fdbox" / "fdboxd.sock"), "LANG": "C.UTF-8",
    }
    script = "set -e\n" + body + "\nwait\n"  # the block's own `kill %1` ends its daemon; wait reaps it
    p = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return p, run_dir


@pytest.mark.parametrize("where,body", _tested_blocks(), ids=[w for w, _ in _tested_blocks()])
def test_tested_block_runs(where: str, body: str, tmp_path: Path):
    p, run_dir = _run_block(body, tmp_path)
    assert p.returncode == 0, f"{where} failed ({p.returncode}):\n{textwrap.indent(p.stdout + p.stderr, '  ')}"
    assert not (run_dir / "fdbox" / "fdboxd.sock").exists(), "the daemon's socket outlived the block"


def test_the_readmes_first_steps_print_what_they_say(tmp_path: Path):
    """Not only the exit code: the README's `get vm1 notes -- sh -c '…; cat <&3'` prints
    the copy of /etc/hostname it put (issue 25 §18: fd 3 came at offset EOF, cat printed
    nothing and the block still passed), and `get … --out -` does too."""
    (body,) = [b for w, b in _tested_blocks() if w.startswith("README.md:") and "cat <&3" in b]
    assert "--from-file /etc/hostname" in body and "fdboxctl get vm1 notes --out -" in body
    hostname = Path("/etc/hostname").read_text()
    p, _ = _run_block(body, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"fd 3 is notes\n{hostname}" in p.stdout, p.stdout
    assert p.stdout.count(hostname) >= 2, p.stdout  # --out - and cat <&3


CRASH_TABLE = "### Failure by failure: the crash matrix"


def _crash_table_rows() -> list[list[str]]:
    """The cells of each row of operating.md's failure table (header and rule skipped)."""
    text = (REPO / "docs" / "operating.md").read_text()
    assert CRASH_TABLE in text, f"docs/operating.md lost its section {CRASH_TABLE!r}"
    rows, started = [], False
    for line in text.split(CRASH_TABLE, 1)[1].split("\n"):
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif started:
            break
    return rows[2:]


def test_every_failpoint_has_its_row_in_the_crash_table():
    """docs/operating.md says, for every failpoint (and so for every cell of the crash
    matrix), what fdbox does and what the operator does: one row each (grouped where the
    outcome is the same), never a name that is not declared."""
    from test_crash_matrix import POINTS

    from fdboxd.failpoints import FAILPOINTS

    rows = _crash_table_rows()
    named: dict[str, int] = {}
    for i, row in enumerate(rows):
        assert len(row) == 3 and all(row), f"row {i + 1} of the crash table wants 3 filled cells: {row}"
        for name in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", row[0].split(" (", 1)[0]):
            assert name not in named, f"{name} has two rows in the crash table"
            named[name] = i
    undeclared = sorted(set(named) - set(FAILPOINTS))
    assert not undeclared, f"the crash table names failpoints fdboxd/failpoints.py does not declare: {undeclared}"
    missing = sorted((set(FAILPOINTS) | set(POINTS)) - set(named))
    assert not missing, f"failpoints without a row in docs/operating.md's crash table: {missing}"
