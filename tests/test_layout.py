"""The layout is the architecture (docs/architecture.md, "Who may import
whom"): a role never imports another role, the kernel imports no role, and the
neutral packages import neither. Checked on the source, every import statement
(at module level or inside a function), so that a lazy import cannot hide one.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"proxy", "writer", "reader", "anchor", "gateway"}
# What each package may import of this project's packages (besides itself).
ALLOWED = {
    "bus": set(),
    "proofs": set(),
    "storage": {"bus"},
    "proxy": {"bus"},
    "writer": {"bus", "storage", "proofs"},
    "reader": {"bus", "storage", "proofs"},
    "anchor": {"bus", "proofs"},
    # The gateway reaches the bus as a client does (bus.client), never storage.
    "gateway": {"bus"},
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


# --- no SQL outside storage/ -----------------------------------------------------

# Where SQL may be written: storage/ (all of it), and the tests and benchmarks
# that look into a database directly.
SQL_PACKAGES = sorted(set(ALLOWED) - {"storage"})
# A string that begins like an SQL statement (upper case, as the project writes
# SQL): not prose that happens to start with "Select" or "With".
SQL_STATEMENT = re.compile(
    r"\s*(SELECT\s|INSERT\s+(OR\s+\w+\s+)?INTO\s|UPDATE\s+\w+\s+SET\s|DELETE\s+FROM\s"
    r"|CREATE\s+(TEMP\w*\s+|UNIQUE\s+)?(TABLE|INDEX|VIEW|TRIGGER)\s|PRAGMA\s|DROP\s+\w+\s"
    r"|ALTER\s+TABLE\s|WITH\s+(RECURSIVE\s+)?\w+(\s*\([^)]*\))?\s+AS\s*\("
    r"|(BEGIN|COMMIT|ROLLBACK|VACUUM)\b\s*\w*\s*;?\s*$)")
# What runs SQL on a DB-API connection or cursor (sqlite3, psycopg).
SQL_METHODS = {"execute", "executemany", "executescript"}


def sql_outside_storage() -> list[str]:
    found = []
    for package in SQL_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                text = node.value if isinstance(node, ast.Constant) else \
                    node.values[0].value if isinstance(node, ast.JoinedStr) and node.values \
                    and isinstance(node.values[0], ast.Constant) else None
                if isinstance(text, str) and SQL_STATEMENT.match(text):
                    found.append(f"{where}:{node.lineno} SQL {text.strip()[:40]!r}")
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in SQL_METHODS:
                    found.append(f"{where}:{node.lineno} calls .{node.func.attr}()")
    return sorted(set(found))  # an f-string and its first part are one string


def test_no_sql_outside_storage() -> None:
    """storage/ holds all SQL (its docstring): a query written in the CLI or a
    role is one the engines' tests and the PostgreSQL port never see."""
    assert sql_outside_storage() == []


def test_the_check_sees_sql_outside_storage(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "audit.py").write_text(
        'def last(conn, n):\n'
        '    row = conn.execute("SELECT id, topic FROM"\n'
        '                       " messages WHERE id = ?", (n,)).fetchone()\n'
        '    conn.cursor().executemany(f"INSERT INTO t VALUES ({n})", [])\n'
        '    return "Select a topic; with care", "Delete it", "update: done"\n')
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "ok.py").write_text('Q = "SELECT 1"\n')
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert sql_outside_storage() == [
        "cli/audit.py:2 SQL 'SELECT id, topic FROM messages WHERE id '",
        "cli/audit.py:2 calls .execute()",
        "cli/audit.py:4 SQL 'INSERT INTO t VALUES ('",
        "cli/audit.py:4 calls .executemany()"]


# --- the kernel does not load the client library ----------------------------------

KERNEL = ROOT / "bus"
CLIENT = KERNEL / "client"
# The one place the kernel names the client: bus/__init__.py's __getattr__,
# which keeps `from bus import Publisher` working by importing bus.client on
# first use of such a name, not when bus is imported.
LAZY_REEXPORT = ("bus/__init__.py", "__getattr__")


def kernel_client_imports(root: Path) -> list[str]:
    """Each import of bus.client in a kernel module (bus/*.py but bus/client/)."""
    found = []
    for path in sorted((root / "bus").rglob("*.py")):
        where = path.relative_to(root)
        if (root / "bus" / "client") in path.parents:
            continue
        tree = ast.parse(path.read_text(), str(path))
        allowed: set[ast.AST] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and (str(where), node.name) == LAZY_REEXPORT:
                allowed.update(ast.walk(node))
        for node in ast.walk(tree):
            if node in allowed:
                continue
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{alias.name}" for alias in node.names] \
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            if any(name == "bus.client" or name.startswith("bus.client.") for name in names):
                found.append(f"{where}:{node.lineno} imports bus.client")
    return found


