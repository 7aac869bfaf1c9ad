"""The package's layering, read from its own source (issue 19).

Two rules, each with an allowlist of today's breaches that may only shrink:

- **No import circle inside ``fdboxd/``.** Every import counts, including the ones
  under ``TYPE_CHECKING`` and the lazy ones inside functions: a circle hidden from the
  interpreter is still a circle for a reader.
- **No private name of one module used by another.** ``from .x import _y`` and
  ``obj._y`` where ``_y`` is not defined in the module that reads it (``self._y`` and
  ``cls._y`` inside a class are the class's own business).

A breach not on the list fails ("new coupling"); a listed breach that is gone fails too
("remove it from the list"), so the list only ever gets shorter.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "fdboxd"

ALLOWED_CIRCLES: set[frozenset[str]] = set()
"""Import circles (strongly connected components of more than one module): none since
issue 19 (store, lifecycle, reconcile, gmem and net were one)."""

GENERIC_CORE = ("fdboxd.store", "fdboxd.lifecycle", "fdboxd.reconcile", "fdboxd.preflight")
"""Modules that loop over entries and call their kind (:mod:`fdboxd.kinds`), never naming one."""

FRONT_ENDS = ("fdboxd.dbus", "fdboxd.varlink.server", "fdboxd.varlink.service")
"""Wire formats only: they call :mod:`fdboxd.service` (the operations and their rules,
one for both), never the store, its lifecycle, the preflight or a kind themselves."""
BEHIND_THE_SERVICE = ("fdboxd.store", "fdboxd.lifecycle", "fdboxd.preflight", "fdboxd.reconcile", "fdboxd.gmem",
                      "fdboxd.net", "fdboxd.kinds")

KIND_MODULES = ("fdboxd.gmem", "fdboxd.net", "fdboxd.kinds.memfd", "fdboxd.kinds.guest_memfd", "fdboxd.kinds.tap")
KIND_EXTRA_KEYS = ("net", "recreate", "guest_memfd")

ALLOWED_PRIVATE: Counter[tuple[str, str]] = Counter({
    # (reading module, private name): number of uses today; only ever shrinks
})
"""Issue 19 empties this: lifecycle, reconcile and gmem reach into the Store today."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = module.split(".")
    if not is_pkg:
        base.pop()
    for _ in range(level - 1):
        base.pop()
    return ".".join(base + ([name] if name else []))


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every fdboxd module that ``module`` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fdboxd"))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_pkg, node.level, node.module) if node.level else (node.module or "")
            if not target.startswith("fdboxd"):
                continue
            for a in node.names:  # "from . import gmem" imports the module fdboxd.gmem
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known else target)
    found.discard(module)
    return {m for m in found if m in known}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """Tarjan's strongly connected components with more than one member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: set[frozenset[str]] = set()
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _defined_names(tree: ast.Module) -> set[str]:
    """Every name a module defines anywhere: functions, classes, methods, attributes
    assigned on self/cls, module globals, dataclass fields."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _is_private(name: str) -> bool:
    """``_x`` but not ``__x__`` (Python's) nor ``_x_`` (ctypes' ``_fields_``, ``_pack_``)."""
    return name.startswith("_") and not name.startswith("__") and not name.endswith("_")


def _private_uses() -> Counter[tuple[str, str]]:
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in _modules().items()}
    defined = {m: _defined_names(t) for m, t in trees.items()}
    ours = set().union(*defined.values())  # a private name no fdboxd module defines is a library's (os._exit)
    uses: Counter[tuple[str, str]] = Counter()
    for module, tree in trees.items():
        own = defined[module]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fdboxd")):
                for a in node.names:
                    if _is_private(a.name):
                        uses[(module, a.name)] += 1
            elif isinstance(node, ast.Attribute):
                name = node.attr
                if not _is_private(name) or name not in ours:
                    continue
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if name in own:
                    continue
                uses[(module, name)] += 1
    return uses


def test_no_import_circle_inside_the_package():
    circles = _circles(_graph())
    new = circles - ALLOWED_CIRCLES
    gone = ALLOWED_CIRCLES - circles
    assert not new, f"new import circle(s): {[sorted(c) for c in new]}"
    assert not gone, f"circle(s) gone or changed, update ALLOWED_CIRCLES: {[sorted(c) for c in gone]}"


def test_no_private_name_crosses_a_module():
    uses = _private_uses()
    new = {k: n for k, n in uses.items() if n > ALLOWED_PRIVATE.get(k, 0)}
    shrunk = {k: (ALLOWED_PRIVATE[k], uses.get(k, 0)) for k in ALLOWED_PRIVATE if uses.get(k, 0) < ALLOWED_PRIVATE[k]}
    assert not new, "private names used across modules (not on the list): " + ", ".join(
        f"{m} uses {n} ×{c}" for (m, n), c in sorted(new.items()))
    assert not shrunk, "fewer uses than listed; shrink ALLOWED_PRIVATE: " + ", ".join(
        f"{m}: {n} {a}→{b}" for (m, n), (a, b) in sorted(shrunk.items()))


def _kind_mentions(module: str, tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "FdType":
            found.append(f"line {node.lineno}: FdType.{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in KIND_EXTRA_KEYS:
            found.append(f"line {node.lineno}: extra key {node.value!r}")
    graph = _graph()
    found += [f"imports {m}" for m in sorted(graph.get(module, ())) if m in KIND_MODULES]
    return found


def test_the_generic_core_names_no_fd_kind():
    mods = _modules()
    bad = {m: _kind_mentions(m, ast.parse(mods[m].read_text())) for m in GENERIC_CORE}
    assert not any(bad.values()), bad


def test_the_front_ends_call_the_service_only():
    """Varlink and D-Bus share one service layer, so a fix to an operation lands once."""
    graph = _graph()
    bad = {m: sorted(i for i in graph[m] if i.startswith(BEHIND_THE_SERVICE)) for m in FRONT_ENDS}
    assert not any(bad.values()), bad
    assert all("fdboxd.service" in graph[m] for m in ("fdboxd.dbus", "fdboxd.varlink.service"))


def test_the_checker_sees_a_circle_and_a_private_use():
    """The checks themselves can fail: a two-module circle and a foreign private name."""
    assert _circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == {frozenset({"a", "b"})}
    tree = ast.parse("import x\ndef f(s):\n    return s._claim() + x._hidden\n")
    own = _defined_names(tree)
    assert "_claim" not in own and "_hidden" not in own
    named = _kind_mentions("x", ast.parse("if e.type == FdType.TAP and 'recreate' in e.extra: pass"))
    assert len(named) == 2, named
