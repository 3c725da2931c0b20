"""Fault tests (issue #3): real processes killed or stopped under steady load.
Nothing a publisher had acknowledged is lost, nothing is stored twice, clients
reconnect by themselves, and the database passes PRAGMA integrity_check."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bus.client import Publisher
from tests.conftest import BUS_CLI, Bus, Proc, ping, query, wait_for

CHAOS_PUBLISHER = str(Path(__file__).with_name("chaos_publisher.py"))


class SteadyPublisher:
    """A Publisher on its own thread, publishing `rate` messages/s until stopped,
    then waiting (re-sending as needed) until every message is acknowledged."""

    def __init__(self, bus: Bus, producer: str, topic: str, rate: float) -> None:
        self.bus, self.producer, self.topic, self.rate = bus, producer, topic, rate
        self.published = 0
        self.acked = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with Publisher(self.bus.config(), producer_id=self.producer,
                           resend_after=0.5) as pub:
                started = time.monotonic()
                while not self._stop.is_set():
                    delay = started + self.published / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pub.publish(self.topic, b"%d" % (self.published + 1))
                    self.published += 1
                pub.flush(timeout=60)
                self.acked = pub.acked_seq
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> int:
        self._stop.set()
        self._thread.join(90)
        assert not self._thread.is_alive(), "publisher did not finish"
        assert self.error is None, repr(self.error)
        assert self.acked == self.published
        return self.published


def seqs(bus: Bus, producer: str) -> list[int]:
    return [r[0] for r in query(bus.db, "SELECT producer_seq FROM messages WHERE producer_id = ?"
                                        " ORDER BY producer_seq", (producer,))]


def integrity(bus: Bus) -> str:
    return query(bus.db, "PRAGMA integrity_check")[0][0]


def json_lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.collect()]


def wait_until_tailing(bus: Bus, tail, probe_topic: str) -> None:
    """A tail's subscription reaches the proxy asynchronously: publish probes
    until it prints one."""
    with Publisher(bus.config(), producer_id=f"probe-{probe_topic}") as probe:
        def probe_printed() -> bool:
            probe.publish(probe_topic, b"")
            time.sleep(0.05)
            return any(m["topic"] == probe_topic for m in json_lines(tail))
        wait_for(probe_printed, message=f"{probe_topic} to reach the tail")


def test_kill_9_of_the_proxy_clients_reconnect_and_a_durable_consumer_misses_nothing(
        make_bus) -> None:
    bus = make_bus(BUS_SHUTDOWN_TIMEOUT_MS=2000).start()
    durable = bus.run("tail", "fault.", "--durable", "keeper", "--from-id", "1", "--json")
    live = bus.run("tail", "fault.", "--json")
    wait_until_tailing(bus, live, "fault.probe")
    pub = SteadyPublisher(bus, "through-crash", "fault.t", rate=1500)
    wait_for(lambda: bus.count("fault.") >= 1000, message="steady traffic stored")

    bus.proxy.send_signal(signal.SIGKILL)
    assert bus.proxy.wait() == -signal.SIGKILL
    time.sleep(0.5)  # publishing into the void: those messages must be re-sent
    bus.start_proxy()
    before = pub.published
    wait_for(lambda: bus.count("fault.") > before + 1000, message="traffic stored again")
    total = pub.finish()

    assert seqs(bus, "through-crash") == list(range(1, total + 1)), "each stored once"
    # The live subscriber reconnected by itself and receives what is sent now.
    wait_for(lambda: any(m["meta"]["seq"] == total for m in json_lines(live)),
             message="the last message to reach the live tail")
    # The durable consumer got every stored message, in order, exactly once.
    stored_ids = [r[0] for r in query(bus.db, "SELECT id FROM messages ORDER BY id")]
    wait_for(lambda: len(json_lines(durable)) >= len(stored_ids), timeout=30,
             message="the durable tail to catch up")
    assert [m["id"] for m in json_lines(durable)] == stored_ids
    durable.send_signal(signal.SIGTERM)
    assert durable.wait() == 0
    assert bus.stop() == (0, 0)
    assert integrity(bus) == "ok"


def test_writer_stopped_for_seconds_under_load_loses_nothing_acknowledged(make_bus) -> None:
    bus = make_bus().start()
    live = bus.run("tail", "pause.", "--json")
    wait_until_tailing(bus, live, "pause.probe")
    pub = SteadyPublisher(bus, "steady", "pause.t", rate=2000)
    wait_for(lambda: bus.count("pause.") >= 500, message="steady traffic stored")
    assert bus.writer.stop() == 0
    stopped_at = pub.published
    time.sleep(3)
    assert pub.published > stopped_at + 2000, "publishing went on while the writer was down"
    seen_while_down = len(json_lines(live))
    bus.start_writer()
    wait_for(lambda: bus.count("pause.") > pub.published - 100, timeout=30,
             message="the writer to catch up")
    total = pub.finish()
    assert seqs(bus, "steady") == list(range(1, total + 1))
    def live_seqs() -> set[int]:
        return {m["meta"]["seq"] for m in json_lines(live) if m["topic"] == "pause.t"}
    wait_for(lambda: len(live_seqs()) == total, message="live delivery of everything")
    assert seen_while_down > stopped_at, "live delivery went on while the writer was down"
    assert bus.stop() == (0, 0)
    assert integrity(bus) == "ok"


def test_sigterm_to_every_process_under_load_loses_nothing(make_bus) -> None:
    # Stopped together, the proxy outlives the writer and lingers on its capture
    # queue for the rest of its shutdown deadline: keep that short here.
    bus = make_bus(BUS_SHUTDOWN_TIMEOUT_MS=2000).start()
    pubs = [SteadyPublisher(bus, f"term-{i}", "term.t", rate=1500) for i in range(2)]
    wait_for(lambda: bus.count("term.") >= 1000, message="steady traffic stored")
    for proc in (bus.proxy, bus.writer, bus.reader):  # all at once, as at a host shutdown
        proc.send_signal(signal.SIGTERM)
    assert [p.wait() for p in (bus.proxy, bus.writer, bus.reader)] == [0, 0, 0]
    assert integrity(bus) == "ok"
    bus.start()
    totals = [p.finish() for p in pubs]
    for p, total in zip(pubs, totals):
        assert seqs(bus, p.producer) == list(range(1, total + 1))
    stats = bus.writer_stats()["producers"]
    assert stats["with_missing"] == 0, stats
    assert bus.stop() == (0, 0)
    assert integrity(bus) == "ok"


def test_kill_9_loop_loses_no_acknowledged_message(make_bus) -> None:
    """30 kills -9 at random of the writer, the proxy, the reader and the
    publisher itself, each restarted at once as systemd would, under acknowledged
    load: every acknowledged message is stored exactly once, nothing is stored
    twice, and the database is intact after each restart."""
    bus = make_bus(BUS_SHUTDOWN_TIMEOUT_MS=2000).start()
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    publishers: list[Proc] = []

    def start_publisher() -> Proc:
        publishers.append(bus.spawn([sys.executable, CHAOS_PUBLISHER, str(len(publishers) + 1)]))
        return publishers[-1]

    def acked_lines() -> list[tuple[int, int]]:
        return [(int(inc), int(n)) for proc in publishers for line in proc.stdout.collect()
                if line.startswith("acked ") for inc, n in [line.split()[1:]]]

    def wait_progress() -> None:
        """Until the running publisher has had a window acknowledged since now."""
        before = len(acked_lines())
        wait_for(lambda: len(acked_lines()) > before, timeout=30,
                 message=f"acknowledged progress (seed {seed})")

    start_publisher()
    kills: Counter[str] = Counter()
    for _ in range(30):
        wait_progress()
        role = rng.choice(("writer", "proxy", "reader", "publisher"))
        kills[role] += 1
        if role == "publisher":
            publishers[-1].kill()
            start_publisher()
        else:
            getattr(bus, role).kill()
            getattr(bus, f"start_{role}")()
        assert integrity(bus) == "ok", f"after a kill -9 of the {role} (seed {seed})"
    wait_progress()
    publishers[-1].kill()
    assert bus.stop() == (0, 0)
    errors = [line for proc in publishers for line in proc.stdout.collect()
              if line.startswith("error")]
    assert not errors, errors

    acked: dict[int, int] = {}
    for inc, n in acked_lines():
        acked[inc] = max(acked.get(inc, 0), n)
    rows = query(bus.db, "SELECT payload, producer_seq FROM messages WHERE producer_id = 'chaos'")
    payloads = Counter(payload for payload, _ in rows)
    assert max(payloads.values()) == 1, "a message stored twice"
    assert len({seq for _, seq in rows}) == len(rows), "a (producer, seq) stored twice"
    stored: dict[int, set[int]] = {}
    for payload in payloads:
        inc, n = map(int, payload.split(b"-"))
        stored.setdefault(inc, set()).add(n)
    lost_acked = sum(1 for inc, upto in acked.items() for n in range(1, upto + 1)
                     if n not in stored.get(inc, ()))
    unacked_lost = sum(len(set(range(1, max(ns) + 1)) - ns) for ns in stored.values())
    print(f"\nkill -9 loop (seed {seed}): kills {dict(kills)}, {len(publishers)} publisher "
          f"incarnations, {sum(acked.values())} messages acknowledged, {len(rows)} stored, "
          f"0 stored twice, {lost_acked} acknowledged lost, {unacked_lost} unacknowledged lost")
    assert lost_acked == 0
    assert query(bus.db, "PRAGMA integrity_check") == [("ok",)]


def test_a_process_whose_log_reader_is_gone_still_stops_cleanly(make_bus) -> None:
    """Found by the fuzz harness: when the process reading a role's stderr went
    away (a killed parent, a closed terminal), the BrokenPipeError of the
    "stopping" log line escaped the stop path before the sockets were closed,
    and the process hung in zmq_ctx_term for good, deaf to SIGTERM. Losing the
    log must not cost the shutdown."""
    bus = make_bus()
    procs = {}
    for role, endpoint in (("writer", "BUS_CONTROL_ENDPOINT"), ("proxy", "BUS_PROXY_CONTROL_ENDPOINT"),
                           ("reader", "BUS_READ_ENDPOINT")):
        procs[role] = subprocess.Popen([BUS_CLI, role], env=bus.env, cwd=bus.tmp_path,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE)
        wait_for(lambda: ping(bus[endpoint]), message=f"{role} ping")
    try:
        for role in ("proxy", "writer", "reader"):
            procs[role].stderr.close()  # the reader of its log is gone
            procs[role].send_signal(signal.SIGTERM)
            assert procs[role].wait(timeout=20) == 0, role
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
