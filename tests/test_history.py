"""History reads (issue #3, part 3) and live join (part 4): the reader process
serves pages of stored messages from a read-only connection; Subscriber(since=)
and `bus-cli tail --since` deliver history, then live, with no gap or duplicate."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal

import pytest

from bus.client import BusError, ControlClient, HistoryClient, Publisher, Subscriber
from tests.conftest import Bus, query, wait_for


def stored(bus: Bus, prefix: str = "", after_id: int = 0) -> list[tuple[int, str, bytes]]:
    return query(bus.db, "SELECT id, topic, payload FROM messages WHERE id > ? AND "
                         "substr(topic, 1, ?) = ? ORDER BY id", (after_id, len(prefix), prefix))


def publish_mixed(bus: Bus, count: int) -> None:
    with Publisher(bus.config(), producer_id="mixed") as pub:
        for i in range(count):
            pub.publish(("alpha.x", "beta.y", "alphabet")[i % 3], b"m%d" % i)
        pub.flush(timeout=10)


def test_history_pages_by_prefix_from_an_id_or_a_time(make_bus) -> None:
    bus = make_bus(BUS_HISTORY_PAGE_ROWS=7).start()  # many small pages
    publish_mixed(bus, 60)
    rows = stored(bus)
    with HistoryClient(bus.config()) as history:
        every = list(history.messages())
        assert [(m.id, m.topic, m.payload) for m in every] == rows
        assert every[0].producer == "mixed" and every[0].seq == 1 and every[0].committed_ns

        page = history.page(["alpha."])
        assert len(page.rows) == 7 and page.more, "one page is bounded by BUS_HISTORY_PAGE_ROWS"
        assert [m.topic for m in page.messages] == ["alpha.x"] * 7

        alpha = [(m.id, m.topic, m.payload) for m in history.messages(["alpha."])]
        assert alpha == stored(bus, "alpha.")
        both = [m.id for m in history.messages(["alpha.", "beta."])]
        assert both == [r[0] for r in rows if r[1] != "alphabet"]

        after = rows[40][0]
        assert [m.id for m in history.messages(after_id=after)] == [r[0] for r in rows[41:]]
        assert [m.id for m in history.messages(after_id=after, limit=5)] == \
            [r[0] for r in rows[41:46]]

        # From a time: the first message committed at or after it, found by
        # binary search over ids.
        committed = dict(query(bus.db, "SELECT id, committed_ns FROM messages"))
        since = committed[rows[25][0]]
        expected = [r[0] for r in rows if committed[r[0]] >= since]
        assert [m.id for m in history.messages(since_ns=since)] == expected
        assert list(history.messages(since_ns=committed[rows[-1][0]] + 1)) == []


def test_a_rare_prefix_is_found_across_pages_that_examine_a_bounded_number_of_rows(make_bus) -> None:
    bus = make_bus(BUS_HISTORY_SCAN_ROWS=10).start()
    with Publisher(bus.config(), producer_id="sparse") as pub:
        for i in range(45):
            pub.publish("rare.t" if i in (3, 44) else "common.t", b"%d" % i)
        pub.flush(timeout=10)
    with HistoryClient(bus.config()) as history:
        first = history.page(["rare."])
        assert [m.payload for m in first.messages] == [b"3"] and first.more
        assert first.after_id == 10, "examined rows 1-10 only"
        assert [m.payload for m in history.messages(["rare."])] == [b"3", b"44"]
    reader = ControlClient(bus["BUS_READ_ENDPOINT"]).request("stats")
    assert reader["requests"] >= 6


def test_bus_cli_history_prints_pages_with_filters(bus: Bus) -> None:
    publish_mixed(bus, 30)
    rows = stored(bus)
    result = bus.cli("history", "alpha.", "--from-id", str(rows[10][0]), "--limit", "4", "--json")
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    expected = [r for r in rows[10:] if r[1].startswith("alpha.")][:4]
    assert [(p["id"], p["topic"], p["payload"]) for p in printed] == \
        [(r[0], r[1], r[2].decode()) for r in expected]
    assert printed[0]["meta"]["producer"] == "mixed"

    result = bus.cli("history", "--since", "10m")
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 30
    assert f"[{rows[0][0]}] {rows[0][1]} mixed#1 m0" in result.stdout.splitlines()[0]
    result = bus.cli("history", "--since", "2099-01-01T00:00:00Z")
    assert result.returncode == 0 and result.stdout == ""

    result = bus.cli("history", "--since", "yesterday")
    assert result.returncode == 2 and "expected a duration like 10m" in result.stderr
    result = bus.cli("history", "--since", "1m", "--from-id", "3")
    assert result.returncode == 2 and "give one of --since, --from-id and --last" in result.stderr


def test_reader_answers_bad_requests_with_errors_and_keeps_serving(bus: Bus) -> None:
    publish_mixed(bus, 3)
    with ControlClient(bus["BUS_READ_ENDPOINT"]) as client:
        for args, fragment in (({"prefixes": "alpha"}, "prefixes"),
                               ({"prefixes": [1]}, "prefixes"),
                               ({"after_id": -1}, "after_id"),
                               ({"limit": "ten"}, "limit"),
                               ({"after_id": 1, "since_ns": 5}, "not both")):
            with pytest.raises(BusError) as err:
                client.request("history", args)
            assert err.value.code == "bad_request" and fragment in str(err.value)
        with pytest.raises(BusError) as err:
            client.request("drop_table")
        assert err.value.code == "unknown_command"
        assert len(client.request("history", {})["messages"]) == 3
        assert client.request("stats")["control"]["bad_requests"] == 6  # unknown_command too


def test_reader_started_before_the_database_answers_unavailable_then_serves(make_bus) -> None:
    bus = make_bus()
    bus.start_reader()
    with HistoryClient(bus.config()) as history:
        with pytest.raises(BusError) as err:
            history.page()
        assert err.value.code == "unavailable"
        bus.start_writer()
        bus.start_proxy()
        publish_mixed(bus, 2)
        assert [m.payload for m in history.messages()] == [b"m0", b"m1"]
    assert bus.reader.stop() == 0


def test_since_subscriber_gets_history_then_live_without_gap_or_duplicate(bus: Bus) -> None:
    # Two publishers send steadily; the subscriber joins in the middle, asking
    # for everything since before they started. At the seam, messages are
    # both stored and passing live: each must come exactly once, in order.
    count = 4000
    pubs = [bus.run("publish", "seam.t", "x", "--count", str(count), "--rate", "2000",
                    "--producer-id", f"seam-{i}", "--wait") for i in range(2)]
    wait_for(lambda: bus.count("seam.") >= 1500, message="publishers under way")
    got: dict[str, list[int]] = {"seam-0": [], "seam-1": []}
    with Subscriber(["seam."], bus.config(), since=dt.timedelta(minutes=5)) as sub:
        def all_arrived() -> bool:
            while (msg := sub.receive(timeout=0.05)) is not None:
                got[msg.producer].append(msg.seq)
            return all(len(seqs) >= count for seqs in got.values())
        wait_for(all_arrived, timeout=30, message="every message through the seam")
        assert sub.receive(timeout=0.5) is None, "nothing after the last one"
        assert sub.switched_to_live, "the stored stream met the live one"
    for pub in pubs:
        assert pub.wait(30) == 0, pub.stderr.collect()
    for seqs in got.values():
        assert seqs == list(range(1, count + 1))


def test_since_subscriber_on_an_idle_bus_follows_commits(bus: Bus) -> None:
    with Publisher(bus.config(), producer_id="before") as pub:
        pub.publish("idle.t", b"old", wait=True)
    with Subscriber(["idle."], bus.config(), since=dt.timedelta(minutes=1)) as sub:
        assert sub.receive(timeout=5).payload == b"old"
        assert sub.receive(timeout=0.3) is None
        with Publisher(bus.config(), producer_id="after") as pub:
            pub.publish("idle.t", b"new")
            msg = sub.receive(timeout=5)
        assert (msg.payload, msg.producer) == (b"new", "after")
        assert sub.receive(timeout=0.3) is None


def test_bus_cli_tail_since_prints_history_then_live(bus: Bus) -> None:
    with Publisher(bus.config(), producer_id="old") as pub:
        for i in range(3):
            pub.publish("tails.t", b"old%d" % i)
        pub.flush(timeout=10)
    tail = bus.run("tail", "tails.", "--since", "5m", "--json", "-n", "5")
    tail.stdout.wait_line(lambda ln: "old2" in ln)
    with Publisher(bus.config(), producer_id="new") as pub:
        pub.publish("tails.t", b"new0")
        pub.publish("tails.t", b"new1")
    assert tail.wait() == 0, tail.stderr.collect()
    printed = [json.loads(line) for line in tail.stdout.collect()]
    assert [p["payload"] for p in printed] == ["old0", "old1", "old2", "new0", "new1"]
    assert all("id" in p for p in printed[:3])


def test_since_rejects_reserved_prefixes(bus: Bus) -> None:
    with pytest.raises(ValueError, match="not stored"):
        Subscriber(["$bus."], bus.config(), since=dt.timedelta(minutes=1))


def test_tail_since_with_the_reader_down_reports_and_keeps_waiting(make_bus) -> None:
    bus = make_bus().start()
    with Publisher(bus.config(), producer_id="r") as pub:
        pub.publish("rd.t", b"stored", wait=True)
    assert bus.reader.stop() == 0
    tail = bus.run("tail", "rd.", "--since", "5m", "--json", "--request-timeout-ms", "300")
    bus.start_reader()
    tail.stdout.wait_line(lambda ln: "stored" in ln)
    tail.send_signal(signal.SIGTERM)
    assert tail.wait() == 0


def test_a_page_of_large_messages_costs_the_reader_a_page_not_all_of_them(make_bus) -> None:
    """BUS_HISTORY_PAGE_BYTES bounds what the reader holds, not only what it
    sends: PostgreSQL's client receives a whole result at once, so a page of
    5,000 messages of 900 KB would have been 4.5 GB in the reader before the
    server cut it (SQLite's cursor stops by itself)."""
    from tests.fuzz import RssSampler
    bus = make_bus(BUS_HISTORY_PAGE_BYTES=2 << 20).start()
    big = os.urandom(900_000)
    with Publisher(bus.config(), producer_id="big") as pub:
        for _ in range(150):  # 135 MB stored, more than the reader's 128 MiB limit
            pub.publish("big.x", big)
        pub.flush(timeout=60)
    sampler = RssSampler({"reader": bus.reader.pid}, interval=0.02)
    try:
        with HistoryClient(bus.config()) as history:
            page = history.page(["big."])
            assert len(page.rows) == 3 and page.more, "cut at the page's bytes"
            assert sum(1 for _ in history.messages(["big."])) == 150
    finally:
        sampler.stop()
    assert sampler.peak["reader"] < 100 << 10, sampler.peak  # KiB


def test_a_producer_s_seqs_stored_out_of_order_are_each_delivered_once() -> None:
    """After a writer's crash or a takeover, a publisher sends again what the
    lost commit held, and it is stored after later seqs (holes filled). The
    seam delivered a producer's seqs above the highest it had delivered
    only, so a subscriber catching up dropped those for good (47 of 20,000
    after the kill -9 of tests/test_cluster.py). Each is delivered once now;
    a seq delivered before, stored or live, is still dropped."""
    from bus.client.subscriber import MAX_RUNS_PER_PRODUCER, Seam
    from bus.protocol import META_EPOCH, META_PRODUCER, META_SEQ, Message

    def msg(seq: int, producer: str = "p") -> Message:
        return Message("t", b"", {META_PRODUCER: producer, META_EPOCH: 1, META_SEQ: seq})

    seam = Seam(hold_limit=100)
    order = [1, 2, 3, 6, 7, 8, 4, 5, 9, 12, 10, 11]
    assert [m.seq for m in seam.cut([msg(s) for s in order])] == order
    assert seam.cut([msg(5), msg(9), msg(1), msg(13), msg(13)]) == [msg(13)]
    assert seam.duplicates_skipped == 4
    assert seam._delivered.runs == {"p": [[1, 13]]}
    # A live subscriber that lost every other message holds a run per loss,
    # at most MAX_RUNS_PER_PRODUCER: the oldest merge (their gaps count as seen).
    lossy = Seam(hold_limit=100)
    lossy.cut([msg(s, "q") for s in range(1, 4 * MAX_RUNS_PER_PRODUCER, 2)])
    runs = lossy._delivered.runs["q"]
    assert len(runs) == MAX_RUNS_PER_PRODUCER and runs[-1] == [4 * MAX_RUNS_PER_PRODUCER - 1] * 2
    assert lossy.cut([msg(4 * MAX_RUNS_PER_PRODUCER - 2, "q")]) != []


def test_what_a_subscriber_remembers_of_delivered_seqs_is_bounded_in_all() -> None:
    """Live messages come from any publisher: one forging many producer ids,
    each with seqs full of holes, makes the subscriber remember a run per
    hole. Per producer that is bounded (MAX_RUNS_PER_PRODUCER); in all it
    stays under MAX_RUNS (about 13 MB), past which it is forgotten (the old
    mark kept one int per producer, up to 100,000 producers; runs could have
    reached 100,000 x 1,024)."""
    from bus.client.subscriber import MAX_RUNS, MAX_RUNS_PER_PRODUCER, Delivered
    delivered = Delivered()
    producers = 2 * MAX_RUNS // MAX_RUNS_PER_PRODUCER + 1
    for p in range(producers):
        for seq in range(1, 2 * MAX_RUNS_PER_PRODUCER + 2, 2):
            assert delivered.add(f"forged-{p}", seq)
            assert delivered.count <= MAX_RUNS
    assert delivered.count == sum(len(runs) for runs in delivered.runs.values())
    assert not delivered.add(f"forged-{producers - 1}", 2 * MAX_RUNS_PER_PRODUCER + 1)


def test_what_a_seam_holds_is_bounded_in_bytes_too() -> None:
    """The gateway's replays hold live messages while they read stored ones:
    a count alone let 10,000 messages of 1 MiB be held (10 GB). Past
    `hold_bytes` of payloads the held ones are forgotten (the stored stream
    has them), and the seam still meets at a later live message."""
    from bus.client.subscriber import Seam
    from bus.protocol import META_EPOCH, META_PRODUCER, META_SEQ, Message

    def msg(seq: int, size: int) -> Message:
        return Message("t", b"x" * size, {META_PRODUCER: "p", META_EPOCH: 1, META_SEQ: seq})

    seam = Seam(hold_limit=100, hold_bytes=1000)
    for seq in range(1, 4):
        seam.hold(msg(seq, 600))
    assert [m.seq for m in seam._held] == [3]  # 1 and 2 (1,200 bytes) forgotten at 3
    assert [m.seq for m in seam.cut([msg(1, 600), msg(2, 600), msg(3, 600)])] == [1, 2, 3]
    assert seam.met
    unbounded = Seam(hold_limit=100)
    for seq in range(1, 4):
        unbounded.hold(msg(seq, 600))
    assert len(unbounded._held) == 3