def test_no_kernel_module_imports_the_client_library() -> None:
    """The client library is on top of the kernel: a process importing
    bus.protocol loaded bus/client (and its Publisher, Subscriber, ...)."""
    assert kernel_client_imports(ROOT) == []


def test_the_check_sees_a_kernel_module_importing_the_client(tmp_path: Path) -> None:
    (tmp_path / "bus" / "client").mkdir(parents=True)
    (tmp_path / "bus" / "__init__.py").write_text(
        "from bus.client import Publisher\n"
        "def __getattr__(name):\n    import bus.client\n")
    (tmp_path / "bus" / "control.py").write_text(
        "def f():\n    from bus import client\n    import bus.client.errors\n")
    (tmp_path / "bus" / "client" / "x.py").write_text("from bus.client import errors\n")
    assert kernel_client_imports(tmp_path) == ["bus/__init__.py:1 imports bus.client",
                                               "bus/control.py:2 imports bus.client",
                                               "bus/control.py:3 imports bus.client"]


def loaded_modules(code: str) -> set[str]:
    """The modules of this project a fresh interpreter holds after `code`."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json\n"
                               "print(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_importing_the_kernel_does_not_load_the_client_library() -> None:
    """What the static check cannot see: an import through bus/__init__.py."""
    kernel = sorted(path.stem for path in KERNEL.glob("*.py") if path.stem != "__init__")
    loaded = loaded_modules("".join(f"import bus.{name}\n" for name in kernel))
    assert {f"bus.{name}" for name in kernel} <= loaded
    assert sorted(m for m in loaded if m == "bus.client" or m.startswith("bus.client.")) == []
    # ... and the client library's names are where users import them from.
    loaded = loaded_modules("from bus import BusError, BusTimeout, ControlClient, Message, "
                            "Publisher, Subscriber\nfrom bus.client import HistoryClient")
    assert "bus.client.publisher" in loaded


def test_bus_cli_health_loads_no_process() -> None:
    """`health` applies each process's rule (ROLE/health.py) to its stats
    answer: it needs none of the processes, and loaded them all (embit with
    the anchor worker)."""
    ports = {"BUS_CONTROL_ENDPOINT": free_port(), "BUS_PROXY_CONTROL_ENDPOINT": free_port(),
             "BUS_READ_ENDPOINT": free_port(), "BUS_ANCHOR_CONTROL_ENDPOINT": free_port()}
    flags = " ".join(f"--{name[4:].lower().replace('_', '-')} tcp://127.0.0.1:{port}"
                     for name, port in ports.items())
    loaded = loaded_modules(
        "from cli.main import main\n"
        "try:\n"
        f"    main(['health', '--anchor', '--timeout-ms', '100', *{flags.split()!r}])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 1, exc.code  # every process is down\n")
    heavy = sorted(m for m in loaded if m.split(".")[0] == "embit"
                   or (m.split(".")[0] in ROLES and m.split(".")[-1] != "health"
                       and "." in m))
    assert heavy == []
    # The gateway has no control endpoint to ask: its /healthz says.
    assert {f"{role}.health" for role in ROLES - {"gateway"}} <= loaded



def test_a_process_started_by_bus_cli_imports_only_its_own_command() -> None:
    """bus-cli loads a command's module when the command runs (cli/main.py
    COMMANDS): `bus-cli writer`, what a unit and every test start, imported
    every command's module, the bench's and the anchor client's with them:
    0.05 s of each start."""
    loaded = loaded_modules(
        "from cli.main import main\n"
        "try:\n"
        "    main(['writer', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n")
    assert "cli.processes" in loaded
    others = {f"cli.{path.stem}" for path in (ROOT / "cli").glob("*.py")} - {
        "cli.__init__", "cli.main", "cli.entry", "cli.common", "cli.processes"}
    assert sorted(others & loaded) == []

# --- error codes: named constants (bus/protocol.py), never bare strings ------

# Where a code may be spelled: the module that names them.
CODES_MODULE = ROOT / "bus" / "protocol.py"
# The packages whose code answers, raises or compares error codes.
CODE_PACKAGES = ("bus", "proxy", "writer", "reader", "anchor")
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
    found = bare_error_codes(ROOT, protocol.ERROR_CODES)
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
