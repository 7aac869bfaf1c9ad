"""The generated man pages and bash completions (scripts/gen-cli-docs), as a reader and
a shell see them.

The pages are generated into a temporary directory, rendered with ``man -l`` and read
as text. What must be in them comes from the programs themselves, never from a list
kept here: every option that ``PROG --help`` (and ``PROG SUBCOMMAND --help``) prints,
every ``FDBOX_IOC_*`` and errno of the uAPI header. The completions are sourced into a
real bash and asked, like a terminal would, with COMP_WORDS and COMP_CWORD.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fdboxtest import REPO

GEN = REPO / "scripts" / "gen-cli-docs"
HEADER = REPO / "kmod/include/uapi/linux/fdbox.h"


def _gen_module():  # type: ignore[no-untyped-def]
    loader = importlib.machinery.SourceFileLoader("gen_cli_docs", str(GEN))
    spec = importlib.util.spec_from_loader("gen_cli_docs", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_cli_docs"] = mod  # dataclasses look their module up there
    loader.exec_module(mod)
    return mod


gen = _gen_module()


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} missing (scripts/install-deps installs it)", pytrace=False)
        pytest.skip(f"{tool} not installed")
    return path


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, Path]:
    """name.section -> generated roff file."""
    need("scdoc")
    out = tmp_path_factory.mktemp("man")
    p = subprocess.run([sys.executable, str(GEN), "man", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return {f.name: f for f in out.iterdir()}


def render(page: Path) -> tuple[str, str]:
    """(text, warnings) of ``man --warnings -l``, at a fixed width, without hyphenation
    breaking option names over lines."""
    env = dict(os.environ, MANWIDTH="200", MAN_KEEP_FORMATTING="", LC_ALL="C.UTF-8")
    p = subprocess.run([need("man"), "--warnings", "-E", "UTF-8", "-l", str(page)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    text = re.sub(r".\x08", "", p.stdout)  # overstrike bold/underline, if any
    return text.replace("\u2010", "-"), p.stderr


def help_text(prog: str, *sub: str) -> str:
    module = gen.PROGRAMS[prog][0]
    p = subprocess.run([sys.executable, "-m", module, *sub, "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200"), timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return p.stdout


def help_options(text: str) -> set[str]:
    """The options ``--help`` lists: each line of its option sections that starts with one."""
    opts: set[str] = set()
    for line in text.splitlines():
        m = re.match(r"\s{2}(-[-\w]+(?:[ ,]+[^\s,]+)*)", line)
        if m:
            opts |= set(re.findall(r"(?<![\w-])--?[a-zA-Z][-\w]*", m.group(1)))
    return opts


def documented(opt: str, text: str) -> bool:
    """``opt`` heads an item of the page's option list ("--meta K=V", "-h, --help"), not
    merely mentioned in a usage line or an example."""
    return re.search(rf"^ +(?:-[-\w]+(?: \S+)?, )*{re.escape(opt)}(?:[ ,=]|$)", text, re.M) is not None


def subcommands(prog: str) -> dict[str, list[str]]:
    """name -> aliases, from the parser (so new commands are checked as they are added)."""
    parser = gen.load_parser(prog)
    out: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for pseudo in action._choices_actions:
                sub = action.choices[pseudo.dest]
                out[pseudo.dest] = [n for n, p in action.choices.items() if p is sub and n != pseudo.dest]
    return out


def man_sections(text: str) -> dict[str, str]:
    """A rendered page cut at its subsection headings (3-space indented lines)."""
    parts = re.split(r"^ {3}(\S.*)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


# ------------------------------------------------------------------ man pages


def test_every_page_of_the_sources_is_generated(pages):
    want = {p.stem for p in (REPO / "man").glob("*.scd")}
    assert set(pages) == want
    assert {"fdboxd.8", "fdboxctl.1", "fdbox-qemu.1", "fdbox.4"} <= want


def test_pages_render_without_warnings(pages):
    for name, page in pages.items():
        text, warnings = render(page)
        assert warnings == "", (name, warnings)
        assert re.search(r"^NAME\n", text, re.M) and "SEE ALSO" in text, name


def test_the_warning_check_can_fail(pages, tmp_path):
    broken = tmp_path / "broken.8"
    broken.write_text(pages["fdboxd.8"].read_text() + ".RS 4\n.RE\n.RE\n\\fBunterminated\n.NOSUCHMACRO x\n")
    _, warnings = render(broken)
    assert warnings != ""


@pytest.mark.parametrize("prog", list(gen.PROGRAMS))
def test_every_option_of_help_is_in_the_man_page(pages, prog):
    page = next(p for n, p in pages.items() if n.rsplit(".", 1)[0] == prog)
    text, _ = render(page)
    top = help_options(help_text(prog))
    assert {"--help", "--version"} <= top
    missing = {o for o in top if not documented(o, text)}
    assert not missing, f"{prog}: options of --help not in its page: {sorted(missing)}"
    sections = man_sections(text)
    for name, aliases in subcommands(prog).items():
        title = ", ".join([name, *aliases])
        assert title in sections, f"{prog} {name}: no section '{title}' in the page"
        sub = help_options(help_text(prog, name)) - {"-h", "--help"}
        missing = {o for o in sub if not documented(o, sections[title])}
        assert not missing, f"{prog} {name}: options of --help not in its section: {sorted(missing)}"


def test_help_options_finds_what_help_prints():
    """The parser of --help output above finds the options (so the check can fail)."""
    opts = help_options(help_text("fdboxd"))
    assert {"--socket", "--backend", "--box-owners", "-h", "--help"} <= opts
    assert "--device" not in opts  # argparse.SUPPRESS: not in --help, so not required


def test_fdbox4_documents_every_ioctl_and_errno_of_the_header(pages):
    text, _ = render(pages["fdbox.4"])
    header = HEADER.read_text()
    ioctls = set(re.findall(r"^#define\s+(FDBOX_IOC_\w+)\s", header, re.M))
    assert len(ioctls) >= 10
    assert not {i for i in ioctls if i not in text}, sorted(i for i in ioctls if i not in text)
    errnos = set(re.findall(r"^ \*\s+- (E[A-Z0-9]+):", header, re.M))
    assert {"EPERM", "ENOTTY", "EBUSY"} <= errnos
    errors = text.split("\nERRORS\n", 1)[1]
    assert not {e for e in errnos if not re.search(rf"^ +{e}$", errors, re.M)}, errnos


def test_box_owners_page_documents_the_file_format(pages):
    text, _ = render(pages["fdbox-box-owners.5"])
    assert "--box-owners" in text and "PATTERN" in text and "OWNER" in text
    assert "fdbox-box-owners(5)" in render(pages["fdboxd.8"])[0]


def test_generation_is_reproducible(pages, tmp_path):
    p = subprocess.run([sys.executable, str(GEN), "man", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    for name, page in pages.items():
        assert (tmp_path / name).read_bytes() == page.read_bytes(), name


# ------------------------------------------------------------------ bash completion


@pytest.fixture(scope="module")
def completions(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("completion")
    p = subprocess.run([sys.executable, str(GEN), "completion", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return out


def complete(completions: Path, prog: str, *words: str) -> list[str]:
    """What bash offers for the last of ``words`` (typed after PROG), via `complete -p`."""
    script = (
        f'source "{completions / prog}"\n'
        f'spec=$(complete -p {prog})\n'
        'func=${spec#*-F }; func=${func%% *}\n'
        'COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n'
        '"$func" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    p = subprocess.run([need("bash"), "--norc", "-c", script, prog, prog, *words],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    return [w for w in p.stdout.splitlines() if w]


@pytest.mark.parametrize("prog", list(gen.PROGRAMS))
def test_completion_offers_every_subcommand_and_option(completions, prog):
    parser = gen.load_parser(prog)
    top = {f for a in parser._actions if a.help is not argparse.SUPPRESS for f in a.option_strings}
    assert set(complete(completions, prog, "-")) == top
    subs = subcommands(prog)
    names = {n for name, aliases in subs.items() for n in [name, *aliases]}
    offered = complete(completions, prog, "")
    assert set(offered) == names, prog
    for name in names:
        sub = help_options(help_text(prog, name))
        assert set(complete(completions, prog, name, "-")) == sub, (prog, name)
        # Global options before the subcommand do not hide it.
        assert set(complete(completions, prog, "--socket", "/x", name, "-")) == sub, (prog, name)


def test_completion_offers_choices_and_prefixes(completions):
    assert complete(completions, "fdboxd", "--backend", "") == ["auto", "memory", "kernel", "liveupdate"]
    assert complete(completions, "fdboxd", "--log-level", "w") == ["warning"]
    ctl = set(subcommands("fdboxctl"))
    assert set(complete(completions, "fdboxctl", "s")) == {n for n in ctl if n.startswith("s")}
    # After -- the words are the command's (fdboxctl get ... -- CMD): nothing of ours.
    assert complete(completions, "fdboxctl", "get", "vm1", "ram0", "--", "-") == []


def test_completion_completes_file_arguments(completions, tmp_path):
    (tmp_path / "owners-file").write_text("")
    got = complete(completions, "fdboxd", "--box-owners", str(tmp_path / "owners-"))
    assert got == [str(tmp_path / "owners-file")]
