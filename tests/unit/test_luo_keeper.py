"""Who keeps sealed LUO sessions until the kexec: the choice, by manager version.

systemd's fd store only where PID 1 carries it across kexec through LUO (v261, with
FileDescriptorStorePreserve=yes on the unit); the holder process everywhere else. The
protocol half (FDSTORE=1, BARRIER=1, LISTEN_FDS back, io.systemd.Manager.Describe) runs
against real sockets in tests/integration/test_systemd.py.
"""

from __future__ import annotations

import pytest

from fdboxd.systemd import (
    FDSTORE_LUO_VERSION,
    LUO_FDNAME_PREFIX,
    choose_luo_keeper,
    fdname_is_valid,
    luo_fdname,
    parse_fdname,
    parse_manager_version,
)

UNIT = {"notify": True, "fdstore_max": 16384, "preserve": True}  # fdboxd.service + the drop-in


@pytest.mark.parametrize(("version", "fdstore"), [(252, False), (254, False), (260, False),
                                                  (261, True), (262, True)])
def test_fd_store_from_261_on(version: int, fdstore: bool) -> None:
    choice = choose_luo_keeper(version, **UNIT)
    assert choice.fdstore is fdstore, choice
    assert str(version) in choice.reason


def test_holder_without_a_known_manager() -> None:
    choice = choose_luo_keeper(None, **UNIT)
    assert not choice.fdstore and "unknown" in choice.reason


@pytest.mark.parametrize(("missing", "said"), [("notify", "NOTIFY_SOCKET"), ("fdstore_max", "FileDescriptorStoreMax"),
                                               ("preserve", "FileDescriptorStorePreserve=yes")])
def test_holder_when_the_unit_cannot_carry_sessions(missing: str, said: str) -> None:
    """On 261 too: PID 1 serializes only a store that exists, of a unit that preserves it."""
    unit = dict(UNIT, **{missing: 0 if missing == "fdstore_max" else False})
    choice = choose_luo_keeper(FDSTORE_LUO_VERSION, **unit)
    assert not choice.fdstore and said in choice.reason, choice


@pytest.mark.parametrize(("text", "major"), [
    ("252.39-1~deb12u1", 252), ("257.9-1~deb13u1", 257), ("261", 261), ("261.2-1.fc45", 261),
    ("v262~rc1", 262), ("", None), ("systemd", None), (None, None), (261, None),
])
def test_parse_manager_version(text: object, major: int | None) -> None:
    assert parse_manager_version(text) == major


def test_session_fdnames() -> None:
    """Valid FDNAMEs, never taken for an entry, never equal for two sessions."""
    assert luo_fdname("vm1") == "luo#vm1"
    assert luo_fdname("fdboxd:index") == "luo#fdboxd#index"  # ':' is LISTEN_FDNAMES' separator
    assert luo_fdname("fdboxd:index") != luo_fdname("index")
    for name in ("vm1", "fdboxd:index", "fdboxd.manifest", "b" * 63):
        fdname = luo_fdname(name)
        assert fdname.startswith(LUO_FDNAME_PREFIX) and fdname_is_valid(fdname) and parse_fdname(fdname) is None
