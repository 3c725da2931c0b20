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
