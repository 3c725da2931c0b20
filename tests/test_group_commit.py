"""Group commit (issue 26): the writer commits what has arrived as soon as
its capture runs dry, paced by what its commits cost, instead of waiting for
BATCH_SIZE rows or BATCH_FLUSH_INTERVAL_MS. Such a commit is the same
transaction as any other, and keeps every guarantee of one; the pacing itself
is stepped with an explicit `now` in tests/test_writer_parts.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from bus.client import BusTimeout, ControlClient, Publisher
from tests.conftest import NEVER_MS, Bus, RawProducer, WriteLock, query, wait_for


def test_a_drained_capture_is_committed_at_once_with_every_guarantee(make_bus) -> None:
    """No batch fills, no timer runs out, and the load is never low (a threshold
    of 0): each commit here is one of a drained capture (`flush_by_drained`).
    Each message is acknowledged at once, and only once committed; a
    retransmission is stored once; retention keeps the newest. Before group
    commit, the first acknowledgement waited for the 10-minute timer."""
    bus: Bus = make_bus(BATCH_SIZE=1000, BATCH_FLUSH_INTERVAL_MS=NEVER_MS,
                        BATCH_LOW_LOAD_THRESHOLD=0, BUS_RETENTION_MAX_MESSAGES=5).start()
    with Publisher(bus.config(), producer_id="drained") as pub:
        for seq in range(1, 9):
            pub.publish("drained.t", b"%d" % seq, wait=True, timeout=5)
            # Acknowledged means committed: the row is there as the ack is.
            assert query(bus.db, "SELECT max(producer_seq) FROM messages "
                                 "WHERE producer_id = 'drained'") == [(seq,)]
    with RawProducer(bus, "raw") as raw:
        raw.send(1, 2, 3)
        bus.wait_count(3, "idem.t")
        raw.send(2, 3)  # retransmissions: committed already
        stats = wait_for(lambda: (s := bus.writer_stats())["producers"]["duplicates_skipped"] == 2
                         and s, message="both retransmissions skipped")
    assert query(bus.db, "SELECT count(*) FROM messages WHERE producer_id = 'raw'") == [(3,)]
    wait_for(lambda: bus.count() == 5, message="retention to keep the newest 5 of 11")
    assert query(bus.db, "SELECT producer_id, producer_seq FROM messages ORDER BY id") == \
        [("drained", 7), ("drained", 8), ("raw", 1), ("raw", 2), ("raw", 3)]
    batch = stats["batch"]
    assert batch["flush_by_drained"] >= 3
    assert (batch["flush_by_size"], batch["flush_by_time"], batch["flush_by_low_load"]) == \
        (0, 0, 0)
    assert bus.stop() == (0, 0)


@pytest.mark.sqlite_only
def test_group_commit_off_leaves_the_seed_batches(make_bus) -> None:
    """BATCH_GROUP_COMMIT=false: a drained capture waits for size or time, as
    the seed's writer did (what bench/bus_bench.py compares against)."""
    bus: Bus = make_bus(BATCH_SIZE=1000, BATCH_FLUSH_INTERVAL_MS=300,
                        BATCH_LOW_LOAD_THRESHOLD=0, BATCH_GROUP_COMMIT=False).start()
    with RawProducer(bus, "seed") as raw:
        raw.send(1, 2, 3)
        bus.wait_count(3, "idem.t")
    batch = bus.writer_stats()["batch"]
    assert batch["flush_by_time"] >= 1 and batch["flush_by_drained"] == 0
    assert bus.stop() == (0, 0)


