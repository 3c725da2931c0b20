"""Idempotent producers: each (producer id, seq) is stored once, gaps are counted,
and the ledger survives writer restarts (issue #3, part 1)."""

from __future__ import annotations

import json

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


# --- bus-cli producers ls | info | rm (issue 21, item 5) -------------------------


def test_producers_ls_info_and_rm_through_bus_cli(bus: Bus) -> None:
    """No command listed or freed producer ids: an id belonged to whoever
    opened it first, for ever. `rm` frees one, fences its live session, and
    keeps its high-water marks: the next session goes on after its epoch and
    seqs, so (producer, seq) stays unique among the stored messages."""
    from bus.client import ProducerFenced, Publisher
    with Publisher(bus.config(), producer_id="ls-a") as pub:
        for i in range(3):
            pub.publish("ls.t", b"%d" % i)
        pub.flush(timeout=10)
    listed = bus.cli("producers", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    producers = json.loads(listed.stdout)["producers"]
    assert [(p["producer"], p["epoch"], p["contiguous_seq"], p["max_seq"], p["owner"])
            for p in producers] == [("ls-a", 1, 3, 3, None)]
    assert producers[0]["last_seen_ns"] >= producers[0]["first_seen_ns"] > 0
    text = bus.cli("producers", "ls")
    assert text.returncode == 0 and text.stdout.splitlines()[1].split()[:5] == \
        ["ls-a", "-", "1", "3", "3"], text.stdout
    info = bus.cli("producers", "info", "ls-a")
    assert info.returncode == 0 and json.loads(info.stdout)["max_seq"] == 3
    for args in (("info", "nope"), ("rm", "nope")):
        unknown = bus.cli("producers", *args)
        assert unknown.returncode == 1 and unknown.stderr.strip() == "Error: no producer 'nope'"

    # A page at a time, in id order.
    for producer, n in (("ls-b", 1), ("ls-c", 2)):
        with Publisher(bus.config(), producer_id=producer) as pub:
            for i in range(n):
                pub.publish("ls.t", b"%d" % i)
            pub.flush(timeout=10)
    first = bus.request("BUS_CONTROL_ENDPOINT", "producers_list", {"limit": 2})
    assert [p["producer"] for p in first["producers"]] == ["ls-a", "ls-b"]
    assert first["more"] is True and first["total"] == 3
    rest = bus.request("BUS_CONTROL_ENDPOINT", "producers_list", {"after": "ls-b", "limit": 2})
    assert [p["producer"] for p in rest["producers"]] == ["ls-c"] and rest["more"] is False

    # rm while a session of the id is live: it is fenced, nothing is lost.
    live = Publisher(bus.config(), producer_id="ls-a").connect()
    try:
        assert live.epoch == 2
        live.publish("ls.t", b"before-rm", wait=True, timeout=10)
        removed = bus.cli("producers", "rm", "ls-a")
        assert removed.returncode == 0, removed.stderr
        assert "sessions up to epoch 3 are fenced" in removed.stderr
        assert "goes on after seq 4" in removed.stderr
        with pytest.raises(ProducerFenced):
            live.publish("ls.t", b"after-rm", wait=True, timeout=10)
    finally:
        live.close()
    with Publisher(bus.config(), producer_id="ls-a") as again:
        assert (again.epoch, again.last_seq) == (4, 4)
        again.publish("ls.t", b"reopened", wait=True, timeout=10)
    assert stored_seqs(bus, "ls-a") == [1, 2, 3, 4, 5]
    assert [r[0] for r in query(bus.db, "SELECT payload FROM messages WHERE producer_id ="
                                        " 'ls-a' ORDER BY id")][3:] == [b"before-rm", b"reopened"]
    # The high-water marks outlive a writer restart.
    assert bus.writer.stop() == 0
    bus.start_writer()
    assert bus.cli("producers", "rm", "ls-a").returncode == 0
    with Publisher(bus.config(), producer_id="ls-a") as again:
        assert (again.epoch, again.last_seq) == (6, 5)
