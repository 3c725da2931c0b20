"""Idempotent producers: each (producer id, seq) is stored once, gaps are counted,
and the ledger survives writer restarts (issue #3, part 1)."""

from __future__ import annotations

import msgpack
import pytest

from tests.conftest import Bus, RawProducer, query, signed, wait_for
from writer.producers import ProducerLedger, ProducerState

# --- the ledger's logic -------------------------------------------------------


def test_state_tracks_holes_and_skips_what_it_has() -> None:
    state = ProducerState("p")
    assert [state.accept(s, max_holes=10) for s in (1, 2, 3)] == [True, True, True]
    assert (state.contiguous_seq, state.max_seq, state.holes) == (3, 3, [])
    assert state.accept(2, 10) is False and state.duplicates == 1
    assert state.accept(7, 10) is True            # 4..6 missing
    assert state.accept(10, 10) is True           # 8..9 missing
    assert state.holes == [[4, 6], [8, 9]] and state.gaps == 2 and state.missing == 5
    assert state.contiguous_seq == 3
    assert state.accept(5, 10) is True            # splits 4..6
    assert state.holes == [[4, 4], [6, 6], [8, 9]]
    assert state.accept(5, 10) is False           # already stored
    for seq in (4, 6, 9, 8):
        assert state.accept(seq, 10) is True
    assert (state.holes, state.contiguous_seq, state.missing) == ([], 10, 0)
    assert state.accept(7, 10) is False and state.duplicates == 3


def test_state_gives_up_on_the_oldest_holes_beyond_its_bound() -> None:
    state = ProducerState("p")
    for seq in (1, 3, 5, 7):                      # holes 2, 4, 6
        state.accept(seq, max_holes=2)
    assert state.holes == [[4, 4], [6, 6]] and state.abandoned == 1
    assert state.accept(2, 2) is False, "an abandoned hole counts as stored"


def test_state_round_trips_through_its_row() -> None:
    state = ProducerState("p", first_seen_ns=5)
    for seq in (1, 2, 5, 9):
        state.accept(seq, 10)
    row = state.row()
    assert row[:3] == ("p", 2, 9) and msgpack.unpackb(row[3]) == [[3, 4], [6, 8]]
    assert ProducerState.from_row(row) == state


def test_ledger_loads_on_demand_and_keeps_dirty_states_until_committed() -> None:
    old = ProducerState("old", max_seq=4, epoch=2, session_key=b"o" * 32)
    saved = {"old": old.row(with_key=True)}
    ledger = ProducerLedger(saved.get, max_cached=1)
    assert ledger.accept("old", 2, 3, 1, signed(old, 3)) == (False, None)  # 1..4 stored before
    assert ledger.accept("old", 2, 5, 2, signed(old, 5)) == (True, None)
    new = ledger.open("new", 3, b"n" * 32)                  # over max_cached, but "old" is dirty
    assert new.epoch == 1
    assert ledger.accept("new", 1, 1, 3, signed(new, 1)) == (True, None)
    rows = ledger.dirty_rows()
    assert {row[0] for row in rows} == {"old", "new"}
    assert {row[0]: row[-1] for row in rows} == {"old": None, "new": b"n" * 32}, \
        "the key of the session just opened is stored, once"
    ledger.committed()
    assert not ledger.dirty
    ledger.open("third", 4, b"t" * 32)                       # now a clean state is evicted
    assert ledger.snapshot()["cached"] <= 2
    assert ledger.duplicates == 1


# --- through the real writer ----------------------------------------------------


def stored_seqs(bus: Bus, producer: str) -> list[int]:
    return [r[0] for r in query(bus.db, "SELECT producer_seq FROM messages WHERE producer_id = ?"
                                        " ORDER BY id", (producer,))]


def producer_row(bus: Bus, producer: str) -> tuple:
    rows = query(bus.db, "SELECT contiguous_seq, max_seq, holes, gaps, duplicates FROM producers"
                         " WHERE producer_id = ?", (producer,))
    return rows[0] if rows else ()


@pytest.fixture
def raw(bus: Bus):
    producers: list[RawProducer] = []

    def make(name: str) -> RawProducer:
        producers.append(RawProducer(bus, name))
        return producers[-1]

    yield make
    for p in producers:
        p.close()


def test_retransmissions_are_stored_once(bus: Bus, raw) -> None:
    p = raw("retry")
    p.send(1, 2, 3, 2, 3, 4, 1, 5)
    wait_for(lambda: bus.writer_stats()["ingest"]["messages_received"] == 8,
             message="all 8 sends received")
    assert wait_for(lambda: stored_seqs(bus, "retry") == [1, 2, 3, 4, 5] or None,
                    message="seqs 1..5 stored once") is True
    stats = bus.writer_stats()["producers"]
    assert stats["duplicates_skipped"] == 3
    wait_for(lambda: producer_row(bus, "retry") == (5, 5, None, 0, 3), message="ledger row")


def test_gaps_are_counted_and_filled_by_late_messages(bus: Bus, raw) -> None:
    p = raw("gappy")
    p.send(1, 2, 5, 6, 9)
    wait_for(lambda: len(stored_seqs(bus, "gappy")) == 5, message="5 rows")
    missing = bus.writer_stats()["producers"]["missing"]
    assert missing == [{"producer": "gappy", "epoch": 1, "contiguous_seq": 2, "max_seq": 9,
                        "missing": 4, "gaps": 2, "abandoned": 0, "duplicates": 0, "refused": 0}]
    contiguous, max_seq, holes, gaps, _ = wait_for(lambda: producer_row(bus, "gappy"),
                                                   message="ledger row")
    assert (contiguous, max_seq, msgpack.unpackb(holes), gaps) == (2, 9, [[3, 4], [7, 8]], 2)
    p.send(4, 3, 8, 7, 3)
    wait_for(lambda: len(stored_seqs(bus, "gappy")) == 9, message="holes filled")
    assert sorted(stored_seqs(bus, "gappy")) == list(range(1, 10))
    assert bus.writer_stats()["producers"]["with_missing"] == 0
    wait_for(lambda: producer_row(bus, "gappy") == (9, 9, None, 2, 1), message="ledger row")


def test_the_ledger_survives_a_writer_restart(bus: Bus, raw) -> None:
    p = raw("durable")
    p.send(1, 2, 3, 6)
    wait_for(lambda: len(stored_seqs(bus, "durable")) == 4, message="4 rows")
    assert bus.writer.stop() == 0
    bus.start_writer()
    p.send(2, 3, 6, 4, 7)        # three retransmissions, two new
    wait_for(lambda: len(stored_seqs(bus, "durable")) == 6, message="6 rows")
    assert stored_seqs(bus, "durable") == [1, 2, 3, 6, 4, 7]
    assert bus.writer_stats()["producers"]["duplicates_skipped"] == 3
    assert bus.stop() == (0, 0)
    contiguous, max_seq, holes, _, duplicates = producer_row(bus, "durable")
    assert (contiguous, max_seq, msgpack.unpackb(holes), duplicates) == (4, 7, [[5, 5]], 3)


def test_messages_without_producer_meta_are_never_deduplicated(bus: Bus) -> None:
    with RawProducer(bus, "unused") as raw:
        raw.send_frames(*[[b"plain.t", b"same"], [b"plain.t", b"same", msgpack.packb({"seq": 1})]]
                        * 3)
    bus.wait_count(6, "plain.")
