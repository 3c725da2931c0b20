"""The hostile-values walk: every bus-cli command and sub-command, found in
the click group (a new command is walked without a change here), is given
hostile values for each of its options and arguments, chosen by the option's
kind: wildcard endpoints, other schemes, unreachable hosts (TEST-NET), ports
0/65536/-1, 2^63, -1, 0, NaN and infinities, empty, huge and non-UTF-8
strings, paths that are a file, a directory, under a file, under /proc, a
directory nothing can be created in, a file of mode 000.

No bus runs: each endpoint of the environment is a free loopback port nothing
listens on, so a command that talks to a process must give up (or say what it
waits for) in bounded time. Each run has a hard deadline (its process group
killed after it) and must end without a traceback, with exit 0, 1 or 2 (0 or
130 after the SIGINT the walk sends, as Ctrl-C, to a command still running
after its grace, or to a process once it says READY=1 as to systemd), and a
failing client command says why in one line.

Not the cross product: each kind has a handful of hostile values; a setting
shared by many commands gets each of its values in one of them (in turn), an
endpoint or a path in every command that has it (the checks differ by who
connects and who binds), a command's own options each value.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest

from bus.config import (SETTINGS, ConfigError, database_problem, endpoint_problem,
                        upstream_problem, writer_endpoints_problem,
                        http_address_problem, load_config)
from cli.main import main
from tests.conftest import BUS_CLI, ENDPOINT_VARS, Bus, free_port, subcommands

_SETTING = {s.field: s for s in SETTINGS}
# Commands that serve until stopped: each is stopped (SIGINT) once it says
# READY=1, or after SERVER_GRACE_S (a new one not listed here is walked as a
# client: stopped after CLIENT_GRACE_S, the same checks).
SERVE_UNTIL_STOPPED = {("proxy",), ("writer",), ("reader",), ("up",), ("anchor",), ("gateway",)}
SERVER_GRACE_S = 10.0
# A client command still running after this long is asked to stop (SIGINT):
# it must have said what it waits for by then.
CLIENT_GRACE_S = 8.0
STOP_DEADLINE_S = 12.0
# The first line a command that waits prints, at the latest (generous: the
# machine is shared; the rule is 2 s).
FIRST_LINE_S = 5.0
HUGE = "x" * 100_000
NOT_UTF8 = b"\xff\xfe\x80bad"
TEST_NET = "192.0.2.1"  # RFC 5737: routed nowhere, a connection there never completes


@dataclass
class Run:
    command: tuple[str, ...]
    argv: list[str | bytes]
    label: str
    serves: bool
    env: dict[str, str] = field(default_factory=dict)
    notify: socket.socket | None = None  # where a process that serves says READY=1


@dataclass
class Outcome:
    run: Run
    code: int | None
    stdout: str
    stderr: str
    interrupted: bool
    seconds: float
    first_line_s: float | None


def walked_commands(group: click.Group = main, path: tuple[str, ...] = ()
                    ) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command of the group, groups with a behaviour of their own
    (`anchor` alone runs the worker) included."""
    for name, command in subcommands(group).items():
        if isinstance(command, click.Group):
            if command.invoke_without_command:
                yield path + (name,), command
            yield from walked_commands(command, path + (name,))
        else:
            yield path + (name,), command


def kind_of(param: click.Parameter) -> str:
    """Which hostile values suit the parameter."""
    setting = _SETTING.get(param.name or "")
    if setting is not None:
        if setting.form in (endpoint_problem, writer_endpoints_problem, upstream_problem) or \
                param.name == "bitcoind_zmq_hashblock":
            return "endpoint"
        if setting.form is http_address_problem:
            return "listen"
        if setting.form is database_problem:
            return "database"
        if param.name in ("curve_dir", "bitcoind_rpc_cookie"):
            return "path"
        if param.name == "bitcoind_rpc_url":
            return "url"
    if isinstance(param.type, (click.Path, click.File)):
        return "path"
    if isinstance(param.type, click.Choice) or (setting is not None and setting.choices):
        return "choice"
    if isinstance(param.type, (click.types.IntParamType, click.IntRange)):
        return "int"
    if isinstance(param.type, (click.types.FloatParamType, click.FloatRange)):
        return "float"
    return "string"


