"""``fdboxctl``: the command line for fdboxd, built on :mod:`fdboxd.client` only.

Human tables by default, ``--json`` for scripts. Exit codes mean something:

- ``0`` done;
- ``1`` something unexpected: no reply within ``--timeout``, a protocol error, a bug;
- ``2`` a bad command line: argparse's errors and the ones found after parsing (a
  ``--meta`` without ``=``, an ``--fd`` that is not open, a ``--from-file`` that
  cannot be read), always before anything was sent;
- ``3`` ``preflight`` found something that would not survive the kexec;
- ``130`` interrupted (SIGINT, Ctrl-C): one line, and ``get --out FILE`` leaves FILE
  as it was (it writes a temporary file beside it and renames it at the end);
- ``fdboxd.errors.EXIT_CODES[name]`` (10 and up) for each fdbox error name, so a script
  can tell ``NotFound`` from ``PermissionDenied`` without parsing text;
- ``get … -- CMD`` and ``get-box … -- CMD`` *become* CMD (exec, like
  ``s6-fdholder-retrieve``), so its exit status is CMD's; 127 if CMD cannot be run.

Timeouts: ``seal`` waits as long as it takes (the seal unit's TimeoutStartSec= is the
limit); every other command gives up after 60 s without a reply; ``--timeout SECONDS``
sets it for any command (0: wait forever), like ``s6-fdholder-*``'s ``-t``.

``get`` hands the fd over the systemd way: fd 3, ``LISTEN_FDS=1``,
``LISTEN_FDNAMES=NAME`` and ``LISTEN_PID`` set to the pid of the program that runs (the
same process, since fdboxctl execs it).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import json
import os
import stat
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

from . import __version__, paths
from .client import Client, VarlinkCallError, read_all
from .errors import EXIT_CODES, FdboxError

SD_LISTEN_FDS_START = 3
EXIT_EXEC_FAILED = 127


EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_PREFLIGHT = 3
EXIT_INTERRUPTED = 128 + 2  # SIGINT, as a shell reports it
DEFAULT_TIMEOUT = 60.0
COPY_CHUNK = 1 << 20


class UsageError(Exception):
    """A command line that parsed but makes no sense (exit 2, like argparse's own)."""


# ---------------------------------------------------------------------- output helpers


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(h) for h in header]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _entry_row(e: dict[str, Any], states: dict[str, str]) -> list[str]:
    meta = ",".join(f"{k}={v}" for k, v in sorted(e.get("metadata", {}).items()))
    return [
        e["box"], e["name"], e["type"], _human_size(int(e["size"])), f"{e['uid']}:{e['gid']}",
        states.get(e["box"], "?") + ("*" if e.get("claimed") else ""), _when(e["created"]), meta,
    ]


# ---------------------------------------------------------------------- commands


def cmd_status(c: Client, a: argparse.Namespace) -> int:
    st = c.status()
    if a.json:
        _print_json(st)
        return 0
    print(f"fdboxd {st.get('version', '?')}: backend {st['backend']}"
          f" ({'survives' if st['survives_kexec'] else 'does not survive'} kexec)")
    print(f"state:    {st['state']}")
    print(f"boxes:    {st['boxes']} ({st['sealed']} sealed, {st['restored']} restored)")
    print(f"entries:  {st['entries']}")
    for what in ("lost", "adopted"):
        items = st.get(what) or []
        if items:
            print(f"{what}:    " + ", ".join(f"{i['box']}/{i['name']} ({i['type']})" for i in items))
    if st.get("lost"):
        print("          (fdboxctl ack-lost [BOX] once dealt with)")
    for problem in st.get("problems") or []:
        print(f"problem:  {problem}")
    usage = st.get("usage") or {}
    if usage:
        print("usage:    " + ", ".join(f"{k} {v}" for k, v in usage.items()))
    return 0


