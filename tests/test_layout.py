"""The layout is the architecture (docs/architecture.md, "Who may import
whom"): a role never imports another role, the kernel imports no role, and the
neutral packages import neither. Checked on the source, every import statement
(at module level or inside a function), so that a lazy import cannot hide one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"proxy", "writer", "reader", "anchor"}
# What each package may import of this project's packages (besides itself).
ALLOWED = {
    "bus": set(),
    "proofs": set(),
    "storage": {"bus"},
    "proxy": {"bus"},
    "writer": {"bus", "storage", "proofs"},
    "reader": {"bus", "storage", "proofs"},
    "anchor": {"bus", "proofs"},
    "cli": {"bus", "storage", "proofs", *ROLES},
}
# proofs/ is pure functions over bytes: the standard library's hashing only.
PROOFS_STDLIB = {"__future__", "hashlib", "typing", "collections"}


def imports_of(path: Path) -> set[str]:
    """The top-level names of every module `path` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations() -> list[str]:
    found = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in sorted(imports_of(path)):
                if name in ALLOWED and name != package and name not in allowed:
                    found.append(f"{path.relative_to(ROOT)} imports {name}")
                if package == "proofs" and name not in ALLOWED and name not in PROOFS_STDLIB:
                    found.append(f"{path.relative_to(ROOT)} imports {name} (proofs: hashlib only)")
    return found


def test_no_package_imports_what_the_layout_forbids() -> None:
    assert violations() == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path, monkeypatch) -> None:
    """The walk finds imports inside functions and `from x.y import z` alike."""
    (tmp_path / "reader").mkdir()
    (tmp_path / "reader" / "late.py").write_text(
        "def f():\n    from writer.store import Store\n    import anchor.worker\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations() == ["reader/late.py imports anchor", "reader/late.py imports writer"]


def test_every_package_is_listed() -> None:
    """A new top-level package must say what it may import."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(ALLOWED), packages - set(ALLOWED)


# --- error codes: named constants (bus/protocol.py), never bare strings ------

# Where a code may be spelled: the module that names them.
CODES_MODULE = ROOT / "bus" / "protocol.py"
# The packages whose code answers, raises or compares error codes.
CODE_PACKAGES = ("bus", "proxy", "writer", "reader", "anchor")
# Files another change of issue 24 owns (the anchor worker's split): their
# bare codes go when that change lands, and this entry with them.
BARE_CODES_PENDING = {"anchor/worker.py"}
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def bare_error_codes(root: Path, codes: frozenset[str]) -> list[str]:
    """Every string literal equal to an error code, as "path:line: code". Not
    counted: the positional arguments of a log call (an event's name and a
    rate limiter's key, a namespace of their own: `log.error("flush_failed")`),
    and the keys of a dict display or a subscript (a stats counter that
    counts a code: `counters["no_utxo"] += 1`)."""
    found = []
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if path == root / CODES_MODULE.relative_to(ROOT):
                continue
            tree = ast.parse(path.read_text(), str(path))
            names: set[int] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in LOG_METHODS:
                    names.update(id(arg) for arg in node.args)
                elif isinstance(node, ast.Dict):
                    names.update(id(key) for key in node.keys if key is not None)
                elif isinstance(node, ast.Subscript):
                    names.add(id(node.slice))
            found += [f"{path.relative_to(root)}:{node.lineno}: {node.value}"
                      for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str)
                      and node.value in codes and id(node) not in names]
    return sorted(found)


def test_no_error_code_is_written_as_a_bare_string() -> None:
    """An error code is bus/protocol.py's constant wherever it is answered,
    raised or compared: one spelling, which docs/protocol.md and the tests can
    find."""
    from bus import protocol
    found = [hit for hit in bare_error_codes(ROOT, protocol.ERROR_CODES)
             if hit.split(":")[0] not in BARE_CODES_PENDING]
    assert found == [], "use bus/protocol.py's constant:\n" + "\n".join(found)


def test_the_check_sees_a_bare_error_code(tmp_path: Path) -> None:
    (tmp_path / "writer").mkdir()
    (tmp_path / "writer" / "late.py").write_text(
        'def f(exc, counters, log):\n'
        '    log.warning("no_utxo", detail="an event name")\n'
        '    counters["no_utxo"] += 1\n'
        '    if exc.code == "no_utxo":\n'
        '        raise Failed("bad_request", "no_utxo in a sentence")\n')
    assert bare_error_codes(tmp_path, frozenset({"no_utxo", "bad_request"})) == [
        "writer/late.py:4: no_utxo", "writer/late.py:5: bad_request"]
