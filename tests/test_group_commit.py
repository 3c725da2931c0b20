"""Group commit (issue 26): the writer commits what has arrived as soon as
its capture runs dry, paced by what its commits cost, instead of waiting for
BATCH_SIZE rows or BATCH_FLUSH_INTERVAL_MS. Such a commit is the same
transaction as any other, and keeps every guarantee of one; the pacing itself
is stepped with an explicit `now` in tests/test_writer_parts.py."""

from __future__ import annotations

import pytest

from bus.client import Publisher
from tests.conftest import NEVER_MS, Bus, RawProducer, query, wait_for


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