# How many of a kind's first values every client command that has such a
# setting is given: how a command connects, or opens a database, is its own
# (a wildcard or an unreachable host hung or raised in some and not others).
CORE_VALUES = {"endpoint": 2, "database": 1}


def hostile_values(kind: str, tmp: Path) -> list[str | bytes]:
    afile = tmp / "afile"
    adir = tmp / "adir"
    paths: list[str | bytes] = [str(afile / "sub"), "/proc/nope", str(adir), str(afile),
                                unwritable_directory(tmp), str(tmp / "unreadable"), "", NOT_UTF8]
    if kind == "endpoint":
        return [f"tcp://*:{free_port()}", f"tcp://{TEST_NET}:5555", "udp://x", "ws://", "foo",
                "tcp://127.0.0.1:0", "tcp://127.0.0.1:65536", "tcp://127.0.0.1:-1", f"ipc://{afile}/sub", "", HUGE, NOT_UTF8]
    if kind == "listen":
        return ["*:80", f"{TEST_NET}:9101", "127.0.0.1:65536", "127.0.0.1:-1", "foo", HUGE,
                NOT_UTF8]
    if kind == "database":
        return [*paths, "postgresql://nobody@192.0.2.1:1/x?connect_timeout=1", "foo://x"]
    if kind == "path":
        return paths
    if kind == "url":
        return [f"http://{TEST_NET}:8332", "udp://x", "foo", "http://127.0.0.1:0", "", NOT_UTF8]
    if kind == "int":
        return [str(2 ** 63), "-1", "0", "1e3"]
    if kind == "float":
        return ["nan", "inf", "-inf", "-1", "0", "1e308"]
    if kind == "choice":
        return ["bogus", "", NOT_UTF8]
    return ["", HUGE, NOT_UTF8, "\x1b[2J\x1b[31m"]


def unwritable_directory(tmp: Path) -> str:
    """A directory nothing can be created in: a read-only one, or /proc for
    root (who writes in any directory of mode 0555)."""
    return "/proc" if os.geteuid() == 0 else str(tmp / "readonly")


# Values that make every command have a working start: arguments it requires,
# and the shortest waits where it has an option for them (a hostile value of
# the same option comes later on the line, and click takes the last).
def baseline_argument(param: click.Argument, tmp: Path) -> list[str]:
    if isinstance(param.type, (click.Path, click.File)):
        return [str(tmp / "adir")] if param.name == "directory" else [str(tmp / "afile")]
    if param.name == "hex_hash":
        return ["00" * 32]
    if isinstance(param.type, (click.types.IntParamType, click.IntRange)):
        return ["1"]
    return ["walk.t"] if param.required else []


SHORT_WAITS = {"timeout": "2", "wait_timeout": "2", "take_timeout": "2", "timeout_ms": "1000",
               "messages": "10"}


def option_flag(param: click.Option) -> str:
    return max(param.opts, key=len)


