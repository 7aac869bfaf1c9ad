"""fdboxctl's command line, without a daemon: parsing and the exit-code contract."""

from __future__ import annotations

import pytest

from fdboxd import ctl
from fdboxd.errors import ERROR_NAMES, EXIT_CODES


def parse(*argv: str):  # type: ignore[no-untyped-def]
    a = ctl.build_parser().parse_args(list(argv))
    if hasattr(a, "cmd"):
        ctl._fix_remainder(a)
    return a


@pytest.mark.parametrize(
    ("argv", "out", "cmd", "json"),
    [
        (("get", "b", "n", "--", "cat", "--out", "x"), None, ["cat", "--out", "x"], False),
        (("get", "b", "n", "--out", "f"), "f", [], False),
        (("get", "b", "n", "--out=f", "--json"), "f", [], True),
        (("get", "--out", "f", "b", "n"), "f", [], False),
        (("get", "b", "n", "sh", "-c", "x"), None, ["sh", "-c", "x"], False),
        (("--json", "get", "b", "n", "--", "true"), None, ["true"], True),
    ],
)
def test_get_arguments(argv, out, cmd, json):
    a = parse(*argv)
    assert (a.box, a.name, a.out, a.cmd, a.json) == ("b", "n", out, cmd, json)


def test_json_flag_global_or_per_command():
    assert parse("--json", "list").json is True
    assert parse("list", "--json").json is True
    assert parse("list").json is False


def test_exit_codes_are_distinct_and_not_reserved():
    codes = [EXIT_CODES[n] for n in ERROR_NAMES]
    assert len(set(codes)) == len(codes)
    assert not {0, 1, 2, 126, 127} & set(codes)
    assert all(c < 126 for c in codes)


def test_unreachable_socket_exit_code(tmp_path, capsys):
    assert ctl.main(["--socket", str(tmp_path / "none"), "status"]) == EXIT_CODES["BackendUnavailable"]
    assert "BackendUnavailable" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["get", "b", "n"], ["seal"], ["seal", "b", "--all"], ["put", "b", "n"],
                                  ["put", "b", "n", "--fd", "3", "--file", "x"], ["nope"]])
def test_usage_errors_exit_2(argv, tmp_path):
    with pytest.raises(SystemExit) as ei:
        ctl.main(["--socket", str(tmp_path / "none"), *argv])
    assert ei.value.code == 2
