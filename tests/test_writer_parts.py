"""The writer's parts stepped in this process, without a writer process: each
built on inproc sockets and a temporary SQLite database, and driven with an
explicit `now` (as huey's consumer loop is in its tests). The process tests
(tests/test_writer.py and the others) stay: these show each part's own job.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from bus import protocol, sockets
from bus.config import BusConfig, load_config
from storage import messages, open_store
from tests.conftest import HOLD_ROWS
from writer.commits import FLUSH_RETRY_SECONDS, GROUP_COMMIT_PACE, Commits
from writer.ingest import Ingest
from writer.metrics import HTTP_SERIES, batch_page, load_page, writer_health
from writer.notifications import Notifications
from writer.producers import ProducerLedger
from writer.retention import RETENTION_IDLE_SECONDS, Retention
from writer.service import Writer
from writer.upkeep import UTXO_UPKEEP_SECONDS, UtxoUpkeep

# A receive that takes longer than this fails the test (pyzmq's test helpers' way).
RECEIVE_TIMEOUT_MS = 5000
TOPIC = b"parts.test"


def config_of(tmp_path: Path, **settings: Any) -> BusConfig:
    """A config of inproc endpoints and a SQLite file in `tmp_path`;
    `settings`: more environment variables."""
    env = {"BUS_DB": str(tmp_path / "bus.db"), "BUS_CAPTURE_ENDPOINT": "inproc://capture",
           "BUS_CONTROL_ENDPOINT": "inproc://control", "BUS_NOTIFY_ENDPOINT": "inproc://notify",
           "BUS_LOG_LEVEL": "warning", "BUS_CONFIG": str(tmp_path / "none.toml"),
           **{name: str(value) for name, value in settings.items()}}
    (tmp_path / "none.toml").write_text("")
    return load_config(env=env)


@dataclass
class Parts:
    """The writer's ingest, commits and notifications over one database, with
    a publisher's end of the capture (`push`) and a subscriber at the notify
    endpoint (`sub`)."""
    config: BusConfig
    store: Any
    producers: ProducerLedger
    notifications: Notifications
    commits: Commits
    ingest: Ingest
    push: zmq.Socket
    sub: zmq.Socket
    dropped: list[int]

    def open_session(self, producer: str, now: float) -> protocol.MetaEncoder:
        """A committed session of `producer`: its meta encoder, signing with its key."""
        key = os.urandom(32)
        state = self.producers.open(producer, time.time_ns(), key)
        assert self.commits.flush("request", now)
        self.notifications.send()
        return protocol.MetaEncoder(producer, state.epoch, protocol.SessionMac(key))

    def send(self, meta: protocol.MetaEncoder, seq: int, payload: bytes = b"x") -> None:
        self.push.send_multipart([TOPIC, payload, meta.encode(seq, topic=TOPIC,
                                                              payload=payload)])

    def wait_readable(self) -> None:
        """Until the capture has input (inproc delivers at once, but on
        libzmq's schedule): bounded."""
        assert self.ingest.capture.poll(RECEIVE_TIMEOUT_MS), "nothing arrived at the capture"

    def notification(self) -> tuple[bytes, dict[str, Any], bytes]:
        """The next notification at the subscriber: topic, fields, payload."""
        assert self.sub.poll(RECEIVE_TIMEOUT_MS), "no notification"
        topic, payload = self.sub.recv_multipart()
        return topic, msgpack.unpackb(payload), payload


@pytest.fixture
def build(tmp_path: Path) -> Iterator[Any]:
    """build(**settings) -> Parts; everything closed (linger 0) at the end."""
    ctx = zmq.Context()
    opened: list[Any] = []

    def make(wrap: Any = None, **settings: Any) -> Parts:
        """wrap(store): the store the commits are given (a double around it)."""
        cfg = config_of(tmp_path, **settings)
        store = open_store(cfg.db, cfg.sqlite_synchronous, cfg.sqlite_busy_timeout_ms)
        capture = sockets.open_writer_capture(ctx, cfg)
        notify = sockets.open_writer_notify(ctx, cfg)
        push = ctx.socket(zmq.PUSH)
        push.connect(cfg.capture_endpoint)
        sub = ctx.socket(zmq.SUB)
        sub.connect(cfg.notify_endpoint)
        opened.extend([store, capture, notify, push, sub])
        producers = ProducerLedger(store.load_producer)
        dropped: list[int] = []
        notifications = Notifications(notify, producers, lambda: dropped.append(1))
        wrapped = store if wrap is None else wrap(store)
        commits = Commits(cfg, wrapped, producers, notifications)
        opened.extend([wrapped, commits] if wrap is not None else [commits])
        ingest = Ingest(cfg, capture, commits, producers, notifications)
        return Parts(cfg, store, producers, notifications, commits, ingest, push, sub, dropped)

    yield make
    for thing in reversed(opened):
        if isinstance(thing, zmq.Socket):
            thing.close(linger=0)
        else:
            thing.close()
    ctx.term()


def subscribe(parts: Parts, prefix: bytes) -> None:
    """Subscribe `parts.sub` and take the subscription in at the notify
    endpoint (its XPUB passes it on), as the writer's loop does."""
    parts.sub.subscribe(prefix)
    assert parts.notifications.sock.poll(RECEIVE_TIMEOUT_MS), "the subscription did not arrive"
    parts.notifications.read_subscriptions()


def stored(parts: Parts) -> list[tuple[bytes, int | None]]:
    """(payload, seq) of each stored message, oldest first."""
    conn = parts.store.conn
    rows, _ = messages.page(conn, 0, messages.last_id(conn) or 0, [], 10_000, 1 << 30)
    return [(row[2], row[3] and msgpack.unpackb(row[3])[protocol.META_SEQ]) for row in rows]


# --- ingest -----------------------------------------------------------------

def test_ingest_validates_frames_and_hands_a_batch_on(build) -> None:
    """Frames read from the capture become buffered rows; a bad message is
    counted by reason, not buffered; the batch is committed once due by size."""
    parts = build(BATCH_SIZE=3, BATCH_FLUSH_INTERVAL_MS=60_000)
    meta = parts.open_session("p1", 0.0)
    parts.send(meta, 1)
    parts.push.send_multipart([b"$reserved", b"x"])  # the proxy lets none in
    parts.send(meta, 2)
    parts.wait_readable()
    parts.ingest.drain(1.0)
    while len(parts.commits.buffer) < 2:  # the 3 messages may come in two reads
        parts.wait_readable()
        parts.ingest.drain(1.0)
    assert parts.ingest.messages_received == 2
    assert parts.ingest.rejected == {protocol.RESERVED_TOPIC: 1}
    assert [row[4] for row in parts.commits.buffer.messages] == [1, 2]
    parts.commits.step(1.0, idle=False)  # 2 of 3 rows, not idle: nothing due
    assert stored(parts) == []
    parts.send(meta, 3)
    parts.wait_readable()
    parts.ingest.drain(1.5)
    parts.commits.step(1.5, idle=False)
    assert [seq for _, seq in stored(parts)] == [1, 2, 3]
    assert parts.commits.metrics.flush_by["size"] == 1
    assert not parts.commits.buffer


def test_ingest_counts_a_forged_message_and_stores_none(build) -> None:
    """A message in a session's name without its session key's mac: counted,
    not buffered, not nacked."""
    parts = build()
    parts.open_session("p1", 0.0)
    forger = protocol.MetaEncoder("p1", 1, protocol.SessionMac(os.urandom(32)))
    parts.ingest.message([TOPIC, b"x", forger.encode(1, topic=TOPIC, payload=b"x")], 1.0)
    assert parts.ingest.forged == 1
    assert not parts.commits.buffer and not parts.notifications.owed_nacks


def test_sequential_mode_commits_each_message_on_its_own(build) -> None:
    """BATCH_WRITE_ENABLED=false, decided in Commits alone: one read of three
    messages, three transactions, none counted as batched."""
    parts = build(BATCH_WRITE_ENABLED="false", BATCH_SIZE=100)
    assert parts.commits.sequential and parts.commits.buffer.batch_size == 1
    meta = parts.open_session("p1", 0.0)
    for seq in (1, 2, 3):
        parts.send(meta, seq)
    read = 0
    while read < 3:
        parts.wait_readable()
        parts.ingest.drain(1.0)
        read = parts.ingest.messages_received
    assert [seq for _, seq in stored(parts)] == [1, 2, 3]
    assert parts.commits.metrics.flush_by["size"] == 3
    assert parts.commits.metrics.total_batched_items == 0
    assert batch_page({"batch": parts.commits.snapshot()})["batch_enabled"] is False


def test_batch_write_enabled_is_read_in_one_place() -> None:
    """Commits.sequential is the writer's one decision of BATCH_WRITE_ENABLED;
    every other part asks it (issue 24: it was decided in three places)."""
    package = Path(__file__).resolve().parent.parent / "writer"
    reads = {path.name: path.read_text().count("batch_write_enabled")
             for path in package.glob("*.py")}
    assert {name: count for name, count in reads.items() if count} == {"commits.py": 1}


# --- commits ----------------------------------------------------------------

def test_commits_are_due_by_time_and_at_low_load_when_idle(build) -> None:
    parts = build(BATCH_SIZE=100, BATCH_FLUSH_INTERVAL_MS=500, **HOLD_ROWS)
    meta = parts.open_session("p1", 0.0)
    parts.ingest.message([TOPIC, b"x", meta.encode(1, topic=TOPIC, payload=b"x")], 10.0)
    assert parts.commits.poll_timeout_ms(10.0) == (501, False)
    parts.commits.step(10.4, idle=True)  # a threshold of 0: never low load
    assert stored(parts) == []
    parts.commits.step(10.5, idle=False)
    assert len(stored(parts)) == 1 and parts.commits.metrics.flush_by["time"] == 1


def test_a_drained_capture_is_committed_at_once_then_paced_by_the_commit_cost(build) -> None:
    """Group commit: an idle (drained) capture is committed without waiting for
    size or time; the next drained commit waits GROUP_COMMIT_PACE times what the
    last one cost, and the loop's poll wakes for it."""
    parts = build(BATCH_SIZE=100, BATCH_FLUSH_INTERVAL_MS=500, BATCH_LOW_LOAD_THRESHOLD=0)
    meta = parts.open_session("p1", 0.0)
    parts.ingest.message([TOPIC, b"x", meta.encode(1, topic=TOPIC, payload=b"x")], 10.0)
    parts.commits.step(10.0, idle=False)  # the read stopped at its room: not drained
    assert stored(parts) == []
    parts.commits.step(10.0, idle=True)
    assert len(stored(parts)) == 1 and parts.commits.metrics.flush_by["drained"] == 1
    cost = parts.commits.metrics.last_flush_ms / 1000
    paced = parts.commits.group_commit_at
    # The pace counts every part of the flush; last_flush_ms its commit alone
    # (a little less: by up to 130 us on a loaded machine).
    assert 10.0 + cost * (1 + GROUP_COMMIT_PACE) - 1e-6 <= paced <= \
        10.0 + (cost + 0.01) * (1 + GROUP_COMMIT_PACE)
    parts.ingest.message([TOPIC, b"y", meta.encode(2, topic=TOPIC, payload=b"y")], 10.0)
    assert parts.commits.poll_timeout_ms(10.0) == (int((paced - 10.0) * 1000) + 1, False)
    parts.commits.step((10.0 + paced) / 2, idle=True)  # too soon after the last
    assert len(stored(parts)) == 1
    parts.commits.step(paced, idle=True)
    assert len(stored(parts)) == 2 and parts.commits.metrics.flush_by["drained"] == 2


class _SlowSmallStore:
    """A store whose transactions each take `commit_s` and hold one message (a
    small disk's transaction_bytes): a buffer is committed in parts."""

    transaction_bytes = 1

    def __init__(self, store: Any, commit_s: float) -> None:
        self._store, self._commit_s = store, commit_s

    def write_batch(self, *args: Any) -> Any:
        time.sleep(self._commit_s)  # the commit's cost, not a wait for anything
        return self._store.write_batch(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_commit_in_parts_is_paced_by_all_of_its_parts(build) -> None:
    """Review of issue 26: the pace was taken from the last part alone, so a
    buffer committed in k parts (a small or full disk) was paced k times too
    little: with 4 parts, the next drained commit was due before this one had
    even ended, the unpaced commit at every dry read that collapsed 50,000
    msg/s to 9,000."""
    parts = build(BATCH_SIZE=100, BATCH_FLUSH_INTERVAL_MS=500, BATCH_LOW_LOAD_THRESHOLD=0)
    meta = parts.open_session("p1", 0.0)
    for seq in range(1, 5):
        parts.ingest.message([TOPIC, b"x", meta.encode(seq, topic=TOPIC, payload=b"x")], 10.0)
    parts.commits.store = _SlowSmallStore(parts.store, commit_s=0.02)
    started = time.perf_counter()
    parts.commits.step(10.0, idle=True)
    took = time.perf_counter() - started
    assert len(stored(parts)) == 4 and parts.commits.metrics.flush_by["drained"] == 4
    assert parts.commits.group_commit_at >= 10.0 + took * (1 + GROUP_COMMIT_PACE) - 0.005


def test_a_failed_commit_keeps_its_rows_and_is_retried_after_the_pause(build) -> None:
    parts = build(BATCH_SIZE=1)
    meta = parts.open_session("p1", 0.0)
    real_write = parts.store.write_batch
    failures = [parts.store.transient_errors[0]("database is locked")]

    def write_batch(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return real_write(*args)

    parts.store.write_batch = write_batch
    parts.ingest.message([TOPIC, b"x", meta.encode(1, topic=TOPIC, payload=b"x")], 5.0)
    parts.commits.step(5.0, idle=False)
    assert len(parts.commits.buffer) == 1 and parts.commits.metrics.flush_errors == 1
    assert parts.commits.backlog(5.2)["failing_for_s"] == 0.2
    assert writer_health({"backlog": parts.commits.backlog(5.2)}) is not None
    parts.commits.step(5.0 + FLUSH_RETRY_SECONDS / 2, idle=False)  # not yet: no retry
    assert stored(parts) == []
    parts.commits.step(5.0 + FLUSH_RETRY_SECONDS, idle=False)
    assert len(stored(parts)) == 1 and parts.commits.failing_since is None


class _HeldStore:
    """A store whose commits run beside the loop (as PostgreSQL's can,
    storage/postgres.PgStore.start_batch), each held until `release` and
    failing with a transient error if `fail` says so."""

    overlaps_commits = True

    def __init__(self, store: Any) -> None:
        self._store = store
        self._pool = ThreadPoolExecutor(1)
        self._gates: list[threading.Event] = []
        self.fail: list[bool] = []  # one entry a commit, popped in turn

    def start_batch(self, *args: Any) -> Future[Any]:
        gate = threading.Event()
        self._gates.append(gate)
        fails = self.fail.pop(0) if self.fail else False

        def commit() -> Any:
            assert gate.wait(RECEIVE_TIMEOUT_MS / 1000), "the commit was never released"
            if fails:
                raise self._store.transient_errors[0]("database is locked")
            return self._store.write_batch(*args)
        return self._pool.submit(commit)

    def release(self) -> None:
        self._gates.pop(0).set()

    def close(self) -> None:  # the store itself is closed by `build`
        self._pool.shutdown()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def landed(parts: Parts) -> None:
    """Until the commit in flight has ended (its wakeup is readable): bounded."""
    poller = zmq.Poller()
    poller.register(parts.commits.wakeup_fd, zmq.POLLIN)
    assert poller.poll(RECEIVE_TIMEOUT_MS), "the commit did not end"


def test_an_overlapped_commit_acknowledges_only_what_it_carried_once_landed(build) -> None:
    """BUS_PG_OVERLAP_COMMITS: a batch commits while the loop reads on. Until
    it has landed, nothing of it is acknowledged, its producer counts as
    uncommitted (a new acknowledgement subscription is not answered from
    it), and once the next batch is complete the capture is left unread. The
    acknowledgement is the state the batch carried, not the newer one; a
    failed commit puts its rows back before the newer ones, its producer
    dirty again, and the retry commits all of them in order."""
    parts = build(wrap=_HeldStore, BATCH_SIZE=2, BATCH_LOW_LOAD_THRESHOLD=0,
                  BUS_PG_OVERLAP_COMMITS="true")
    commits, held = parts.commits, parts.commits.store
    assert commits.overlapped
    meta = parts.open_session("p1", 0.0)
    for seq in (1, 2):
        parts.ingest.message([TOPIC, b"%d" % seq, meta.encode(seq, topic=TOPIC,
                                                              payload=b"%d" % seq)], 1.0)
    commits.step(1.0, idle=True)  # by size: handed to the committer, held there
    assert commits.in_flight is not None and len(commits.buffer) == 0
    assert not parts.notifications.owed_acks and parts.producers.is_dirty("p1")
    assert not commits.holding_capture
    for seq in (3, 4):  # the next batch, complete: the capture is left unread
        parts.ingest.message([TOPIC, b"%d" % seq, meta.encode(seq, topic=TOPIC,
                                                              payload=b"%d" % seq)], 1.1)
    assert commits.holding_capture
    commits.step(1.1, idle=True)  # still in flight: nothing more starts
    assert not parts.notifications.owed_acks and stored(parts) == []
    held.fail = [True]  # the next commit (of 3 and 4) will fail
    held.release()
    landed(parts)
    commits.step(1.2, idle=True)  # lands 1-2, starts 3-4
    (_, ack), = parts.notifications.owed_acks.values()
    assert ack["contiguous_seq"] == 2  # what the batch carried, though 4 is accepted
    assert [seq for _, seq in stored(parts)] == [1, 2]
    assert parts.producers.is_dirty("p1") and commits.in_flight is not None
    parts.notifications.send()
    parts.ingest.message([TOPIC, b"5", meta.encode(5, topic=TOPIC, payload=b"5")], 1.3)
    held.release()
    landed(parts)
    commits.step(1.3, idle=True)  # the failed commit lands: rows back, retried later
    assert commits.metrics.flush_errors == 1 and commits.in_flight is None
    assert [row[4] for row in commits.buffer.messages] == [3, 4, 5]
    assert not parts.notifications.owed_acks and parts.producers.is_dirty("p1")
    commits.step(1.3 + FLUSH_RETRY_SECONDS, idle=True)
    held.release()
    landed(parts)
    commits.step(1.4 + FLUSH_RETRY_SECONDS, idle=True)
    assert [seq for _, seq in stored(parts)] == [1, 2, 3, 4, 5]
    (_, ack), = parts.notifications.owed_acks.values()
    assert ack["contiguous_seq"] == 5 and not parts.producers.is_dirty("p1")
    assert commits.buffer.held_rows == 0 and not commits.holding_capture


# --- notifications ----------------------------------------------------------

def test_a_commit_owes_an_acknowledgement_sent_after_the_pass(build) -> None:
    """Nothing is sent while the pass runs; after it, the producer's
    acknowledgement (with its session's mac) and the commit watermark."""
    parts = build(BATCH_SIZE=100)
    key = os.urandom(32)
    state = parts.producers.open("p1", time.time_ns(), key)
    assert parts.commits.flush("request", 0.0)
    parts.notifications.send()
    subscribe(parts, protocol.ack_topic("p1"))
    subscribe(parts, protocol.COMMIT_TOPIC.encode())
    parts.notifications.send()  # the answer to the new acknowledgement subscription
    assert parts.notification()[1]["contiguous_seq"] == 0
    meta = protocol.MetaEncoder("p1", state.epoch, protocol.SessionMac(key))
    for seq in (1, 2):
        parts.ingest.message([TOPIC, b"x", meta.encode(seq, topic=TOPIC, payload=b"x")], 1.0)
    assert parts.commits.flush("request", 1.0)
    assert ("p1", state.epoch) in parts.notifications.owed_acks
    assert not parts.sub.poll(50)  # owed, not sent yet
    parts.notifications.send()
    topic, ack, payload = parts.notification()
    assert topic == protocol.ack_topic("p1")
    assert (ack["epoch"], ack["contiguous_seq"]) == (state.epoch, 2)
    assert protocol.SessionMac(key).notification_is_authentic(topic, payload)
    topic, commit, _ = parts.notification()
    assert topic == protocol.COMMIT_TOPIC.encode() and commit["rows"] == 2
    assert not parts.notifications.owed_acks and parts.notifications.owed_commit is None


def test_a_refused_message_is_nacked_before_the_acknowledgement(build) -> None:
    """A message of a fenced session: not stored, a nack owed with the
    fenced code, sent before the acknowledgements of the same pass."""
    parts = build()
    old = parts.open_session("p1", 0.0)
    new = parts.open_session("p1", 0.0)  # fences the first session
    subscribe(parts, protocol.NACK_TOPIC_PREFIX.encode())
    subscribe(parts, protocol.ACK_TOPIC_PREFIX.encode())
    parts.ingest.message([TOPIC, b"x", old.encode(1, topic=TOPIC, payload=b"x")], 1.0)
    parts.ingest.message([TOPIC, b"y", new.encode(1, topic=TOPIC, payload=b"y")], 1.0)
    assert parts.notifications.nacked == {protocol.PRODUCER_FENCED: 1}
    assert parts.commits.flush("request", 1.0)
    parts.notifications.send()
    topic, nack, _ = parts.notification()
    assert topic == protocol.nack_topic("p1")
    assert (nack["epoch"], nack["seq"], nack["code"]) == (1, 1, protocol.PRODUCER_FENCED)
    topic, ack, _ = parts.notification()
    assert topic == protocol.ack_topic("p1") and (ack["epoch"], ack["contiguous_seq"]) == (2, 1)
    assert [payload for payload, _ in stored(parts)] == [b"y"]


def test_subscriptions_past_the_budget_drop_the_notify_connections(build, monkeypatch) -> None:
    import writer.notifications as notifications_module
    parts = build()
    monkeypatch.setattr(notifications_module, "NOTIFY_SUBSCRIPTION_BUDGET_BYTES", 20)
    subscribe(parts, b"a" * 10)
    assert parts.notifications.subscribed_bytes == 10 and not parts.dropped
    subscribe(parts, b"b" * 11)
    assert parts.dropped == [1] and parts.notifications.drops == 1
    assert parts.notifications.subscribed_bytes == 0


# --- retention --------------------------------------------------------------

def test_retention_deletes_by_age_only_once_due(build) -> None:
    """A chunk when `now` reaches the next turn; aged by the wall clock given."""
    parts = build(BUS_RETENTION_MAX_AGE_S=60, BUS_RETENTION_CHUNK_ROWS=1000)
    parts.store.write_batch([(TOPIC.decode(), b"%d" % n, None, None, None, None)
                             for n in range(5)])
    retention = Retention(parts.config, parts.store)
    young, aged = time.time_ns(), time.time_ns() + 61 * 10**9
    retention.step(100.0, young)
    assert len(stored(parts)) == 5 and retention.due_at == 100.0 + RETENTION_IDLE_SECONDS
    assert retention.poll_timeout_ms(100.0) == 1001
    retention.step(100.5, aged)  # old enough, but not its turn yet
    assert len(stored(parts)) == 5
    retention.step(101.0, aged)
    assert len(stored(parts)) == 1  # the newest is kept: ids are never reused
    assert retention.snapshot()["deleted_total"] == 4 and retention.counts["chunks"] == 1


def test_retention_off_never_runs(build) -> None:
    parts = build()
    parts.store.write_batch([(TOPIC.decode(), b"x", None, None, None, None)] * 3)
    retention = Retention(parts.config, parts.store)
    retention.step(1e9, time.time_ns() + 10**18)
    assert len(stored(parts)) == 3 and retention.poll_timeout_ms(0.0) is None


def test_retention_after_a_backlog_runs_again_at_once(build) -> None:
    parts = build(BUS_RETENTION_MAX_MESSAGES=1, BUS_RETENTION_CHUNK_ROWS=2)
    parts.store.write_batch([(TOPIC.decode(), b"x", None, None, None, None)] * 6)
    retention = Retention(parts.config, parts.store)
    retention.step(7.0)
    assert len(stored(parts)) == 4 and retention.due_at == 7.0  # a full chunk: more to do
    retention.step(7.0)
    retention.step(7.0)
    assert len(stored(parts)) == 1 and retention.due_at == 7.0 + RETENTION_IDLE_SECONDS


# --- UTXO upkeep -------------------------------------------------------------

def test_utxo_upkeep_runs_once_a_second_and_outlives_a_busy_database() -> None:
    class Book:  # writer/utxos.py UtxoBook's upkeep side
        def __init__(self) -> None:
            self.runs, self.busy = 0, False

        def expire_leases(self) -> int:
            if self.busy:
                raise TimeoutError("database busy")
            self.runs += 1
            return 0

        def prune_requests(self) -> int:
            return 0

    book = Book()
    upkeep = UtxoUpkeep(book, (TimeoutError,))  # type: ignore[arg-type]
    upkeep.step(10.0)
    upkeep.step(10.0 + UTXO_UPKEEP_SECONDS / 2)
    assert book.runs == 1
    book.busy = True
    upkeep.step(10.0 + UTXO_UPKEEP_SECONDS)  # logged, left for the next turn
    book.busy = False
    upkeep.step(10.0 + 2 * UTXO_UPKEEP_SECONDS)
    assert book.runs == 2


# --- the whole writer, stepped: metrics ---------------------------------------

class Stop:
    """The loop's stop signal without signal handlers (bus/runner.StopSignal's
    interface): this test runs inside pytest's process."""

    def __init__(self) -> None:
        import socket
        self._r, self._w = socket.socketpair()

    def fileno(self) -> int:
        return self._r.fileno()

    def clear_wakeup(self) -> None:
        pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


def test_the_writer_stepped_in_process_and_its_stats(tmp_path: Path) -> None:
    """A whole Writer on inproc endpoints, its loop stepped with an explicit
    `now`: a message in, committed by time, acknowledged; stats assembled
    from the parts, and every /metrics series and page read from them."""
    writer, stop = Writer(config_of(tmp_path, BATCH_FLUSH_INTERVAL_MS=100,
                                    **HOLD_ROWS)), Stop()
    writer.initialize(stop)  # type: ignore[arg-type]
    push = writer.ctx.socket(zmq.PUSH)
    try:
        push.connect(writer.config.capture_endpoint)
        key = os.urandom(32)
        state = writer.producers.open("p1", time.time_ns(), key)
        assert writer.flush("request", 50.0)
        meta = protocol.MetaEncoder("p1", state.epoch, protocol.SessionMac(key))
        push.send_multipart([TOPIC, b"x", meta.encode(1, topic=TOPIC, payload=b"x")])
        deadline = time.monotonic() + RECEIVE_TIMEOUT_MS / 1000
        while not writer.ingest.messages_received and time.monotonic() < deadline:
            writer.loop(100.0)
        assert writer.ingest.messages_received == 1 and stored_rows(writer) == 0
        writer.loop(100.5)  # due by time
        assert stored_rows(writer) == 1
        stats = writer.stats(110.0)
        assert stats["batch"]["total_writes"] == 1 and stats["batch"]["flush_by_time"] == 1
        assert stats["ingest"] == {"messages_received": 1, "rejected_total": 0,
                                   "rejected": {}, "nacked": {}}
        assert stats["database"]["last_message_id"] == 1 and stats["backlog"]["rows"] == 0
        assert stats["batch"]["config"]["enabled"] is True
        assert stats["uptime_seconds"] == round(110.0 - writer._started, 3)
        for series in HTTP_SERIES:
            series.read(stats)
        assert writer_health(stats) is None
        assert batch_page(stats)["metrics"]["total_writes"] == 1
        assert load_page(stats)["load_monitoring_enabled"] is True
        assert writer.metrics.status_line(110.0).startswith("stored 1 messages")
    finally:
        push.close(linger=0)
        writer.shutdown()
        stop.close()


def stored_rows(writer: Writer) -> int:
    return writer.store.last_message_id() or 0  # ids from 1, none deleted here

