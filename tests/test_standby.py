"""Past one machine (issue 27): a standby writer that takes over, and a writer
that exits once its database session is lost, on a private PostgreSQL server
with real processes. On one host both writers have the same endpoints: the
standby binds them only once it holds the writer's lock (what a floating
address does across hosts; tests/test_cluster.py runs them on three)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bus.client import Publisher
from tests.conftest import BUS_CLI, Bus, Proc, execute, free_port, query, wait_for

pytestmark = pytest.mark.parametrize("db_engine", ["postgresql"], indirect=True)

# The writer's exit once its session is lost: EX_TEMPFAIL (bus/runner.py CannotGoOn).
SESSION_LOST_EXIT = 75


WRITER_ENDPOINTS = ("BUS_CAPTURE_ENDPOINT", "BUS_CONTROL_ENDPOINT", "BUS_NOTIFY_ENDPOINT")


def pair_endpoints() -> tuple[dict[str, str], dict[str, str]]:
    """The writer endpoints of two writers on one host, as two hosts have
    them: each lists its own first (it binds that one), the other's after;
    the proxy and the clients, given the first writer's settings, connect
    to both."""
    ports = {name: (free_port(), free_port()) for name in WRITER_ENDPOINTS}
    first = {name: f"tcp://127.0.0.1:{a},tcp://127.0.0.1:{b}" for name, (a, b) in ports.items()}
    second = {name: f"tcp://127.0.0.1:{b},tcp://127.0.0.1:{a}" for name, (a, b) in ports.items()}
    return first, second


def events(proc: Proc, name: str) -> list[dict[str, Any]]:
    return [e for e in proc.log_events() if e["event"] == name]


def standby(bus: Bus, env: dict[str, str] | None = None) -> Proc:
    """A standby writer of `bus` (`env` over its settings), once it says who
    holds the lock."""
    proc = bus.spawn([BUS_CLI, "writer", "--standby"], env=env)
    wait_for(lambda: events(proc, "standby_waiting") or proc.popen.poll() is not None,
             message="the standby to wait for the lock")
    assert proc.popen.poll() is None, proc.stderr.collect()[-5:]
    return proc


def writer_sessions(db: str) -> list[tuple[int]]:
    return query(db, "SELECT pid FROM pg_stat_activity WHERE application_name = 'bus-writer'"
                     " AND datname = current_database()")


class AckedLoad:
    """A Publisher sending `rate` messages a second on its own thread until
    stopped (the only thread that uses it), then waiting for every one to be
    acknowledged; `acked`: the highest seq acknowledged so far."""

    def __init__(self, bus: Bus, producer: str, rate: float) -> None:
        self.pub = Publisher(bus.config(), producer_id=producer, connect_timeout=10)
        self.rate = rate
        self.sent = 0
        self.acked = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while not self.stopping.is_set() and self.sent < 100_000:
            self.pub.publish("standby.t", b"%d" % self.sent)
            self.sent += 1
            self.acked = self.pub.read_acks(0)
            time.sleep(max(0.0, started + self.sent / self.rate - time.monotonic()))

    def finish(self, timeout: float = 60) -> int:
        self.stopping.set()
        self.thread.join(10)
        self.pub.flush(timeout=timeout)  # every message acknowledged, or BusTimeout
        self.pub.close()
        return self.sent


def taken_over(load: AckedLoad, waiting: Proc, hit: Callable[[], None]
               ) -> tuple[dict[str, Any], float]:
    """Once `load` has 200 acknowledged, `hit()` the active writer; the
    standby's took_over line and the seconds from the hit to it, once 200
    more are acknowledged, by the new writer."""
    wait_for(lambda: load.acked >= 200 or None, message="acknowledged load")
    hit()
    hit_at = time.monotonic()
    [took_over] = wait_for(lambda: events(waiting, "took_over"),
                           message="the standby to take over")
    taken = time.monotonic() - hit_at
    acked_then = load.acked
    wait_for(lambda: load.acked > acked_then + 200 or None,
             message="acknowledgements from the new writer")
    return took_over, taken


def stored_once(db: str, producer: str, sent: int) -> None:
    """Every seq 1..sent is stored, and once."""
    seqs = [seq for (seq,) in query(db, "SELECT producer_seq FROM messages WHERE producer_id ="
                                        f" '{producer}' ORDER BY producer_seq")]
    missing = sorted(set(range(1, sent + 1)) - set(seqs))
    ledger = query(db, "SELECT contiguous_seq, max_seq, gaps, abandoned, duplicates, refused"
                       f" FROM producers WHERE producer_id = '{producer}'")
    assert (len(seqs), len(set(seqs)), missing) == (sent, sent, []), (missing[:20], ledger)


def test_a_standby_binds_nothing_and_takes_over_after_a_kill_9(make_bus) -> None:
    """The standby waits for the lock (binding nothing: the active writer's
    ports stay its own); kill -9 of the active writer frees the lock at once
    (the server sees the connection close), and the standby serves: every
    message acknowledged before, during and after is stored once."""
    bus: Bus = make_bus(BUS_STANDBY_RETRY_MS=100).start()
    waiting = standby(bus)
    holder = events(waiting, "standby_waiting")[0]["holder"]
    [(active_pid,)] = writer_sessions(bus.db)
    assert f"pid {active_pid}" in holder, holder
    load = AckedLoad(bus, "kill9", rate=500)
    took_over, taken = taken_over(load, waiting, bus.writer.popen.kill)
    sent = load.finish()
    stored_once(bus.db, "kill9", sent)
    assert took_over["tries"] >= 2 and taken < 10, (took_over, taken)
    bus.writer = waiting
    assert bus.stop() == (0, 0)


def test_a_writer_whose_session_ends_exits_and_never_writes_on_another(make_bus) -> None:
    """The server ends the writer's session (a failover, an admin): the lock
    went with it. The writer opened another session and took the lock again
    before; now it exits (75, for its unit to restart it) without a word
    more to the database, the standby takes over, and nothing acknowledged
    is lost or stored twice."""
    bus: Bus = make_bus(BUS_STANDBY_RETRY_MS=100).start()
    waiting = standby(bus)
    load = AckedLoad(bus, "ended", rate=500)
    wait_for(lambda: load.acked >= 200 or None, message="acknowledged load")
    [(active_pid,)] = writer_sessions(bus.db)
    execute(bus.db, f"SELECT pg_terminate_backend({active_pid})")
    assert bus.writer.wait(15) == SESSION_LOST_EXIT
    [lost] = events(bus.writer, "database_session_lost")
    assert "its lock went with it" in lost["error"]
    wait_for(lambda: events(waiting, "took_over"), message="the standby to take over")
    sent = load.finish()
    stored_once(bus.db, "ended", sent)
    [(new_pid,)] = writer_sessions(bus.db)
    assert new_pid != active_pid
    assert not events(bus.writer, "database_closed"), "nothing more said to the database"
    bus.writer = waiting
    assert bus.stop() == (0, 0)


def test_a_standby_waits_while_the_server_refuses_and_says_why(make_bus, pg_server) -> None:
    """A standby started while the database refuses connections keeps
    trying (its status and `stats` say why), and takes over once it can."""
    bus: Bus = make_bus(BUS_STANDBY_RETRY_MS=100)
    database = bus.db.rpartition("/")[2]
    admin = pg_server.url()
    execute(admin, f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
    try:
        proc = bus.run("writer", "--standby")
        [refused] = wait_for(lambda: events(proc, "standby_cannot_reach_database"),
                             message="the standby to say it cannot reach the database")
        assert "cannot connect" in refused["error"] and proc.popen.poll() is None
    finally:
        execute(admin, f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
    wait_for(lambda: events(proc, "took_over"), message="the standby to take over")
    bus.writer = proc
    bus.start_proxy()
    with Publisher(bus.config(), producer_id="later", connect_timeout=10) as pub:
        pub.publish("later.t", b"x", wait=True, timeout=10)
    assert bus.stop() == (0, 0)


def test_a_standby_stops_cleanly_while_it_waits(make_bus) -> None:
    bus: Bus = make_bus().start()
    waiting = standby(bus)
    for sig in (signal.SIGTERM,):
        assert waiting.stop(sig, timeout=10) == 0
    assert len(writer_sessions(bus.db)) == 1
    assert bus.stop() == (0, 0)


def test_a_frozen_writer_loses_its_lock_and_never_commits_after_the_takeover(make_bus) -> None:
    """Two writers with endpoints of their own, as on two hosts: the proxy
    and the publisher connect to both. The active writer is frozen (SIGSTOP:
    its host's kernel still answers TCP, as across a network partition
    nothing answers at all); within BUS_PG_SESSION_TIMEOUT_S the server ends
    its session (idle_session_timeout) and the standby takes over. Thawed,
    the old writer finds its session ended and exits (75) before committing
    anything: the messages it had taken in, and those queued for it, are
    sent again by their publisher and stored once, by the new writer."""
    first, second = pair_endpoints()
    bus: Bus = make_bus(BUS_STANDBY_RETRY_MS=100, BUS_PG_SESSION_TIMEOUT_S=2, **first).start()
    waiting = standby(bus, second)
    load = AckedLoad(bus, "frozen", rate=500)
    old = bus.writer
    try:
        _took_over, taken = taken_over(load, waiting, lambda: old.send_signal(signal.SIGSTOP))
    finally:
        old.send_signal(signal.SIGCONT)
    assert old.wait(15) == SESSION_LOST_EXIT
    assert events(old, "database_session_lost")
    sent = load.finish()
    stored_once(bus.db, "frozen", sent)
    assert 1.5 < taken < 10, taken  # the session's timeout (2 s), not at once
    # The proxy dropped its connection to the frozen writer once the new one
    # completed its handshake: nothing more was sent to be lost there.
    assert bus.proxy_stats()["capture"]["superseded"] >= 1
    bus.writer = waiting
    assert bus.stop() == (0, 0)


def test_a_writer_given_several_endpoints_takes_the_lock_before_it_binds(make_bus) -> None:
    """Review of issue 27: a writer started without --standby where another
    holds the lock bound its endpoints first; the proxy, taking it for the
    newer writer, dropped its connection to the one that serves. With a list
    it takes the lock first: refused, it binds nothing, and the proxy stays
    with the writer it has."""
    first, second = pair_endpoints()
    bus: Bus = make_bus(**first).start()
    # Its own capture port is taken: a writer that binds first says so, one
    # that takes the lock first is refused the lock before it tries.
    port = int(second["BUS_CAPTURE_ENDPOINT"].split(",")[0].rpartition(":")[2])
    with socket.create_server(("127.0.0.1", port)):
        intruder = bus.spawn([BUS_CLI, "writer"], env=second)
        assert intruder.wait(30) == 1
    [refused] = [e for e in intruder.log_events() if e["level"] == "error"]
    assert "open in another bus writer" in refused["error"], refused
    assert not [e for e in intruder.log_events() if e["event"] == "started"]
    with Publisher(bus.config(), producer_id="stays", connect_timeout=10) as pub:
        pub.publish("stays.t", b"x", wait=True, timeout=10)
    assert bus.proxy_stats()["capture"]["superseded"] == 0
    assert bus.stop() == (0, 0)



def test_a_standby_tells_systemd_it_is_ready_and_who_holds_the_lock(make_bus, tmp_path) -> None:
    """Waiting is a standby's job: READY=1 at once (its unit is active, not
    stuck starting), and a STATUS= line (`systemctl status`) that names the
    session holding the lock."""
    bus: Bus = make_bus().start()
    [(active_pid,)] = writer_sessions(bus.db)
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(0.5)
        waiting = standby(bus, {"NOTIFY_SOCKET": path})
        said: list[str] = []

        def status_names_the_holder() -> bool:
            try:
                said.extend(notify.recv(4096).decode().splitlines())
            except TimeoutError:
                pass
            return any(line.startswith("STATUS=standby") and f"pid {active_pid}" in line
                       for line in said)
        wait_for(status_names_the_holder, message="a STATUS= naming the lock's holder")
    assert "READY=1" in said
    assert waiting.stop() == 0
    assert bus.stop() == (0, 0)