def writer_waits_for_a_lock(db: str) -> bool:
    """Is the writer's session (application_name bus-writer) waiting for a lock?"""
    return query(db, "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                     " 'bus-writer' AND wait_event_type = 'Lock'") == [(1,)]


@contextlib.contextmanager
def held_commit(bus: Bus, pub: Publisher, topic: str) -> Iterator[int]:
    """A message committed and acknowledged, then another whose commit waits
    for another session's lock on the messages table (seen in
    pg_stat_activity); its seq. The lock goes at the end, and the test's
    publisher then flushes: both rows are there, in order."""
    pub.publish(topic, b"0", wait=True, timeout=5)
    lock = WriteLock(bus.db)
    try:
        seq = pub.publish(topic, b"1")
        wait_for(lambda: writer_waits_for_a_lock(bus.db),
                 message="the writer's commit to wait for the lock")
        yield seq
    finally:
        lock.release()
    pub.flush(10)
    assert query(bus.db, "SELECT producer_seq FROM messages ORDER BY id") == [(1,), (2,)]


@pytest.mark.parametrize("db_engine", ["postgresql"], indirect=True)
@pytest.mark.parametrize("overlap", [True, False])
def test_an_overlapped_commit_lets_the_loop_serve_and_is_acknowledged_once_committed(
        make_bus, overlap: bool) -> None:
    """BUS_PG_OVERLAP_COMMITS: a batch commits on a thread of its own. While
    another session's lock holds that commit (within lock_timeout), the
    writer still answers `ping`, and nothing of the batch is acknowledged;
    once the lock goes, the batch commits and is acknowledged. Off, the loop
    waits for the commit: no answer meanwhile."""
    bus: Bus = make_bus(BUS_PG_OVERLAP_COMMITS=overlap, BATCH_LOW_LOAD_THRESHOLD=0,
                        BUS_SQLITE_BUSY_TIMEOUT_MS=20_000).start()
    with Publisher(bus.config(), producer_id="overlap") as pub, \
            held_commit(bus, pub, "overlap.t") as seq:
        with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=1000) as client:
            if overlap:
                assert client.request("ping")
            else:
                with pytest.raises(BusTimeout):
                    client.request("ping")
        assert pub.read_acks(0.3) < seq  # not committed, not acknowledged
        assert query(bus.db, "SELECT count(*) FROM messages") == [(1,)]
    assert bus.stop() == (0, 0)


@pytest.mark.parametrize("db_engine", ["postgresql"], indirect=True)
def test_stats_asked_during_a_commit_in_flight_agree_with_the_rows_they_read(make_bus) -> None:
    """`stats` reads the database, so it waits for the commit in flight; its
    counters must then count that commit (both messages written, none queued),
    as `last_message_id` does. CI once saw the counters of before the commit
    beside its rows (tests/test_writer.py, flush by size)."""
    bus: Bus = make_bus(BATCH_LOW_LOAD_THRESHOLD=0, BUS_SQLITE_BUSY_TIMEOUT_MS=20_000).start()

    def loop_waits() -> bool:
        with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=200) as client:
            try:
                return not client.request("ping")
            except BusTimeout:
                return True

    with Publisher(bus.config(), producer_id="stats") as pub, ThreadPoolExecutor(1) as pool:
        with held_commit(bus, pub, "stats.t"):
            asked = pool.submit(bus.writer_stats)
            wait_for(loop_waits, message="the writer to wait in stats for the held commit")
        stats = asked.result(timeout=30)
    assert stats["database"]["last_message_id"] == 2
    assert (stats["batch"]["total_writes"], stats["batch"]["db_queue_size"]) == (2, 0)
    assert bus.stop() == (0, 0)


@pytest.mark.parametrize("db_engine", ["postgresql"], indirect=True)
def test_a_held_commit_leaves_the_loop_serving_past_its_once_a_second_upkeep(make_bus) -> None:
    """The loop's once-a-second upkeep (UTXO leases, retention) runs
    statements that wait for the commit in flight: while another session's
    lock holds that commit, they are left for a later pass instead of
    stopping the loop, so `ping` is answered throughout, not only until the
    next upkeep (writer/upkeep.py, UTXO_UPKEEP_SECONDS)."""
    from writer.upkeep import UTXO_UPKEEP_SECONDS
    bus: Bus = make_bus(BATCH_LOW_LOAD_THRESHOLD=0, BUS_SQLITE_BUSY_TIMEOUT_MS=20_000,
                        BUS_RETENTION_MAX_MESSAGES=1000).start()
    with Publisher(bus.config(), producer_id="held") as pub, \
            held_commit(bus, pub, "held.t") as seq:
        # Pings over two upkeep periods (paced: 20 ms apart), each answered
        # within 1 s.
        answered = 0
        with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=1000) as client:
            until = time.monotonic() + 2 * UTXO_UPKEEP_SECONDS + 0.2
            while time.monotonic() < until and answered < 1000:
                assert client.request("ping"), "no answer while the commit was held"
                answered += 1
                time.sleep(0.02)
        assert writer_waits_for_a_lock(bus.db)  # still held all along
        assert pub.read_acks(0) < seq
    assert bus.stop() == (0, 0)
