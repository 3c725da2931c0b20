"""Retention (issue #3, part 6): the writer deletes the oldest messages past a
maximum count or age, in bounded chunks between batches; freed pages are
reused, so the database file stops growing under steady load past the limit."""

from __future__ import annotations

import os

import pytest

from bus.client import Publisher
from tests.conftest import Bus, execute, integrity_ok, query, wait_for


def id_range(bus: Bus) -> tuple[int, int, int]:
    return query(bus.db, "SELECT min(id), max(id), count(*) FROM messages")[0]


def publish(bus: Bus, count: int, producer: str, size: int = 200) -> None:
    with Publisher(bus.config(), producer_id=producer) as pub:
        for i in range(count):
            pub.publish("ret.t", b"%06d" % i + b"x" * size)
        pub.flush(timeout=20)


def test_max_messages_keeps_the_newest_deleting_in_chunks(make_bus) -> None:
    bus = make_bus(BUS_RETENTION_MAX_MESSAGES=1000, BUS_RETENTION_CHUNK_ROWS=300).start()
    publish(bus, 5000, "counted")
    wait_for(lambda: id_range(bus) == (4001, 5000, 1000), message="only the newest 1000 left")
    retention = bus.writer_stats()["retention"]
    assert retention["deleted_total"] == 4000
    assert retention["chunks"] >= 4000 // 300, "no transaction deleted more than a chunk"
    # Every stored message is still reachable by its producer's sequence.
    assert query(bus.db, "SELECT min(producer_seq), max(producer_seq) FROM messages") == \
        [(4001, 5000)]
    assert bus.stop() == (0, 0)
    assert integrity_ok(bus.db)


def test_max_age_deletes_old_messages_but_never_the_newest(make_bus) -> None:
    bus = make_bus(BUS_RETENTION_MAX_AGE_S=0.5).start()
    publish(bus, 1, "aging")
    # A subscription event as writers up to schema 4 stored them.
    execute(bus.db, "INSERT INTO subscriptions (subscribed, prefix, committed_ns) "
                    "VALUES (1, ?, 1)", (b"a",))
    publish(bus, 199, "aging")
    wait_for(lambda: id_range(bus)[2] == 1, message="all but the newest message expired")
    assert id_range(bus)[:2] == (200, 200), "ids are never reused: the newest row stays"
    # Subscription events older than the oldest message left are deleted too.
    wait_for(lambda: query(bus.db, "SELECT count(*) FROM subscriptions WHERE committed_ns < "
                                   "(SELECT min(committed_ns) FROM messages)") == [(0,)],
             message="old subscription events deleted")
    publish(bus, 3, "aging-2")
    assert id_range(bus)[1] == 203


@pytest.mark.sqlite_only  # a file and its WAL; PostgreSQL's space is autovacuum's to reuse
def test_file_size_stays_flat_under_steady_load_past_the_limit(make_bus) -> None:
    bus = make_bus(BUS_RETENTION_MAX_MESSAGES=2000, BUS_RETENTION_CHUNK_ROWS=500).start()
    sizes = []
    for round_no in range(16):
        publish(bus, 2000, f"steady-{round_no}", size=500)
        wait_for(lambda: id_range(bus)[2] <= 2000, message="retention caught up")
        sizes.append((os.path.getsize(bus.db), os.path.getsize(bus.db + "-wal")))
    # Rows reach the database file at checkpoints (every ~4000 WAL pages); from
    # the first one on, deleted pages are reused instead of appended, and the
    # WAL is rewritten from its start instead of growing.
    files, wals = [db for db, _ in sizes], [wal for _, wal in sizes]
    assert files[7] > 4096 and files[-1] <= files[7] * 1.10, sizes
    assert max(wals) < 20 << 20, sizes
    stats = bus.writer_stats()
    assert stats["retention"]["deleted_total"] == 16 * 2000 - 2000
    assert bus.stop() == (0, 0)
    assert integrity_ok(bus.db)
