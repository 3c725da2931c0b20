"""Fixtures that run the real bus: `bus-cli proxy`, `bus-cli writer` and
`bus-cli reader` as subprocesses on free loopback ports, with a SQLite file in the test's temp dir.

Every wait is a poll on a condition with a deadline (`wait_for`); every process
a test starts is stopped, and killed if it will not stop, when the test ends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from bus import protocol
from bus.client import BusError, ControlClient
from tests.bitcoind_double import BitcoindDouble
from tests.regtest import RegtestNode

BUS_CLI = str(Path(sys.executable).with_name("bus-cli"))
ENDPOINT_VARS = ("BUS_PUB_ENDPOINT", "BUS_SUB_ENDPOINT", "BUS_CAPTURE_ENDPOINT",
                 "BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT", "BUS_READ_ENDPOINT",
                 "BUS_NOTIFY_ENDPOINT", "BUS_ANCHOR_CONTROL_ENDPOINT")
DEADLINE = 15.0
# A BATCH_FLUSH_INTERVAL_MS no test waits out.
NEVER_MS = 600_000
# Writer settings under which rows wait for BATCH_SIZE or BATCH_FLUSH_INTERVAL_MS:
# no commit at low load, none when the capture runs dry (group commit).
HOLD_ROWS = {"BATCH_LOW_LOAD_THRESHOLD": 0, "BATCH_GROUP_COMMIT": False}

# A suite started in the background by a shell without job control (`cmd &`
# in a script) inherits SIGINT ignored, and passes that on to every process it
# starts: the Ctrl-C tests' SIGINT would then do nothing (bus-cli tail never
# exits). A handler is reset by exec where an ignored signal is not: the
# processes under test get SIGINT as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_ports(low: int, high: int) -> tuple[int, int]:
    """This pytest-xdist worker's share of [low, high): workers run in separate
    processes, so each must hand out ports from its own slice."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    share = (high - low) // count
    return low + index * share, low + (index + 1) * share


# Ports handed out by free_port in this test run: a port is free when checked
# but only taken when the bus binds it, so the same one must not be handed out
# twice (two endpoints of one bus, or a bus whose processes are still stopping).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, not handed out
    before in this run. A port the kernel hands out (bind to 0) can be taken
    again, before the bus binds it, by the ephemeral end of any client
    connection: these tests open many."""
    low, high = _worker_ports(10_000, _ephemeral_low())
    while True:
        port = random.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port


@contextlib.contextmanager
def mounted_tmpfs(path: Path, mib: int) -> Iterator[Path]:
    """A tmpfs of `mib` MiB mounted at `path` (made here): a disk that really
    fills up. Needs the right to mount (root, as in CI); skips the test with
    the reason elsewhere."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def wait_for(condition: Callable[[], Any], timeout: float = DEADLINE, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def subcommands(command: Any) -> dict[str, Any]:
    """A click group's commands by name (bus-cli's are loaded when asked
    for: cli/main.py COMMANDS); {} for a command."""
    import click
    if not isinstance(command, click.Group):
        return {}
    ctx = click.Context(command)
    return {name: command.get_command(ctx, name) for name in command.list_commands(ctx)}


def query(db: str | Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the writer's database through a separate read-only connection
    (SQLite file, or PostgreSQL URL: `?` placeholders either way)."""
    if str(db).startswith("postgresql://"):
        return _pg_query(str(db), sql, params)
    if not Path(db).exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:  # schema not created yet
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def execute(db: str | Path, sql: str, params: tuple = ()) -> None:
    """Change the database behind the writer's back (as an operator or a fault
    would), on either engine."""
    if str(db).startswith("postgresql://"):
        import psycopg
        with psycopg.connect(str(db), autocommit=True) as conn:
            conn.execute(sql.replace("?", "%s"), params)
        return
    with sqlite3.connect(db, timeout=10) as conn:
        conn.execute(sql, params)
    conn.close()


# What a commit blocked by another session's lock fails with, by engine.
LOCKED_ERROR = {"sqlite": "BusyError", "postgresql": "LockNotAvailable"}


class WriteLock:
    """Another session holding the database's write lock (SQLite's reserved
    lock; on PostgreSQL, an exclusive lock on the messages table) until
    release(): the writer's commits fail with LOCKED_ERROR meanwhile."""

    def __init__(self, db: str) -> None:
        self.db = db
        if db.startswith("postgresql://"):
            import psycopg
            self._conn: Any = psycopg.connect(db, autocommit=True)
            self._conn.execute("BEGIN")
            self._conn.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
        else:
            self._conn = sqlite3.connect(db, isolation_level=None)
            self._conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self._conn is not None:
            self._conn.execute("ROLLBACK")
            self._conn.close()
            self._conn = None