def cmd_list(c: Client, a: argparse.Namespace) -> int:
    reply = c.list(a.box)
    if a.json:
        _print_json(reply)
        return 0
    states = {b["name"]: b["state"] for b in reply.get("boxes", [])}
    rows = [_entry_row(e, states) for e in reply.get("entries", [])]
    # Boxes with no visible entries still deserve a line.
    shown = {e["box"] for e in reply.get("entries", [])}
    for b in reply.get("boxes", []):
        if b["name"] not in shown:
            rows.append([b["name"], "-", "-", "0B", str(b.get("owner", "?")), b["state"], "-", ""])
    _table(["BOX", "NAME", "TYPE", "SIZE", "OWNER", "STATE", "CREATED", "METADATA"], rows)
    return 0


def _parse_meta(items: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta wants KEY=VALUE, not {item!r}")
        meta[key] = value
    return meta


def _put_source(a: argparse.Namespace) -> int:
    """The fd ``put`` sends, found *before* connecting: an fd of ours, an opened path, a copy.

    Checked first because connecting takes the lowest free fd: with nothing on fd 3,
    ``--fd 3`` checked afterwards would name fdboxctl's own socket.
    """
    if a.fd is not None:
        try:
            os.fstat(a.fd)
        except OSError as e:
            raise UsageError(f"--fd {a.fd}: {e.strerror} (nothing was passed on fd {a.fd})") from None
        return os.dup(a.fd)  # ours to close, whatever the caller does with a.fd
    if a.file is not None:
        try:
            return os.open(a.file, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            try:
                return os.open(a.file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise UsageError(f"--file {a.file}: {e.strerror}") from None
    return _memfd_copy(a.from_file)


def _memfd_copy(path: str) -> int:
    """A sealable memfd holding a copy of ``path`` (``put --from-file``: try fdbox by hand).

    A regular file is copied by its data extents (``SEEK_DATA``/``SEEK_HOLE``), so its
    holes stay holes in the memfd and a sparse image does not become resident RAM. Any
    other file (a pipe or FIFO, ``/dev/stdin``, a character device), or one whose size
    is 0 (``/proc/version``), is read to its end: its ``st_size`` says nothing about
    what it holds. Chunks of zeros are not written
    either way (the memfd reads zeros there). Written with ``pwrite``: the memfd's
    offset, which every fd the daemon hands out for the entry shares, stays at 0, so a
    program given it as fd 3 reads from the start (``cat <&3``).
    """
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"--from-file {path}: {e.strerror}") from None
    mem = os.memfd_create(os.path.basename(path) or "fdbox", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        st = os.fstat(src)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if stat.S_ISREG(st.st_mode) and st.st_size:
            os.ftruncate(mem, st.st_size)
            for start, end in _data_extents(src, st.st_size):
                reached = _pcopy(src, mem, start, end)
                if reached < end:  # shorter than st_size said (sysfs says 4096): what it holds
                    os.ftruncate(mem, reached)
                    break
        else:  # st_size says nothing (0 also for /proc's regular files): read to the end
            os.ftruncate(mem, _pcopy(src, mem, 0, None))
        return mem
    except BaseException as e:
        os.close(mem)
        if isinstance(e, OSError):
            raise UsageError(f"--from-file {path}: {e.strerror}") from None
        raise
    finally:
        os.close(src)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of data in the first ``size`` bytes of ``fd``; the
    whole range where the file system cannot tell data from holes."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # a hole from off to the end
                return
            if e.errno != errno.EINVAL:
                raise
            yield off, size  # no SEEK_DATA here: copy it all (zero chunks are still skipped)
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        off = end


_ZEROS = bytes(COPY_CHUNK)


def _pcopy(src: int, dst: int, start: int, end: int | None) -> int:
    """Copy ``src`` to ``dst`` at the same offsets from ``start`` to ``end`` (None: read
    ``src`` to its end, from where it stands); return the end reached. ``pwrite`` only:
    ``dst``'s offset does not move. Chunks of zeros are skipped (holes in ``dst``)."""
    off = start
    while end is None or off < end:
        n = COPY_CHUNK if end is None else min(COPY_CHUNK, end - off)
        chunk = os.read(src, n) if end is None else os.pread(src, n, off)
        if not chunk:
            break
        if chunk != (_ZEROS if len(chunk) == COPY_CHUNK else bytes(len(chunk))):
            view = memoryview(chunk)
            at = off
            while view:
                k = os.pwrite(dst, view, at)
                view, at = view[k:], at + k
        off += len(chunk)
    return off


def _copy(src: int, dst: int, size: int | None) -> None:
    """Copy ``src`` from offset 0 to ``dst``'s current position, 1 MiB at a time.

    Streams: memory stays at one chunk whatever the size (a 1 GiB entry does not
    become 1 GiB of fdboxctl). ``size`` None: until EOF.
    """
    off = 0
    while size is None or off < size:
        chunk = os.pread(src, COPY_CHUNK if size is None else min(COPY_CHUNK, size - off), off)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            n = os.write(dst, view)
            view = view[n:]
        off += len(chunk)


def cmd_put(c: Client, a: argparse.Namespace) -> int:
    fd = a.source_fd
    try:
        entry = c.put(a.box, a.name, fd, a.metadata)
    finally:
        os.close(fd)
        a.source_fd = None
    if a.json:
        _print_json(entry)
    else:
        print(f"{entry['box']}/{entry['name']}: {entry['type']}, {_human_size(int(entry['size']))}")
    warning = (entry.get("extra") or {}).get("warning")
    if warning:  # held all the same; the daemon logs it too (fdboxd.kinds.memfd)
        print(f"fdboxctl: warning: {entry['box']}/{entry['name']} {warning}", file=sys.stderr)
    return 0


def _exec_with_fds(c: Client, fds: list[int], names: list[str], argv: list[str]) -> int:
    """Become ``argv`` with ``fds`` at 3, 4, … and the systemd LISTEN_* variables."""
    c.close()
    n = len(fds)
    # Move every fd above the target range first, so no dup2 clobbers one still needed.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, SD_LISTEN_FDS_START + n) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, SD_LISTEN_FDS_START + i, inheritable=True)
        os.close(fd)
    env = dict(os.environ)
    env["LISTEN_FDS"] = str(n)
    env["LISTEN_FDNAMES"] = ":".join(names)
    env["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid: this is CMD's pid
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"fdboxctl: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
        return EXIT_EXEC_FAILED
    return EXIT_EXEC_FAILED  # pragma: no cover - execvpe does not return


def _copy_out(fd: int, out: str) -> None:
    """The entry's bytes to ``out`` ('-': stdout), streamed.

    A file is written under a temporary name beside it (mode 0600, or the mode of the
    file it replaces), flushed, and renamed over ``out`` only once complete: a copy cut
    short (Ctrl-C, a full disk) removes its temporary file and leaves ``out`` as it was.
    A path that exists and is not a regular file (a FIFO, ``/dev/null``) is written in
    place: a rename would replace it.
    """
    size = os.fstat(fd).st_size
    if out == "-":
        sys.stdout.flush()
        _copy(fd, sys.stdout.fileno(), size)
        return
    target = os.path.realpath(out)
    try:
        mode: int | None = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        dst = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _copy(fd, dst, size)
        finally:
            os.close(dst)
        return
    import tempfile  # only here: every other command starts without it

    dst, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".part",
                                dir=os.path.dirname(target))
    try:
        if mode is not None:
            os.fchmod(dst, stat.S_IMODE(mode))
        _copy(fd, dst, size)
        os.fsync(dst)
        os.rename(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(dst)


def cmd_get(c: Client, a: argparse.Namespace) -> int:
    entry, fd = c.get(a.box, a.name)
    if a.cmd:
        return _exec_with_fds(c, [fd], [entry["name"]], a.cmd)
    try:
        _copy_out(fd, a.out)
    finally:
        os.close(fd)
    return 0


def cmd_get_box(c: Client, a: argparse.Namespace) -> int:
    got = c.get_box(a.box)
    if not a.cmd:
        for _, fd in got:
            os.close(fd)
        if a.json:
            _print_json([e for e, _ in got])
        else:
            for e, _ in got:
                print(f"{e['box']}/{e['name']}: {e['type']}, {_human_size(int(e['size']))}")
        return 0
    return _exec_with_fds(c, [fd for _, fd in got], [e["name"] for e, _ in got], a.cmd)


def cmd_rm(c: Client, a: argparse.Namespace) -> int:
    c.remove(a.box, a.name)
    return 0


def cmd_delete_box(c: Client, a: argparse.Namespace) -> int:
    c.delete_box(a.box)
    return 0


def cmd_seal(c: Client, a: argparse.Namespace) -> int:
    more = {"preflight": True} if a.preflight else {}
    sealed = c.seal(None if a.all else a.box, progress=None if a.json else _seal_progress(), **more)
    if a.json:
        _print_json({"sealed": sealed})
    else:
        for name in sealed:
            print(f"sealed {name}")
    return 0


def _seal_progress():  # type: ignore[no-untyped-def]
    """Progress on stderr while entries are checksummed: one updating line on a tty."""
    tty = sys.stderr.isatty()

    def show(p: dict) -> None:  # type: ignore[type-arg]
        total = p.get("total") or 0
        pct = 100 * p.get("done", 0) / total if total else 100.0
        line = (f"sealing {p.get('box')}/{p.get('name')}: "
                f"{p.get('done', 0) / 2**20:.1f}/{total / 2**20:.1f} MiB checksummed ({pct:.0f}%)")
        print(("\r" + line + "\033[K") if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        if tty and pct >= 100:
            print(file=sys.stderr)

    return show


def cmd_preflight(c: Client, a: argparse.Namespace) -> int:
    """One line per problem (entry or host part, what, the fix); exit EXIT_PREFLIGHT if any."""
    r = c.preflight()
    if a.json:
        _print_json(r)
    else:
        for kind, items in (("problem", r.get("problems") or []), ("warning", r.get("warnings") or [])):
            for p in items:
                where = f"{p['box']}/{p['name']}" if p.get("box") and p.get("name") else p.get("box") or p["check"]
                print(f"{kind}: {where}: {p['message']}" + (f"; fix: {p['fix']}" if p.get("fix") else ""))
        n = len(r.get("problems") or [])
        print(f"preflight: {'ok' if r['ok'] else 'refused'}: backend {r['backend']}, {r['entries']} entries, "
              f"{n} problem{'' if n == 1 else 's'}")
    return 0 if r["ok"] else EXIT_PREFLIGHT


def cmd_unseal(c: Client, a: argparse.Namespace) -> int:
    c.unseal(a.box)
    return 0


def cmd_ack_lost(c: Client, a: argparse.Namespace) -> int:
    n = c.acknowledge_lost(a.box)
    if a.json:
        _print_json({"acknowledged": n})
    else:
        print(f"acknowledged {n} lost entr{'y' if n == 1 else 'ies'}")
    return 0


def cmd_report(c: Client, a: argparse.Namespace) -> int:
    boxes = c.last_live_update()
    if a.json:
        _print_json({"boxes": boxes})
        return 0
    if not boxes:
        print("no live update recorded")
        return 0
    rows = []
    for b in boxes:
        for p in b["phases"]:
            d = p.get("duration_usec")
            rows.append([b["box"], p["phase"], _when(p["time"])[:-1] + f".{int(p['time'] * 1000) % 1000:03d}Z",
                         "" if d is None else f"{d / 1e3:.1f} ms"])
    _table(["BOX", "PHASE", "TIME", "TOOK"], rows)
    for b in boxes:
        parts = [f"{b['box']}: {'complete' if b['complete'] else 'in progress'}"]
        if "sealed_to_restored_usec" in b:
            parts.append(f"sealed → restored {b['sealed_to_restored_usec'] / 1e6:.3f} s")
        if "put_to_first_get_usec" in b:
            parts.append(f"last put → first get {b['put_to_first_get_usec'] / 1e6:.3f} s")
        print(", ".join(parts))
    return 0


def cmd_finish(c: Client, a: argparse.Namespace) -> int:
    done = c.finish(a.box)
    if a.json:
        _print_json({"finished": done})
    else:
        for name in done:
            print(f"finished {name}")
    return 0


def cmd_net_restore(c: Client, a: argparse.Namespace) -> int:
    """Recreate BOX's network interfaces that are gone; exit non-zero if one failed."""
    results = c.net_restore(a.box)
    if a.json:
        _print_json({"entries": results})
    else:
        for r in results:
            line = f"{r['status']:9} {r['box']}/{r['name']} ({r['ifname']})"
            print(line + (f": {r['error_name']}: {r['error']}" if r.get("error") else ""))
    failed = [r for r in results if r["status"] == "failed"]
    return EXIT_CODES.get(failed[0].get("error_name") or "", 1) if failed else 0


# ---------------------------------------------------------------------- release-handover (fdbox.ko, no daemon)


def cmd_release_handover(a: argparse.Namespace) -> int:
    """Ask fdbox.ko to give back the memory of a previous kernel's handover it left untouched.

    Talks to /dev/fdbox itself, not to fdboxd: the case it is for (a handover of another
    FDBOX_KHO_VERSION, or a damaged one) is one no daemon can restore anyway.
    """
    from .uapi import FDBOX_FEATURE_HANDOVER_HELD, FdboxDevice, FdboxOSError

    try:
        with FdboxDevice(a.device) as d:
            v = d.version()
            if not v.features & FDBOX_FEATURE_HANDOVER_HELD and not a.json:
                print("fdboxctl: no previous kernel's handover is held", file=sys.stderr)
            r = d.release_handover()
    except FdboxOSError as e:
        print(f"fdboxctl: {e.error_name}: {e}", file=sys.stderr)
        return EXIT_CODES[e.error_name]
    if a.json:
        _print_json({"folios": r.folios, "bytes": r.bytes, "restore_status": v.restore_status})
    else:
        print(f"released the previous kernel's handover: {r.folios} folios, {r.bytes >> 20} MiB given back "
              f"(it had been refused with errno {-v.restore_status}; see the kernel log)")
    return 0


def _add_release_handover(sub, common: argparse.ArgumentParser) -> None:  # type: ignore[no-untyped-def]
    s = _sub(sub, "release-handover", common,
             "give back the memory of a previous kernel's fdbox.ko handover that the loaded module could not "
             "read (another version, or damaged); its boxes are lost. Talks to /dev/fdbox, not to fdboxd",
             "fdboxctl release-handover", names=False)
    s.add_argument("--device", default="/dev/fdbox", help="the fdbox.ko device (default: /dev/fdbox)")
    s.set_defaults(func=None, device_func=cmd_release_handover)


# ---------------------------------------------------------------------- argument parsing


NAMES = """\
BOX is a named group of entries, usually one VM's files (e.g. vm1): letters, digits
and . _ @ + -, up to 63 characters, starting with a letter or digit. NAME is one entry
in the box (e.g. ram0, devstate): the same characters plus = and , up to 255; it
becomes the fd's name in LISTEN_FDNAMES on the way back."""


def _sub(sub, name: str, common: argparse.ArgumentParser, help: str, example: str,  # type: ignore[no-untyped-def]
         names: bool = True, **kw):
    """A subcommand whose --help says what BOX and NAME are and shows an example."""
    epilog = (NAMES + "\n\n" if names else "") + "example:\n" + "\n".join("  " + line for line in example.splitlines())
    return sub.add_parser(name, parents=[common], help=help, description=help[:1].upper() + help[1:] + ".",
                          epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fdboxctl",
        description="Control fdboxd: named boxes of file descriptors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=NAMES + "\n\nexit codes: 0 ok, 1 unexpected (no reply within --timeout, protocol error), "
        "2 bad command line (nothing was sent), 3 preflight found a problem, "
        + ", ".join(f"{v} {k}" for k, v in EXIT_CODES.items())
        + "; 130 interrupted (Ctrl-C); get/get-box -- CMD: CMD's own status (127: CMD cannot be run).",
    )
    p.add_argument("--socket", default=None, help="fdboxd socket (default: $FDBOX_SOCKET, "
                   f"{paths.SYSTEM_SOCKET} if present, else the user socket)")
    p.add_argument("--json", action="store_true", default=False, help="machine-readable output")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help=f"give up after SECONDS without a reply (0: never; default: none for seal, "
                   f"{DEFAULT_TIMEOUT:g} for the rest)")
    p.add_argument("--version", action="version", version=f"fdboxctl {__version__}")
    # Sub-commands accept --json and --timeout too; SUPPRESS keeps them from resetting the global ones.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help="give up after SECONDS without a reply (0: never)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = _sub(sub, "status", common, "daemon state, backend, lost entries", "fdboxctl status", names=False)
    s.set_defaults(func=cmd_status)

    s = _sub(sub, "list", common, "list entries (of one box)", "fdboxctl list\nfdboxctl list vm1 --json",
             aliases=["ls"])
    s.add_argument("box", nargs="?", metavar="BOX")
    s.set_defaults(func=cmd_list)

    s = _sub(sub, "put", common, "store a file as BOX/NAME",
             "fdboxctl put vm1 notes --from-file /etc/hostname        # a copy in a new memfd\n"
             "fdboxctl put vm1 ram0 --fd 3 3<>/proc/$QEMU_PID/fd/17   # an fd passed to fdboxctl, read-write\n"
             "fdboxctl put vm1 ram0 --file /proc/$QEMU_PID/fd/17 --meta slot=0")
    s.add_argument("box", metavar="BOX")
    s.add_argument("name", metavar="NAME")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--fd", type=int, help="an fd this process inherited (checked before connecting)")
    src.add_argument("--file", help="open this path and store it (e.g. /proc/PID/fd/N of a memfd)")
    src.add_argument("--from-file", metavar="PATH", help="copy PATH into a new memfd and store that (a file's "
                     "holes stay holes; a pipe, FIFO or /dev/stdin is read to its end)")
    s.add_argument("--meta", action="append", default=[], metavar="K=V", help="user metadata (repeatable)")
    s.set_defaults(func=cmd_put)

    s = _sub(sub, "get", common, "run CMD with BOX/NAME as fd 3 (LISTEN_FDS=1), or copy it out",
             "fdboxctl get vm1 ram0 -- qemu-system-x86_64 ... # the memfd as fd 3\n"
             "fdboxctl get vm1 notes --out -                   # its bytes to stdout")
    s.add_argument("box", metavar="BOX")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--out", metavar="FILE", help="copy the file's contents to FILE ('-': stdout) instead; written "
                   "beside FILE and renamed at the end, so Ctrl-C leaves FILE as it was")
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    s.set_defaults(func=cmd_get)

    s = _sub(sub, "get-box", common, "run CMD with every entry of BOX from fd 3 on",
             "fdboxctl get-box vm1 -- my-vmm --restore        # LISTEN_FDNAMES=ram0:ram1:...")
    s.add_argument("box", metavar="BOX")
    s.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    s.set_defaults(func=cmd_get_box)

    s = _sub(sub, "rm", common, "remove BOX/NAME", "fdboxctl rm vm1 ram0", aliases=["remove"])
    s.add_argument("box", metavar="BOX")
    s.add_argument("name", metavar="NAME")
    s.set_defaults(func=cmd_rm)

    s = _sub(sub, "delete-box", common, "remove BOX and all its entries", "fdboxctl delete-box vm1")
    s.add_argument("box", metavar="BOX")
    s.set_defaults(func=cmd_delete_box)

    s = _sub(sub, "seal", common, "seal BOX (or --all) for kexec; waits without a timeout unless --timeout",
             "fdboxctl seal vm1\nfdboxctl seal --all                              # what fdbox-seal.service runs")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("box", nargs="?", metavar="BOX")
    which.add_argument("--all", action="store_true", help="every open box (root only)")
    s.add_argument("--preflight", action="store_true",
                   help="run the preflight first and seal nothing if it finds a problem (what fdbox-seal.service does)")
    s.set_defaults(func=cmd_seal)

    s = _sub(sub, "preflight", common, "check that every entry would survive a kexec now; exit 3 and one "
             "line per problem (the entry, what, the fix) if not",
             "fdboxctl preflight && systemctl kexec\nfdboxctl preflight --json", names=False)
    s.epilog = textwrap.fill(
        "checks: the backend carries each entry (LUO for memfds with auto/liveupdate, fdbox.ko for hugetlb), "
        "kho=on (and liveupdate=on where LUO carries) on the running and the loaded kernel's command line, "
        "a kexec kernel loaded (/sys/kernel/kexec_loaded), each entry carriable (no private guest_memfd, no "
        "hugetlb memfd with F_SEAL_SEAL from a memfd made without MFD_ALLOW_SEALING, no 1 GiB pages, no unknown "
        "type, no unclaimed restored box), room (the next kernel's hugetlb pool, memory for guest_memfd copies, "
        "the state file system), and every running fdbox-qemu@VM has its RAM in box VM. The loaded kernel's "
        "command line is read from /run/fdbox/kexec-cmdline (write it there when you load it; the kernel does "
        "not expose it); without it that check is a warning.", 88) + "\n\n" + s.epilog
    s.set_defaults(func=cmd_preflight)

    s = _sub(sub, "unseal", common, "reopen a sealed BOX", "fdboxctl unseal vm1")
    s.add_argument("box", metavar="BOX")
    s.set_defaults(func=cmd_unseal)

    s = _sub(sub, "ack-lost", common, "acknowledge your lost entries (of BOX, or all): status stops listing them",
             "fdboxctl ack-lost vm1")
    s.add_argument("box", nargs="?", metavar="BOX")
    s.set_defaults(func=cmd_ack_lost)

    s = _sub(sub, "report", common, "the last live update of every box: each phase, when, how long",
             "fdboxctl report\nfdboxctl report --json", names=False)
    s.set_defaults(func=cmd_report)

    s = _sub(sub, "finish", common, "end the restore phase of BOX (or all)", "fdboxctl finish vm1")
    s.add_argument("box", nargs="?", metavar="BOX")
    s.set_defaults(func=cmd_finish)

    s = _sub(sub, "net-restore", common, "recreate the tap/macvtap interfaces of BOX that are gone",
             "fdboxctl net-restore vm1")
    s.add_argument("box", metavar="BOX")
    s.set_defaults(func=cmd_net_restore)

    _add_release_handover(sub, common)
    return p


def _fix_remainder(a: argparse.Namespace) -> None:
    """Split ``get BOX NAME [--out F] [--json] [--] CMD…``: REMAINDER swallows options."""
    cmd: list[str] = a.cmd
    while cmd and cmd[0] != "--":
        if cmd[0] == "--json":
            a.json = True
            cmd = cmd[1:]
        elif cmd[0] == "--out" and len(cmd) > 1 and hasattr(a, "out"):
            a.out, cmd = cmd[1], cmd[2:]
        elif cmd[0].startswith("--out=") and hasattr(a, "out"):
            a.out, cmd = cmd[0].partition("=")[2], cmd[1:]
        else:
            break
    a.cmd = cmd[1:] if cmd and cmd[0] == "--" else cmd


def _timeout(a: argparse.Namespace) -> float | None:
    if a.timeout is None:
        return None if a.command == "seal" else DEFAULT_TIMEOUT
    return None if a.timeout <= 0 else a.timeout


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if hasattr(a, "cmd"):
        _fix_remainder(a)
        if a.command == "get" and not a.cmd and not a.out:
            parser.error("get needs a command after -- (or --out FILE)")
        if a.command == "get" and a.cmd and a.out:
            parser.error("get takes either a command or --out, not both")
    a.source_fd = None
    try:
        # Everything the command line says is checked before connecting (exit 2, nothing sent).
        if a.command == "put":
            a.metadata = _parse_meta(a.meta)
            a.source_fd = _put_source(a)
        if getattr(a, "device_func", None):  # talks to fdbox.ko, not to fdboxd
            return a.device_func(a)
        with Client(a.socket or paths.client_socket(), timeout=_timeout(a)) as c:
            return a.func(c, a)
    except FdboxError as e:
        print(f"fdboxctl: {e.name}: {e.message}", file=sys.stderr)
        return EXIT_CODES[e.name]
    except UsageError as e:
        print(f"fdboxctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TimeoutError:
        print(f"fdboxctl: no reply from fdboxd within {_timeout(a):g} s (--timeout)", file=sys.stderr)
        return EXIT_UNEXPECTED
    except VarlinkCallError as e:
        print(f"fdboxctl: {e.error}: {e.params}", file=sys.stderr)
        return EXIT_UNEXPECTED
    except BrokenPipeError:
        return EXIT_UNEXPECTED
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; a get --out left FILE as it was
        out = getattr(a, "out", None)
        print("fdboxctl: interrupted" + (f"; {out} left as it was" if out and out != "-" else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        print(f"fdboxctl: {e}", file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        if a.source_fd is not None:
            os.close(a.source_fd)


if __name__ == "__main__":
    sys.exit(main())