def plan(tmp: Path) -> list[Run]:
    """Every run of the walk."""
    runs: list[Run] = []
    # A shared setting's hostile values go to the commands that have it in
    # turn: value i to owners[setting][i % len(owners)].
    owners: dict[str, list[tuple[str, ...]]] = {}
    having: dict[str, list[tuple[str, ...]]] = {}
    commands = list(walked_commands())
    refused_shown: set[tuple[tuple[str, ...], str]] = set()  # (command, refusal)
    for path, command in commands:
        for param in command.params:
            if param.name in _SETTING:
                having.setdefault(param.name, []).append(path)
    for name, paths in having.items():
        # `config` and `up` only show or pass a value on: they take the refused ones.
        paths = [p for p in paths if p not in (("config",), ("up",))] or paths
        # First the process that uses the setting, then the clients.
        roles = _SETTING[name].roles
        owners[name] = sorted(paths, key=lambda p: (
            not (p in SERVE_UNTIL_STOPPED and p[-1] in roles), p))

    for path, command in commands:
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        waits = [x for p in command.params if isinstance(p, click.Option)
                 and p.name in SHORT_WAITS for x in (option_flag(p), SHORT_WAITS[p.name])]

        def argv(replace: click.Argument | None = None, value: str | bytes = "",
                 extra: tuple[str | bytes, ...] = ()) -> list[str | bytes]:
            line: list[str | bytes] = [BUS_CLI, *path]
            for argument in arguments:
                line += [value] if argument is replace else baseline_argument(argument, tmp)
            return line + waits + list(extra)

        serves = path in SERVE_UNTIL_STOPPED
        for param in command.params:
            if isinstance(param, click.Option) and (param.is_flag or param.name == "help"):
                continue
            kind = kind_of(param)
            values = hostile_values(kind, tmp)
            # Of the values refused before the command does anything (by the
            # option's type, the setting's declaration or the decoding: the
            # same check for every value), each command runs one of each refusal. A shared
            # setting's other values each go to one of its commands in turn;
            # a client's endpoints and paths each take the core ones too.
            core = CORE_VALUES.get(kind, 0) if not serves and path != ("config",) else 0
            kept = values[:core]
            for position, value in enumerate(values[core:], core):
                refusal = refused_by(param, value)
                if refusal is not None:
                    if (path, refusal) not in refused_shown:
                        refused_shown.add((path, refusal))
                        kept.append(value)
                elif param.name not in owners or (
                        owners[param.name][position % len(owners[param.name])] == path):
                    kept.append(value)
            values = kept
            for value in values:
                shown = value if isinstance(value, bytes) or len(value) < 40 else \
                    f"{value[:20]}...({len(value)})"
                if isinstance(param, click.Argument):
                    line = argv(param, value)
                    label = f"{' '.join(path)} {param.name.upper()}={shown!r}"
                else:
                    line = argv(extra=(option_flag(param), value))
                    label = f"{' '.join(path)} {option_flag(param)} {shown!r}"
                runs.append(Run(path, line, label, serves))
    # The group's own option (--config), before a command that reads it.
    for value in hostile_values("path", tmp):
        runs.append(Run(("config",), [BUS_CLI, "--config", value, "config"],
                        f"--config {value!r} config", False))
    return runs


def refused_by(param: click.Parameter, value: str | bytes) -> str | None:
    """What refuses `value` before the command does anything with it, checked
    here as bus-cli checks it: the option's type, the setting's declaration,
    or (bytes that are not UTF-8) the decoding; None: the command runs with it."""
    if isinstance(value, bytes):
        return "decoding"
    try:
        typed = param.type.convert(value, param, None)
    except click.BadParameter:
        return "type"
    if param.name in _SETTING:
        try:
            load_config({param.name: typed}, env={}, config_path=os.devnull)
        except ConfigError:
            return "declaration"
    return None