def integrity_ok(db: str | Path) -> bool:
    """SQLite's own check of the file; PostgreSQL checks its pages itself."""
    if str(db).startswith("postgresql://"):
        return True
    return query(db, "PRAGMA integrity_check") == [("ok",)]


def _pg_query(url: str, sql: str, params: tuple) -> list[tuple]:
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()
        except psycopg.errors.UndefinedTable:  # schema not created yet
            return []


def count_messages(db: str | Path, topic_prefix: str = "") -> int:
    rows = query(db, "SELECT count(*) FROM messages WHERE substr(topic, 1, ?) = ?",
                 (len(topic_prefix), topic_prefix))
    return rows[0][0] if rows else 0


class LineReader:
    """Collects a subprocess's output lines on a thread, so tests can wait on them."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))

    def collect(self) -> list[str]:
        while True:
            try:
                self.lines.append(self._queue.get_nowait())
            except queue.Empty:
                return self.lines

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = DEADLINE) -> str:
        return wait_for(lambda: next((ln for ln in self.collect() if predicate(ln)), None),
                        timeout, message="an output line")


class Proc:
    """A started subprocess whose stdout and stderr are collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path | None = None,
                 stdin: Any = subprocess.DEVNULL, pass_fds: tuple[int, ...] = ()) -> None:
        self.args = args
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)
        self.stdout = LineReader(self.popen.stdout)
        self.stderr = LineReader(self.popen.stderr)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.args} did not exit within {timeout}s; "
                        f"stderr: {self.stderr.collect()[-20:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        if self.popen.poll() is None:
            self.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines written to stderr so far."""
        events = []
        for line in self.stderr.collect():
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events


class RawProducer:
    """A bare client: an XPUB that waits for the proxy's subscriptions and sends
    [topic, payload, meta] with chosen seqs, e.g. retransmissions. It opens a
    producer session (`producer_open`) unless session=False, and then sends
    (producer, epoch, seq); without one it sends (producer, seq) only. Unlike
    Publisher it opens no acknowledgement subscription, so batches hold
    exactly the messages a test sends."""

    def __init__(self, bus: Bus, producer: str, session: bool = True) -> None:
        self.producer = producer
        self.epoch: int | None = None
        self.next_seq = 1
        self.signer: protocol.SessionMac | None = None
        if session:
            with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=5000) as control:
                opened = control.request("producer_open", {"producer": producer})
            self.epoch, self.next_seq = opened["epoch"], opened["next_seq"]
            self.signer = protocol.SessionMac(opened["session_key"])
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.XPUB)
        # Like Publisher: a full queue blocks instead of dropping (an XPUB, like a
        # PUB, silently drops at its high-water mark otherwise).
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(bus["BUS_PUB_ENDPOINT"])
        wanted = {b"\x01" + prefix for prefix in protocol.PROXY_SUBSCRIPTIONS}
        while wanted:
            assert self.sock.poll(5000), f"the proxy did not subscribe to {sorted(wanted)[:3]}"
            wanted.discard(self.sock.recv())

    def meta(self, seq: int, topic: bytes, payload: bytes) -> bytes:
        """The meta of (topic, payload) as message `seq` of the session, with its mac."""
        return protocol.encode_meta(self.producer, seq, self.epoch, self.signer, topic=topic,
                                    payload=payload)

    def frames(self, seq: int, topic: bytes, payload: bytes) -> list[bytes]:
        return [topic, payload, self.meta(seq, topic, payload)]

    def send(self, *seqs: int, topic: bytes = b"idem.t") -> None:
        self.send_frames(*(self.frames(seq, topic, b"payload-%d" % seq) for seq in seqs))

    def send_frames(self, *messages: list[bytes]) -> None:
        """Send each message's frames exactly as given, valid or not."""
        for frames in messages:
            self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close(linger=5000)
        self.ctx.term()

    def __enter__(self) -> RawProducer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def signed(state: Any, seq: int, epoch: int | None = None,
           key: bytes | None = None) -> tuple[bytes, bytes, bytes]:
    """Frames of message `seq` of a producer's session (a writer.producers
    ProducerState), as a publisher holding `key` (the session's) sends them."""
    signer = protocol.SessionMac(key or state.session_key)
    topic, payload = b"t", b"p-%d" % seq
    return topic, payload, protocol.encode_meta(state.producer_id, seq, epoch or state.epoch,
                                                signer, topic=topic, payload=payload)


