"""A deployment of three hosts on this machine (issue 27), for
tests/test_cluster.py and bench/cluster_bench.py: three network namespaces,
each joined by a veth pair to a bridge of its own in the root namespace,
each with its own address; the root namespace (the test) has an address on
the bridge too, to ask every host for its stats.

    host A   PostgreSQL primary, the proxy, a writer (--standby: the first
             to take the lock serves)
    host B   PostgreSQL hot standby (pg_basebackup), a standby writer, the
             reader (on the hot standby)
    host C   an edge proxy (--upstream A's proxy), an acknowledged publisher,
             subscribers through the edge

CURVE is on between them all, as deploy/cluster.md says. A host's network is
cut by setting its bridge port down (`ip link set ... down`: a pulled cable;
the host keeps its address and its processes run on); `mend` sets it up.

Scenarios (`Deployment.kill_writer`, `cut`, `restart_replica`) each return
the figures of the issue: takeover time, acknowledged messages lost and
stored twice, the subscribers' gaps, and how long the publisher waited for
an acknowledgement. Split brain is checked from the database itself: a
statement trigger the test adds to `messages` records, with each inserting
transaction, the client's address and the time; rolled back with it, so
only committed transactions leave a row (`commits_after_takeover`).

Run as a child (`python -m tests.cluster live|catchup ...`) it is a
subscriber on host C, printing what it saw as one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("a", "b", "c")
PG_PORT = 5432
# The bus's ports, the same on every host (each host has its own address).
PORTS = {"BUS_PUB_ENDPOINT": 5550, "BUS_SUB_ENDPOINT": 5551, "BUS_CAPTURE_ENDPOINT": 5552,
         "BUS_CONTROL_ENDPOINT": 5553, "BUS_PROXY_CONTROL_ENDPOINT": 5554,
         "BUS_READ_ENDPOINT": 5555, "BUS_NOTIFY_ENDPOINT": 5556}
WRITER_VARS = ("BUS_CAPTURE_ENDPOINT", "BUS_CONTROL_ENDPOINT", "BUS_NOTIFY_ENDPOINT")
LOG_LINES_KEPT = 2000
SUBNET_LOCK = "/tmp/bus-cluster-subnets.lock"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def missing() -> str | None:
    """Why three hosts cannot be made here (None: they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "ip is missing (apt-get install iproute2)"
    probe = f"busprobe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Three network namespaces on a bridge of their own, on a /24 of
    10.231.0.0/16 that no interface here uses (chosen and taken under a
    lock: test processes run side by side)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:2]}"
        self.ns = {h: f"bus{tag}{h}" for h in HOSTS}
        self.bridge = f"bbr{tag}"
        self.port = {h: f"bv{tag}{h}" for h in HOSTS}   # the bridge's side of each veth
        self.addr: dict[str, str] = {}
        self.root_addr = ""
        self.made: list[str] = []

    def up(self) -> Hosts:
        """Make them; close() undoes what was made, whatever failed."""
        import fcntl
        ip("link", "add", self.bridge, "type", "bridge")
        self.made.append("bridge")
        with open(SUBNET_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = ip("-o", "-4", "addr").stdout + ip("-4", "route").stdout
            start = os.getpid() % 256
            net = next((f"10.231.{n % 256}" for n in range(start, start + 256)
                        if f"10.231.{n % 256}." not in used), None)
            if net is None:
                raise RuntimeError("no free /24 in 10.231.0.0/16 for three hosts")
            self.addr = {h: f"{net}.{i + 1}" for i, h in enumerate(HOSTS)}
            self.root_addr = f"{net}.254"
            ip("addr", "add", f"{self.root_addr}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for h in HOSTS:
            ip("netns", "add", self.ns[h])
            self.made.append(h)
            ip("link", "add", self.port[h], "type", "veth", "peer", "name", "eth0",
               "netns", self.ns[h])
            ip("link", "set", self.port[h], "master", self.bridge, "up")
            for args in (("addr", "add", f"{self.addr[h]}/24", "dev", "eth0"),
                         ("link", "set", "eth0", "up"), ("link", "set", "lo", "up")):
                ip("-n", self.ns[h], *args)
        return self

    def argv(self, host: str, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *command]

    def cut(self, host: str) -> None:
        ip("link", "set", self.port[host], "down")

    def mend(self, host: str) -> None:
        ip("link", "set", self.port[host], "up")

    def close(self) -> None:
        for h in HOSTS:
            if h in self.made:
                ip("netns", "del", self.ns[h], check=False)  # its veth pair goes with it
        if "bridge" in self.made:
            ip("link", "del", self.bridge, check=False)
        self.made.clear()


class Process:
    """A process on a host, its JSON log lines read as they come: `seen`
    (event -> when first read, time.monotonic()) and the last lines."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str],
                 stdout: Any = subprocess.DEVNULL) -> None:
        self.name = name
        self.popen = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=stdout,
                                      stderr=subprocess.PIPE, text=True, errors="replace",
                                      preexec_fn=_die_with_parent)
        self.seen: dict[str, float] = {}
        self.last: dict[str, dict[str, Any]] = {}  # event -> its last line
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.popen.stderr:
            self.lines = (self.lines + [line])[-LOG_LINES_KEPT:]
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "event" in event:
                self.seen.setdefault(event["event"], time.monotonic())
                self.last[event["event"]] = event
                self.events = (self.events + [event])[-LOG_LINES_KEPT:]

    def wait_for(self, event: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while event not in self.seen:
            if time.monotonic() > deadline or self.popen.poll() is not None:
                raise RuntimeError(f"{self.name}: no {event} within {timeout:.0f} s (exit "
                                   f"{self.popen.poll()}): {''.join(self.lines[-10:])}")
            time.sleep(0.005)
        return self.seen[event]

    def running(self) -> bool:
        return self.popen.poll() is None

    def read_line(self, timeout: float) -> str:
        """Its stdout's next line, or RuntimeError after `timeout` s."""
        import select
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"{self.name}: nothing printed within {timeout:.0f} s: "
                               f"{''.join(self.lines[-10:])}")
        return self.popen.stdout.readline()

    def stop(self, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10)


def _die_with_parent() -> None:
    """In a child before it execs: killed with the test run, however that
    ends (`ip netns exec` execs the command, which keeps this)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def make_keys(directory: Path) -> dict[str, str]:
    """A BUS_CURVE_DIR (server, proxy, and one key in each list) and the
    clients' secret certificates: {'curve': dir, 'publisher': ..., ...}."""
    import zmq.auth
    curve, clients = directory / "curve", directory / "clients"
    curve.mkdir(parents=True)
    clients.mkdir()
    for name in ("server", "proxy"):
        zmq.auth.create_certificates(curve, name)
    paths = {"curve": str(curve)}
    for name, role in (("publisher", "publishers"), ("reader", "readers"),
                       ("admin", "admins")):
        public, secret = zmq.auth.create_certificates(clients, name)
        (curve / role).mkdir()
        Path(public).rename(curve / role / f"{name}.key")
        paths[name] = str(secret)
    return paths


class Deployment:
    """The bus on `hosts` (see the module's doc), its database on a private
    PostgreSQL primary on A and a hot standby of it on B."""

    def __init__(self, hosts: Hosts, workdir: Path, session_timeout_s: int = 5) -> None:
        self.hosts = hosts
        self.workdir = workdir
        self.session_timeout_s = session_timeout_s
        self.procs: list[Process] = []
        self.keys = make_keys(workdir / "keys")
        self.primary: Any = None
        self.replica: Any = None
        self.db = ""
        self.writers: dict[str, Process] = {}
        self.load: Process | None = None
        self.load_count = 0

    # --- settings --------------------------------------------------------------

    def endpoint(self, host: str, var: str) -> str:
        return f"tcp://{self.hosts.addr[host]}:{PORTS[var]}"

    def env(self, host: str, key: str | None = None, **extra: str) -> dict[str, str]:
        """The settings of a process on `host`: the writer's endpoints listed
        with this host's first (a writer binds the first), the proxy's and
        the reader's where they run, CURVE with the client key `key`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BUS_", "BATCH_"))}
        env.update(BUS_LOG_FORMAT="json", BUS_LOG_LEVEL="info", BUS_CURVE_DIR=self.keys["curve"],
                   BUS_PG_SESSION_TIMEOUT_S=str(self.session_timeout_s),
                   BUS_STANDBY_RETRY_MS="100", BUS_REQUEST_TIMEOUT_MS="1000")
        if key:
            env["BUS_CURVE_KEY"] = self.keys[key]
        writer_hosts = [host, *[h for h in ("a", "b") if h != host]] if host in "ab" \
            else ["a", "b"]
        for var in WRITER_VARS:
            env[var] = ",".join(self.endpoint(h, var) for h in writer_hosts)
        for var in ("BUS_PUB_ENDPOINT", "BUS_SUB_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT"):
            env[var] = self.endpoint("a", var)
        env["BUS_READ_ENDPOINT"] = self.endpoint("b", "BUS_READ_ENDPOINT")
        env["BUS_DB"] = self.db
        env.update(extra)
        return env

    def edge_env(self, key: str = "reader") -> dict[str, str]:
        """A client on C that subscribes through the edge."""
        return self.env("c", key, BUS_SUB_ENDPOINT=self.endpoint("c", "BUS_SUB_ENDPOINT"),
                        BUS_PROXY_CONTROL_ENDPOINT=self.endpoint("c",
                                                                 "BUS_PROXY_CONTROL_ENDPOINT"))

    def spawn(self, name: str, host: str, command: list[str], env: dict[str, str],
              stdout: Any = subprocess.DEVNULL) -> Process:
        proc = Process(name, self.hosts.argv(host, *command), env, stdout)
        self.procs.append(proc)
        return proc

    def bus_cli(self, name: str, host: str, args: list[str], env: dict[str, str]) -> Process:
        return self.spawn(name, host, [sys.executable, "-m", "cli.main", *args], env)

    # --- starting ---------------------------------------------------------------

    def start(self) -> Deployment:
        from tests.pgserver import PgServer, find_bindir
        bindir = find_bindir()
        subnet = self.hosts.root_addr.rsplit(".", 1)[0] + ".0/24"
        self.primary = PgServer(bindir, PG_PORT, host=self.hosts.addr["a"], allow=subnet,
                                wrapper=self.hosts.argv("a")).start()
        self.db = self.primary.create_database()
        self.writers["a"] = self.bus_cli("writer A", "a", ["writer", "--standby"],
                                         self.env("a"))
        self.writers["a"].wait_for("took_over", 60)
        self._audit_commits()
        self.replica = PgServer(bindir, PG_PORT, host=self.hosts.addr["b"], allow=subnet,
                                wrapper=self.hosts.argv("b")).start_replica_of(self.primary)
        self.writers["b"] = self.bus_cli("writer B", "b", ["writer", "--standby"],
                                         self.env("b"))
        self.proxy = self.bus_cli("proxy", "a", ["proxy"], self.env("a"))
        self.reader = self.bus_cli("reader", "b", ["reader"], self.env(
            "b", BUS_DB=self.db.replace(self.hosts.addr["a"], self.hosts.addr["b"])))
        self.edge = self.bus_cli("edge", "c", ["proxy", "--upstream",
                                               self.endpoint("a", "BUS_SUB_ENDPOINT")],
                                 self.edge_env())
        self.writers["b"].wait_for("standby_waiting", 60)
        for var, env in (("BUS_PROXY_CONTROL_ENDPOINT", self.env("a")),
                         ("BUS_READ_ENDPOINT", self.env("b")),
                         ("BUS_PROXY_CONTROL_ENDPOINT", self.edge_env())):
            self.wait_answering(env[var])
        self.wait(lambda: self.stats(self.edge_env(), "BUS_PROXY_CONTROL_ENDPOINT")
                  ["upstream"]["connected"], 30, "the edge's upstream")
        return self

    def _audit_commits(self) -> None:
        """The statement trigger that records who committed what (see the
        module's doc); added by the test, not part of the bus's schema."""
        import psycopg
        with psycopg.connect(self.db, autocommit=True) as conn:
            conn.execute("""
                CREATE TABLE commit_audit (at timestamptz NOT NULL, client inet,
                                           backend int NOT NULL);
                CREATE FUNCTION audit_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    INSERT INTO commit_audit VALUES (clock_timestamp(), inet_client_addr(),
                                                     pg_backend_pid());
                    RETURN NULL;
                END $$;
                CREATE TRIGGER audit_commit AFTER INSERT ON messages
                    FOR EACH STATEMENT EXECUTE FUNCTION audit_commit();""")

    # --- asking -----------------------------------------------------------------

    def client_config(self, env: dict[str, str]) -> Any:
        from bus.config import load_config
        return load_config(env=env)

    def stats(self, env: dict[str, str], var: str) -> dict[str, Any]:
        from bus import security
        from bus.client import ControlClient
        cfg = self.client_config(dict(env, BUS_CURVE_KEY=self.keys["admin"]))
        with ControlClient(env[var], timeout_ms=2000, curve=security.client_keys(cfg)) as c:
            return c.request("stats")

    def wait_answering(self, endpoint: str, timeout: float = 60) -> None:
        from bus import security
        from tests.conftest import ping
        keys = security.client_keys(self.client_config(self.env("c", "admin")))
        self.wait(lambda: ping(endpoint, keys), timeout, f"{endpoint} to answer ping")

    @staticmethod
    def wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except Exception:  # noqa: BLE001 (a process not answering yet)
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg
        with psycopg.connect(self.db, autocommit=True, connect_timeout=10) as conn:
            return conn.execute(sql, params).fetchall()

    def active_writer(self) -> str:
        """The host whose writer holds the lock (the one that took over last)."""
        return max((h for h, w in self.writers.items() if w.running() and "took_over" in w.seen),
                   key=lambda h: self.writers[h].seen["took_over"])

    # --- load ---------------------------------------------------------------------

    def start_load(self, rate: int, seconds: float) -> float:
        """An acknowledged publisher on C (bench/bus_bench.py's child) at
        `rate` for `seconds`, and a live subscriber through the edge; the
        time the load started."""
        self.load_count = int(rate * seconds)
        self.producers_before = {row[0] for row in self.query(
            "SELECT DISTINCT producer_id FROM messages WHERE topic = 'bench.acked'")}
        env = self.env("c", "publisher")
        self.load = self.spawn("publisher", "c", [
            sys.executable, str(ROOT / "bench" / "bus_bench.py"), "_publish_acked",
            env["BUS_PUB_ENDPOINT"], env["BUS_SUB_ENDPOINT"], str(self.load_count), str(rate)],
            env, stdout=subprocess.PIPE)
        self.live = self.spawn("live subscriber", "c", [
            sys.executable, "-m", "tests.cluster", "live"], self.edge_env(),
            stdout=subprocess.PIPE)
        # The scenario's hit comes once the live subscriber receives: what it
        # missed after its first message is what the scenario cost it.
        self.live.wait_for("live_seq", 60)
        return time.monotonic()

    def finish_load(self, timeout: float = 180) -> dict[str, Any]:
        """Wait for every message to be acknowledged; what the publisher and
        the live subscriber saw, and what the database holds."""
        assert self.load is not None
        line = self.load.read_line(timeout)
        code = self.load.popen.wait(30)
        if code != 0 or not line:
            raise RuntimeError(f"publisher exited {code}: {''.join(self.load.lines[-10:])}")
        figures = json.loads(line)
        producers = [row for row in self.query(
            "SELECT producer_id, count(*), count(DISTINCT producer_seq) FROM messages "
            "WHERE topic = 'bench.acked' GROUP BY producer_id") if row[0] not in
            self.producers_before]
        if len(producers) != 1:
            raise RuntimeError(f"the load's producer: {producers}")
        producer, stored, distinct = producers[0]
        # What is acknowledged has passed the proxy: the edge has it too, or soon.
        self.wait(lambda: self.live_saw(self.load_count), 5, "the last message, live")
        self.live.popen.send_signal(signal.SIGTERM)
        live = json.loads(self.live.read_line(30) or "{}").get(producer)
        self.live.popen.wait(30)
        if not live:
            raise RuntimeError(f"the live subscriber saw nothing of {producer}: "
                               f"{''.join(self.live.lines[-10:])}")
        first = live["first_seq"]
        return {"ack_p99_ms": round(figures["p99_ms"], 1), "ack_max_ms": round(figures["max_ms"]),
                "lost": self.load_count - distinct, "twice": stored - distinct,
                # Seqs the live subscriber never saw, after the first it saw (its
                # subscription takes a moment to reach the main proxy).
                "live_missing": (self.load_count - first + 1) - live["distinct"],
                "live_first_seq": first, "live_longest_silence_s": live["longest_silence_s"]}

    def live_saw(self, seq: int) -> bool:
        """Whether the live subscriber said it saw `seq` (its stdout is read
        only at the end: it says how far it got on stderr, as a log line)."""
        return self.live.last.get("live_seq", {}).get("seq", 0) >= seq

    def catch_up(self, timeout: float = 120) -> dict[str, Any]:
        """A subscriber on C that catches up from the reader on B (the hot
        standby) through the edge, from the first message: every stored
        message once, each producer's in order and with no seq missing."""
        stored = self.query("SELECT count(*) FROM messages WHERE topic = 'bench.acked'")[0][0]
        proc = self.spawn("catching-up subscriber", "c", [
            sys.executable, "-m", "tests.cluster", "catchup", str(stored)],
            self.edge_env(), stdout=subprocess.PIPE)
        line = proc.read_line(timeout)
        proc.popen.wait(30)
        return json.loads(line) if line else {"error": "".join(proc.lines[-10:])}

    def commits_after_takeover(self, old: str, new: str, since: Any) -> tuple[int, int]:
        """Statements committed from the old writer's host, and from the new
        one's, after the new writer's first commit since `since` (the
        server's clock when the old one was cut off): split brain is the
        first above 0; the second shows the audit saw the new writer work."""
        return self.query(
            "WITH first AS (SELECT min(at) AS at FROM commit_audit WHERE client = %s AND at > %s)"
            " SELECT count(*) FILTER (WHERE client = %s), count(*) FILTER (WHERE client = %s)"
            " FROM commit_audit, first WHERE commit_audit.at >= first.at",
            (self.hosts.addr[new], since, self.hosts.addr[old], self.hosts.addr[new]))[0]

    # --- scenarios --------------------------------------------------------------

    def restart_writer(self, host: str) -> None:
        """What the writer's unit does after it exited: start it again, as a
        standby (Restart=on-failure: exit 75, a kill -9)."""
        old = self.writers[host]
        if old.running():
            raise RuntimeError(f"writer {host.upper()} is still running")
        self.writers[host] = self.bus_cli(f"writer {host.upper()}", host,
                                          ["writer", "--standby"], self.env(host))

    def kill_writer(self, rate: int, seconds: float, before_s: float = 2.0) -> dict[str, Any]:
        """kill -9 of the active writer under acknowledged load; its unit
        restarts it (a standby now)."""
        old = self.active_writer()
        new = next(h for h in self.writers if h != old)
        self.start_load(rate, seconds)
        time.sleep(before_s)  # a steady load first (the publisher paces itself)
        hit = time.monotonic()
        self.writers[old].popen.kill()
        self.writers[old].popen.wait(10)
        took_over = self.writers[new].wait_for("took_over", 60) - hit
        self.restart_writer(old)
        row = self.finish_load()
        return {"scenario": f"kill -9 of {old.upper()}'s writer at {rate:,} msg/s",
                "takeover_s": round(took_over, 2), "old_writer": "killed", **row}

    def cut(self, host: str, rate: int, cut_s: float, before_s: float = 2.0) -> dict[str, Any]:
        """Host `host`'s link down for `cut_s` under acknowledged load, then up.
        The writer that was active, if it is on `host`, finds its session
        gone and exits 75 (its unit then restarts it as a standby); the
        other writer takes over where it can reach the primary."""
        active = self.active_writer()
        other = next(h for h in self.writers if h != active)
        old_writer = self.writers[active]
        self.start_load(rate, before_s + cut_s + 2)
        time.sleep(before_s)
        cut_at = self.query("SELECT clock_timestamp()")[0][0]
        hit = time.monotonic()
        self.hosts.cut(host)
        standby = self.writers[other]
        took_over_before = standby.seen.get("took_over")
        takeover: float | None = None
        if active == host and "a" != host:  # the primary is on A: B's writer lost it
            takeover = standby.wait_for("took_over", cut_s + 60) - hit
        time.sleep(max(0.0, hit + cut_s - time.monotonic()))
        self.hosts.mend(host)
        old_exit: int | None = None
        if takeover is not None:
            old_exit = old_writer.popen.wait(60)
            self.restart_writer(active)
        row = self.finish_load()
        split, new_commits = self.commits_after_takeover(active, other, cut_at) \
            if takeover is not None else (0, 0)
        # No takeover: the active writer served throughout, and the standby
        # neither took the lock nor died (a standby that exited would not be
        # seen otherwise).
        kept = takeover is None and old_writer.running() and standby.running() and \
            standby.seen.get("took_over") == took_over_before
        return {"scenario": f"{host.upper()}'s link down {cut_s:.0f} s at {rate:,} msg/s",
                "takeover_s": None if takeover is None else round(takeover, 2),
                "old_writer": (f"exit {old_exit}, {split} commits after the takeover"
                               if takeover is not None else
                               "kept the lock" if kept else "lost the lock (see the logs)"),
                "kept_the_lock": kept,
                "commits_after_takeover": split, "new_writer_commits": new_commits,
                "old_exit": old_exit, **row}

    def restart_replica(self, rate: int, down_s: float, before_s: float = 2.0
                        ) -> dict[str, Any]:
        """B's hot standby stopped for `down_s` under load, then started again:
        what the reader said meanwhile, and whether it caught up."""
        self.start_load(rate, before_s + down_s + 2)
        time.sleep(before_s)
        self.replica.stop_server()
        down_at = time.monotonic()
        reader_env = self.env("b")
        health = self.wait(lambda: self.reader_unhealthy(reader_env), 30,
                           "the reader to say its database is away")
        time.sleep(max(0.0, down_at + down_s - time.monotonic()))
        self.replica.start_again()
        back = time.monotonic()
        self.wait(lambda: (self.stats(reader_env, "BUS_READ_ENDPOINT").get("replica") or {})
                  .get("receiver") == "streaming", 60, "the hot standby to stream again")
        row = self.finish_load()
        active = self.active_writer()
        kept = all(w.running() for w in self.writers.values())
        return {"scenario": f"B's hot standby stopped {down_s:.0f} s at {rate:,} msg/s",
                "takeover_s": None,
                "old_writer": f"{active.upper()}'s kept the lock" if kept else
                "a writer exited (see the logs)", "kept_the_lock": kept,
                "reader_said": health, "streaming_again_s": round(time.monotonic() - back, 2),
                **row}

    def reader_unhealthy(self, env: dict[str, str]) -> str | None:
        """Why the reader's /healthz answers 503, from its stats (None: it
        is healthy)."""
        from reader.health import reader_health
        return reader_health(self.stats(env, "BUS_READ_ENDPOINT"))

    def close(self) -> None:
        """Every process stopped (killed after 10 s), then both servers, each
        whatever the others did."""
        for proc in reversed(self.procs):
            if proc.running():
                proc.popen.send_signal(signal.SIGCONT)
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(10)
        for server in (self.replica, self.primary):
            if server is not None:
                try:
                    server.stop()
                except (OSError, subprocess.SubprocessError):
                    pass  # already down (a replica stopped by its scenario)


# --- children: subscribers on host C ----------------------------------------------

def child_live() -> None:
    """Live through the edge until SIGTERM: for each producer, the distinct
    seqs seen, the first, and the longest time between two messages once
    the first came."""
    from bus.client import Subscriber
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seen: dict[str, set[int]] = {}
    longest: dict[str, float] = {}
    last: dict[str, float] = {}
    told, highest = 0.0, 0
    with Subscriber(["bench."]) as sub:
        while not stop.is_set():
            msg = sub.receive(timeout=0.1)
            now = time.monotonic()
            if highest and now - told >= 0.2:  # how far it got, for finish_load
                print(json.dumps({"event": "live_seq", "seq": highest}), file=sys.stderr,
                      flush=True)
                told = now
            if msg is None:
                continue
            producer = msg.producer
            if producer in last:
                longest[producer] = max(longest.get(producer, 0.0), now - last[producer])
            last[producer] = now
            seen.setdefault(producer, set()).add(msg.seq)
            highest = max(highest, msg.seq)
    print(json.dumps({producer: {"distinct": len(seqs), "first_seq": min(seqs),
                                 "longest_silence_s": round(longest.get(producer, 0.0), 3)}
                      for producer, seqs in seen.items()}), flush=True)


def child_catchup(expected: int) -> None:
    """From the first stored message on, through the reader and the edge:
    how many, how many once, and how many of each producer's seqs are
    missing (not their order: what a publisher sent again after a takeover
    is stored after later seqs)."""
    from bus.client import Subscriber
    seqs: dict[str, list[int]] = {}
    received = 0
    deadline = time.monotonic() + 90
    with Subscriber(["bench."], after_id=0) as sub:
        while time.monotonic() < deadline:
            msg = sub.receive(timeout=1.0)
            if msg is not None:
                received += 1
                seqs.setdefault(msg.producer, []).append(msg.seq)
            elif received >= expected:  # and a quiet second after: no duplicate comes
                break
    gaps = sum(max(s) - len(set(s)) for s in seqs.values() if s)
    print(json.dumps({"received": received, "distinct": sum(len(set(s)) for s in seqs.values()),
                      "gaps": gaps, "seconds": round(time.monotonic() - deadline + 90, 1),
                      "per_producer": {p: [len(s), max(s)] for p, s in seqs.items()}}),
          flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "live":
        child_live()
    elif sys.argv[1] == "catchup":
        child_catchup(int(sys.argv[2]))