def environment(tmp: Path) -> dict[str, str]:
    """Nothing listens on any endpoint; waits short; a database of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUS_", "BATCH_"))}
    env.update({name: f"tcp://127.0.0.1:{free_port()}" for name in ENDPOINT_VARS})
    env.update(BUS_DB=str(tmp / "bus.db"), BUS_LOG_FORMAT="json", BUS_REQUEST_TIMEOUT_MS="1000",
               BUS_SHUTDOWN_TIMEOUT_MS="2000", BUS_CONFIG="", BUS_BITCOIND_RPC_URL=
               f"http://127.0.0.1:{free_port()}", BUS_GATEWAY_LISTEN=f"127.0.0.1:{free_port()}")
    return env


def execute(run: Run, cwd: Path) -> Outcome:
    started = time.monotonic()
    proc = subprocess.Popen(run.argv, env=run.env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    first_line: list[float] = []
    out: list[bytes] = []
    err: list[bytes] = []

    def pump(stream: Any, lines: list[bytes], note_first: bool) -> None:
        for line in stream:
            if note_first and not first_line:
                first_line.append(time.monotonic() - started)
            lines.append(line)

    pumps = [threading.Thread(target=pump, args=(proc.stdout, out, False), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, err, True), daemon=True)]
    for thread in pumps:
        thread.start()
    interrupted = False
    code: int | None = None
    # A process that serves is stopped once it says it is ready (sd_notify,
    # as to systemd), or after its grace; a client command after its grace.
    deadline = started + (SERVER_GRACE_S if run.serves else CLIENT_GRACE_S)
    while code is None and time.monotonic() < deadline:
        try:
            code = proc.wait(0.05)
        except subprocess.TimeoutExpired:
            if run.notify is not None and b"READY=1" in drain(run.notify):
                break
    if code is None:
        interrupted = True
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            code = None
    try:  # the process, if it hangs, and what it left behind in its group (`up`'s children)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for thread in pumps:
        thread.join(5)
    return Outcome(run, code, b"".join(out).decode(errors="replace"),
                   b"".join(err).decode(errors="replace"), interrupted,
                   time.monotonic() - started, first_line[0] if first_line else None)


def drain(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            data += sock.recv(4096)
        except BlockingIOError:
            return data


def is_log_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def problems(outcome: Outcome) -> list[str]:
    """What is wrong with how the run ended (nothing: [])."""
    found = []
    if "Traceback" in outcome.stdout or "Traceback" in outcome.stderr:
        found.append("traceback")
    if outcome.code is None:
        return found + [f"did not stop within {STOP_DEADLINE_S}s of SIGINT"]
    allowed = {0, 130} if outcome.interrupted else {0, 1, 2}
    if outcome.code not in allowed:
        found.append(f"exit {outcome.code}")
    said = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
    if outcome.interrupted:
        if not said:
            found.append("ran on silently")
        elif outcome.first_line_s is not None and outcome.first_line_s > FIRST_LINE_S:
            found.append(f"first said what it waits for after {outcome.first_line_s:.1f}s")
    elif outcome.code != 0 and not outcome.run.serves:
        # One line says why: click's usage errors come after its two lines of
        # usage, log lines are the logger's (JSON here), and what a command
        # waited for (or how far it was: bench) it said as it went. A command that reports on each
        # process (ping, stats) says it on standard output.
        error_lines = [ln for ln in said if not is_log_line(ln)
                       and not ln.startswith(("Usage: ", "Try '", "waiting for ", "bench: "))]
        if len(error_lines) > 1 or not (error_lines or outcome.stdout.strip()):
            found.append(f"{len(error_lines)} error lines")
    return found


# The walk's runs, in parts that run as tests of their own: the two test
# processes share them (the walk alone took 100 s, the suite's longest test).
WALK_PARTS = 3


@pytest.mark.parametrize("part", range(WALK_PARTS))
def test_every_command_and_option_takes_hostile_values_without_a_hang_or_traceback(
        tmp_path: Path, part: int) -> None:
    (tmp_path / "afile").write_text("not a directory, not a key, not a proof\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "unreadable").write_text("")
    (tmp_path / "unreadable").chmod(0)  # readable all the same by root: the others are not
    (tmp_path / "readonly").mkdir(mode=0o555)
    runs = plan(tmp_path)
    commands = {run.command for run in runs}
    assert {("publish",), ("keys", "generate"), ("anchor",), ("db", "copy"),
            ("gateway",), ("tokens", "generate")} <= commands
    runs = runs[part::WALK_PARTS]
    # The notify sockets' paths must be short (108 bytes at most).
    sockets_dir = Path(tempfile.mkdtemp(prefix="walk-", dir="/tmp"))
    for index, run in enumerate(runs):
        run.env = environment(tmp_path / f"run{index}")
        if run.serves:
            run.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            run.notify.bind(str(sockets_dir / f"{index}"))
            run.notify.setblocking(False)
            run.env["NOTIFY_SOCKET"] = str(sockets_dir / f"{index}")
    workdirs = []
    for index in range(len(runs)):
        workdir = tmp_path / f"run{index}"
        workdir.mkdir()
        workdirs.append(workdir)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(execute, runs, workdirs))
    took = time.monotonic() - started
    for run in runs:
        if run.notify is not None:
            run.notify.close()
    shutil.rmtree(sockets_dir, ignore_errors=True)
    failures = []
    for outcome in outcomes:
        found = problems(outcome)
        if found:
            tail = (outcome.stderr.strip().splitlines() or [""])[-3:]
            failures.append(f"{outcome.run.label}: {', '.join(found)} (exit {outcome.code}, "
                            f"{outcome.seconds:.1f}s) {' | '.join(t[:300] for t in tail)}")
    print(f"{len(runs)} runs in {took:.0f}s", file=sys.stderr)
    assert not failures, f"{len(failures)} of {len(runs)} runs:\n" + "\n".join(failures)


def test_audit_proof_of_an_id_past_the_last_says_there_is_no_such_message(bus: Bus) -> None:
    """`audit proof 999` on a database of fewer messages said "message 999 is
    in no seal", as if it existed and were waiting for its seal."""
    done = bus.cli("audit", "proof", "999")
    assert (done.returncode, done.stderr.strip()) == (
        1, "Error: no message 999: the database holds no message yet")
    assert bus.cli("publish", "walk.t", "one", "--wait").returncode == 0
    done = bus.cli("audit", "proof", "999")
    assert (done.returncode, done.stderr.strip()) == (
        1, "Error: no message 999: the last stored is 1")