def wait_until_delivered(pub: Any, sub: Any, topic: str) -> None:
    """Publish probes on `topic` until `sub` receives one: a SUB's subscription
    reaches the proxy asynchronously, and only then is anything delivered to it."""
    def probe_arrives() -> bool:
        pub.publish(topic, b"")
        return sub.receive(timeout=0.05) is not None
    wait_for(probe_arrives, message=f"a probe on {topic} to reach the subscriber")


def ping(endpoint: str, curve: Any = None) -> bool:
    with ControlClient(endpoint, timeout_ms=200, curve=curve) as client:
        try:
            return client.request("ping") == "pong"
        except BusError:
            return False


# The processes `Bus.start` runs, and the endpoint each answers ping on.
ROLE_ENDPOINTS = {"writer": "BUS_CONTROL_ENDPOINT", "proxy": "BUS_PROXY_CONTROL_ENDPOINT",
                  "reader": "BUS_READ_ENDPOINT"}


class Bus:
    """One bus (writer + proxy + reader) with its own ports and database file."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.tmp_path = tmp_path
        self.db = str(tmp_path / "bus.db")
        # Only the test's settings: none inherited from the shell running pytest.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("BUS_", "BATCH_"))}
        self.env.update(BUS_DB=self.db, BUS_LOG_FORMAT="json")
        self.env.update({name: f"tcp://127.0.0.1:{free_port()}" for name in ENDPOINT_VARS})
        self.env.update({k: str(v).lower() if isinstance(v, bool) else str(v)
                         for k, v in settings.items()})
        self.db = self.env["BUS_DB"]  # a test may put the database elsewhere
        self.procs: list[Proc] = []
        self.writer: Proc | None = None
        self.proxy: Proc | None = None
        self.reader: Proc | None = None

    def __getitem__(self, name: str) -> str:
        return self.env[name]

    @property
    def engine(self) -> str:
        return "postgresql" if self.db.startswith("postgresql://") else "sqlite"

    def run(self, *args: str, stdin: Any = subprocess.DEVNULL) -> Proc:
        """Start `bus-cli ARGS` with this bus's settings; stopped at teardown."""
        return self.spawn([BUS_CLI, *args], stdin=stdin)

    def spawn(self, argv: list[str], stdin: Any = subprocess.DEVNULL,
              env: dict[str, str] | None = None) -> Proc:
        """Start any program with this bus's settings (and `env`'s over them)."""
        proc = Proc(argv, {**self.env, **(env or {})}, cwd=self.tmp_path, stdin=stdin)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, input: str | None = None, timeout: float = DEADLINE
            ) -> subprocess.CompletedProcess:
        """Run a short bus-cli command to completion."""
        return subprocess.run([BUS_CLI, *args], env=self.env, cwd=self.tmp_path, input=input,
                              capture_output=True, text=True, timeout=timeout)

    def start_writer(self) -> Proc:
        self.writer = self._start_role("writer", "BUS_CONTROL_ENDPOINT")
        return self.writer

    def start_proxy(self) -> Proc:
        self.proxy = self._start_role("proxy", "BUS_PROXY_CONTROL_ENDPOINT")
        return self.proxy

    def start_reader(self) -> Proc:
        self.reader = self._start_role("reader", "BUS_READ_ENDPOINT")
        return self.reader

    def _start_role(self, role: str, control_endpoint: str) -> Proc:
        """Start `bus-cli ROLE` and wait until it answers ping (or fails)."""
        return self._answering(self.run(role), role, control_endpoint)

    def _answering(self, proc: Proc, role: str, control_endpoint: str) -> Proc:
        wait_for(lambda: ping(self[control_endpoint], self.curve()) or self._exited(proc),
                 message=f"{role} ping")
        assert proc.popen.poll() is None, proc.stderr.collect()
        return proc

    def start(self) -> Bus:
        """The three processes started side by side, as systemd starts them:
        none waits for another (the reader opens the database on first use,
        ZeroMQ connects whenever the peer binds)."""
        started = {role: self.run(role) for role in ROLE_ENDPOINTS}
        for role, endpoint in ROLE_ENDPOINTS.items():
            setattr(self, role, self._answering(started[role], role, endpoint))
        # Started means connected: the proxy captures straight to the writer
        # (what a test that stops the writer next counts on).
        wait_for(self._capturing_directly, message="the proxy's capture to reach the writer")
        return self

    def _capturing_directly(self) -> bool:
        try:
            return self.proxy_stats()["capture"]["state"] == "direct"
        except BusError as exc:  # busy: its forwarding loop is being started on the capture
            if exc.code != protocol.BUSY:
                raise
            return False

    @staticmethod
    def _exited(proc: Proc) -> bool:
        return proc.popen.poll() is not None

    def stop(self) -> tuple[int, int]:
        """SIGTERM the proxy, then the writer (the order systemd and `up` use),
        and the reader meanwhile (nothing waits for it)."""
        reader = self.reader if self.reader and self.reader.popen.poll() is None else None
        if reader:
            reader.send_signal(signal.SIGTERM)
        codes = (self.proxy.stop() if self.proxy else 0, self.writer.stop() if self.writer else 0)
        if self.reader:
            code = reader.wait() if reader else self.reader.stop()
            assert code == 0, self.reader.stderr.collect()[-5:]
        return codes

    def writer_stats(self) -> dict[str, Any]:
        return self.request("BUS_CONTROL_ENDPOINT", "stats")

    def proxy_stats(self) -> dict[str, Any]:
        return self.request("BUS_PROXY_CONTROL_ENDPOINT", "stats")

    def request(self, endpoint: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """One control request, as this bus's own client (its CURVE key, if any)."""
        with ControlClient(self[endpoint], timeout_ms=3000, curve=self.curve()) as client:
            return client.request(cmd, args)

    def curve(self) -> Any:
        """The CURVE keys of this bus's own client (BUS_CURVE_KEY), or None."""
        from bus import security
        return security.client_keys(self.config())

    def config(self) -> Any:
        from bus.config import load_config
        return load_config(env=self.env)

    def count(self, topic_prefix: str = "") -> int:
        return count_messages(self.db, topic_prefix)

    def wait_count(self, n: int, topic_prefix: str = "", timeout: float = DEADLINE) -> int:
        wait_for(lambda: self.count(topic_prefix) >= n, timeout,
                 message=f"{n} rows for {topic_prefix!r}* (have {self.count(topic_prefix)})")
        return self.count(topic_prefix)

    def close(self) -> None:
        """Every process still running is sent SIGTERM at once, then each is
        waited for (killed after 10 s): the test is over, so the order no
        longer matters."""
        running = [proc for proc in reversed(self.procs) if proc.popen.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in running:
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        for proc in self.procs:
            for stream in (proc.popen.stdout, proc.popen.stderr):
                stream.close()


# The storage-facing tests: each runs on SQLite and on PostgreSQL (a private
# server, tests/pgserver.py), except those marked sqlite_only (what only a
# file has: its size, its WAL, a full disk, a file that is not a database).
STORAGE_MODULES = {"test_history", "test_consumers", "test_purge", "test_producers", "test_retention",
                   "test_utxos", "test_anchor_records", "test_acks", "test_writer", "test_audit",
                   "test_group_commit"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: a storage test of what only SQLite has")
    config.addinivalue_line("markers", "double_only(reason): an anchor test of what only the "
                                       "bitcoind double can do on demand")
    config.addinivalue_line("markers", "node_options(**options): bitcoind options of the node "
                                       "fixture (rpcthreads, rpcworkqueue)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "node" in metafunc.fixturenames:
        module = metafunc.module.__name__.rpartition(".")[2]
        if metafunc.definition.get_closest_marker("double_only") or module not in CORE_MODULES:
            kinds = ["double"]
        elif module == CONFORMANCE_MODULE:
            kinds = list(NODE_KINDS)
        else:
            kinds = [core_or_double()]
        metafunc.parametrize("node", kinds, indirect=True)
    if "db_engine" not in metafunc.fixturenames or any(
            "db_engine" in str(mark.args[0]) for mark in metafunc.definition.iter_markers(
                "parametrize")):
        return  # a test that names its engines itself
    module = metafunc.module.__name__.rpartition(".")[2]
    both = module in STORAGE_MODULES and not metafunc.definition.get_closest_marker("sqlite_only")
    metafunc.parametrize("db_engine", ["sqlite", "postgresql"] if both else ["sqlite"],
                         indirect=True)


@pytest.fixture
def db_engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    from tests.pgserver import PACKAGE_HINT, PgServer, find_bindir
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(PACKAGE_HINT)
    server = PgServer(bindir, free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def make_bus(tmp_path: Path, db_engine: str, request: pytest.FixtureRequest
             ) -> Iterator[Callable[..., Bus]]:
    """make_bus(**env settings) -> a Bus not yet started; all are torn down after the test.
    On PostgreSQL, each bus gets a new database of the test's private server."""
    buses: list[Bus] = []

    def factory(**settings: Any) -> Bus:
        path = tmp_path / f"bus{len(buses)}"
        path.mkdir()
        if db_engine == "postgresql" and "BUS_DB" not in settings:
            settings["BUS_DB"] = request.getfixturevalue("pg_server").create_database()
        bus = Bus(path, **settings)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        bus.close()


@pytest.fixture
def bus(make_bus: Callable[..., Bus]) -> Bus:
    """A running bus with default batching."""
    return make_bus().start()


# The anchor tests of CORE_MODULES run against a real Bitcoin Core
# (tests/regtest.py), or the bitcoind double where none can run here (the
# report's header says why; BUS_TEST_REQUIRE_BITCOIND=1 fails them instead,
# as CI sets). Those marked double_only stay on the double: what only it can
# be made to do on demand (a lost reply, a held call, a chosen fault). The
# double's own tests (CONFORMANCE_MODULE) run on both: the double must answer
# as Core does.
NODE_KINDS = ("double", "core")
CORE_MODULES = {"test_bitcoind_double", "test_wallet_sync", "test_anchor", "test_anchor_node",
                "test_audit"}
CONFORMANCE_MODULE = "test_bitcoind_double"


@functools.cache
def core_or_double() -> str:
    """The node the anchor tests run on: "core" if a bitcoind can run here (or
    one is required), else "double"."""
    from tests.regtest import missing
    required = os.environ.get("BUS_TEST_REQUIRE_BITCOIND") == "1"
    return "core" if required or missing() is None else "double"


def pytest_report_header(config: pytest.Config) -> str | None:
    from tests.regtest import missing
    reason = None if core_or_double() == "core" else missing()
    return None if reason is None else f"anchor tests on the bitcoind double: {reason}"


@pytest.fixture(scope="session")
def bitcoind_missing() -> str | None:
    from tests.regtest import missing
    return missing()


@pytest.fixture
def make_regtest(tmp_path: Path, bitcoind_missing: str | None
                 ) -> Iterator[Callable[..., RegtestNode]]:
    """make_regtest(**RegtestNode options) -> a started regtest bitcoind on a
    private datadir under the test's tmp and free ports; stopped after the
    test. Skips the test, in one line, where bitcoind cannot run (fails it
    with BUS_TEST_REQUIRE_BITCOIND=1, as CI sets)."""
    if bitcoind_missing:
        if os.environ.get("BUS_TEST_REQUIRE_BITCOIND") == "1":
            pytest.fail(bitcoind_missing)
        pytest.skip(bitcoind_missing)
    nodes: list[RegtestNode] = []

    def factory(**options: Any) -> RegtestNode:
        node = RegtestNode(tmp_path / f"bitcoind{len(nodes)}", free_port, **options)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.close()
        node.remove()


@pytest.fixture
def node(request: pytest.FixtureRequest) -> Iterator[BitcoindDouble | RegtestNode]:
    """The bitcoind double (JSON-RPC and ZMQ hashblock on loopback), or a real
    regtest bitcoind; closed after the test. A node_options(rpcthreads=...,
    rpcworkqueue=...) mark sets those of either (bitcoind's -OPTION=VALUE)."""
    mark = request.node.get_closest_marker("node_options")
    options = dict(mark.kwargs) if mark else {}
    if request.param == "core":
        yield request.getfixturevalue("make_regtest")(
            extra_args=tuple(f"-{name}={value}" for name, value in options.items()))
        return
    double = BitcoindDouble(rpcservertimeout=1.0, **options)  # as bitcoind (30 s), sooner
    yield double
    double.close()