def test_an_error_of_several_lines_from_a_library_is_said_in_one(tmp_path: Path) -> None:
    """libpq's errors span lines ("Connection refused\\n\\tIs the server
    running on that host ..."), and bus-cli printed them as they were: the
    walk found `audit verify --db postgresql://...` saying its error in three."""
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/x?connect_timeout=2"
    for command in (("db", "migrate"), ("audit", "verify")):
        done = subprocess.run([BUS_CLI, *command, "--db", url], env=environment(tmp_path),
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("Error: cannot connect to postgresql://nobody@127.0.0.1:") \
            and "Connection refused Is the server running" in line, line


@pytest.mark.parametrize("process, flag", [("writer", "--control-endpoint"),
                                           ("proxy", "--pub-endpoint"),
                                           ("reader", "--read-endpoint")])
def test_a_process_given_an_address_it_cannot_bind_says_so_in_one_line(
        tmp_path: Path, process: str, flag: str) -> None:
    """libzmq's EADDRNOTAVAIL (an address of no interface of this host)
    crashed the process with a traceback (the walk found it for the reader)."""
    endpoint = f"tcp://{TEST_NET}:{free_port()}"
    done = subprocess.run([BUS_CLI, process, flag, endpoint], env=environment(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [refused] = [event for line in done.stderr.splitlines() if is_log_line(line)
                 for event in [json.loads(line)] if event["level"] == "error"]
    assert refused["event"] == "cannot_start"
    assert refused["error"] == f"{endpoint}: cannot bind: Cannot assign requested address"


def test_a_database_server_that_does_not_answer_is_waited_for_aloud(tmp_path: Path) -> None:
    """A PostgreSQL URL whose host never answers: each database command says
    within about a second what it waits for, waits no longer than the URL's
    own connect_timeout (the walk found audit verify silent for 10 s: ours
    overrode it), and names the server, not "no bus database" (db copy)."""
    url = f"postgresql://nobody@{TEST_NET}:1/x?connect_timeout=2"
    for command in (("audit", "verify", "--db", url), ("db", "migrate", "--db", url),
                    ("db", "copy", "--from", url, "--to", str(tmp_path / "c.db"))):
        started = time.monotonic()
        done = subprocess.run([BUS_CLI, *command], env=environment(tmp_path), cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
        took = time.monotonic() - started
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and took < 8, (command, took, lines)
        assert lines[-1].startswith(f"Error: cannot connect to {url}"), (command, lines)
        if took > 1.5:  # the host did not refuse at once (no route here is as fast)
            assert lines[0].startswith(f"waiting for {url}"), (command, lines)
