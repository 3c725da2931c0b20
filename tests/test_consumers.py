"""Durable consumers (issue #3, part 5): Subscriber(durable=NAME) and
`bus-cli tail --durable NAME` resume after the last message acknowledged,
across restarts of the consumer and of every bus process; the writer stores
the positions and `stats` shows each consumer's lag."""

from __future__ import annotations

import json
import time

import pytest

from bus.client import BusError, ControlClient, Publisher, Subscriber
from tests.conftest import Bus, execute, free_port, query, wait_for
from tests.test_trust import vm_kib


def publish(bus: Bus, topic: str, count: int, producer: str = "src") -> None:
    with Publisher(bus.config(), producer_id=producer) as pub:
        for i in range(count):
            pub.publish(topic, b"%d" % i)
        pub.flush(timeout=10)


def positions(bus: Bus) -> dict[str, int]:
    return dict(query(bus.db, "SELECT name, last_id FROM consumers"))


def test_tail_durable_resumes_after_the_last_printed_message(bus: Bus) -> None:
    publish(bus, "dur.t", 100)
    first = bus.cli("tail", "dur.", "--durable", "audit", "--from-id", "1", "-n", "40", "--json")
    assert first.returncode == 0, first.stderr
    ids = [json.loads(line)["id"] for line in first.stdout.splitlines()]
    assert ids == list(range(1, 41))
    second = bus.cli("tail", "dur.", "--durable", "audit", "-n", "40", "--json")
    assert [json.loads(line)["id"] for line in second.stdout.splitlines()] == list(range(41, 81))
    # --from-id only places a new consumer; a known one resumes where it was.
    third = bus.cli("tail", "dur.", "--durable", "audit", "--from-id", "1", "-n", "20", "--json")
    assert [json.loads(line)["id"] for line in third.stdout.splitlines()] == list(range(81, 101))
    wait_for(lambda: positions(bus).get("audit") == 100, message="position 100 committed")


def test_a_new_durable_consumer_starts_at_the_newest_message(bus: Bus) -> None:
    publish(bus, "new.t", 5)
    with Subscriber(["new."], bus.config(), durable="late") as sub:
        assert sub.receive(timeout=0.3) is None, "what was stored before it is not replayed"
        publish(bus, "new.t", 2, producer="second")
        got = [sub.receive(timeout=5), sub.receive(timeout=5)]
    assert [(m.producer, m.payload, m.id) for m in got] == [("second", b"0", 6),
                                                            ("second", b"1", 7)]


def test_explicit_acks_survive_a_restart_of_every_bus_process(make_bus) -> None:
    bus = make_bus().start()
    publish(bus, "acked.t", 30)
    with Subscriber(["acked."], bus.config(), durable="worker", after_id=0,
                    auto_ack=False) as sub:
        msgs = [sub.receive(timeout=5) for _ in range(12)]
        sub.ack(msgs[9])  # processed 10; 11 and 12 were received, not acknowledged
    assert bus.stop() == (0, 0)
    assert positions(bus) == {"worker": 10}

    bus.start()
    stats = bus.writer_stats()["consumers"]
    assert stats == {"count": 1, "positions": {"worker": {
        "last_id": 10, "lag": 20, "lag_exact": True, "behind": 20, "prefixes": ["acked."],
        "updated_ns": stats["positions"]["worker"]["updated_ns"]}}}
    with Subscriber(["acked."], bus.config(), durable="worker") as sub:
        assert [sub.receive(timeout=5).id for _ in range(20)] == list(range(11, 31))
        assert sub.receive(timeout=0.3) is None
    assert bus.writer_stats()["consumers"]["positions"]["worker"]["lag"] == 0


def test_durable_consumer_follows_commits_and_only_its_prefixes(bus: Bus) -> None:
    with Subscriber(["mine."], bus.config(), durable="follower") as sub:
        with Publisher(bus.config(), producer_id="mixed") as pub:
            for i in range(200):
                pub.publish("mine.t" if i % 2 else "other.t", b"%d" % i)
            got = [sub.receive(timeout=5) for _ in range(100)]
        assert [m.payload for m in got] == [b"%d" % i for i in range(1, 200, 2)]
        assert all(m.topic == "mine.t" for m in got)
        assert sub.receive(timeout=0.3) is None


def test_consumer_requests_are_validated_and_bounded(make_bus) -> None:
    bus = make_bus(BUS_MAX_CONSUMERS=2).start()
    publish(bus, "val.t", 10)
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"]) as client:
        for args in ({"consumer": "", "last_id": 1}, {"consumer": "x" * 200, "last_id": 1},
                     {"consumer": "a\nb", "last_id": 1}, {"consumer": "ok", "last_id": -1},
                     {"consumer": "ok", "last_id": "7"}, {"last_id": 1},
                     {"consumer": "ok", "last_id": 11}):  # beyond the newest: would skip
            with pytest.raises(BusError) as err:
                client.request("consumer_ack", args)
            assert err.value.code == "bad_request"
        assert client.request("consumer_ack", {"consumer": "a", "last_id": 5})["last_id"] == 5
        assert client.request("consumer_ack", {"consumer": "a", "last_id": 3})["last_id"] == 5, \
            "a late ack never moves a position back"
        client.request("consumer_ack", {"consumer": "b", "last_id": 1})
        with pytest.raises(BusError) as err:
            client.request("consumer_ack", {"consumer": "c", "last_id": 1})
        assert err.value.code == "too_many_consumers"
        assert client.request("consumer_delete", {"consumer": "b"})["deleted"] is True
        assert client.request("consumer_ack", {"consumer": "c", "last_id": 2})["last_id"] == 2
        assert client.request("consumer_get", {"consumer": "b"})["last_id"] is None
        client.request("flush")
    assert positions(bus) == {"a": 5, "c": 2}
    counted = bus.writer_stats()["control"]
    assert counted["bad_requests"] == 7 and counted["failed"] == {"too_many_consumers": 1}


def test_a_durable_consumer_cannot_start_without_the_writer_and_says_so(make_bus) -> None:
    bus = make_bus(BUS_REQUEST_TIMEOUT_MS=300).start()
    assert bus.writer.stop() == 0
    result = bus.cli("tail", "--durable", "nobody", "-n", "1", "--fail-fast")
    assert result.returncode == 1
    assert "waiting for the writer at" in result.stderr and "is bus-writer running?" in \
        result.stderr and "not answering: writer" in result.stderr
    # Without --fail-fast it says so, waits, and goes on once the writer is back.
    tail = bus.run("tail", "--durable", "nobody", "-n", "1")
    tail.stderr.wait_line(lambda line: "waiting for the writer" in line)
    bus.start_writer()
    tail.stderr.wait_line(lambda line: "the writer at" in line and "answers again" in line)
    with Publisher(bus.config(), producer_id="back") as pub:
        wait_for(lambda: pub.publish("back.t", b"x") and tail.popen.poll() is not None,
                 message="the tail to print one message and exit")
    assert tail.popen.returncode == 0


def test_tail_says_when_nothing_answers_at_its_subscriber_endpoint(bus: Bus) -> None:
    """The proxy's subscriber side answers no ping: with a wrong
    --sub-endpoint, tail waited silently forever."""
    wrong = f"tcp://127.0.0.1:{free_port()}"
    result = bus.cli("tail", "--sub-endpoint", wrong, "--fail-fast")
    assert result.returncode == 1, result.stderr
    assert f"waiting for the proxy's subscriber side at {wrong}" in result.stderr
    assert "not answering: proxy's subscriber side" in result.stderr
    tail = bus.run("tail", "--fail-fast", "-n", "1")
    with Publisher(bus.config(), producer_id="subside") as pub:
        wait_for(lambda: pub.publish("subside.t", b"x") and tail.popen.poll() is not None,
                 message="the tail to print one message and exit")
    assert tail.popen.returncode == 0 and tail.stderr.collect() == []


def test_lag_counts_only_the_messages_of_the_consumer_s_own_prefixes(bus: Bus) -> None:
    """Issue 25, item 4: `consumers ls` counted every message stored after a
    consumer's position (2,513 shown, 2,512 of its prefix)."""
    publish(bus, "mine.a", 3)
    with Subscriber(["mine."], bus.config(), durable="own", after_id=0) as sub:
        assert sub.receive(timeout=5).payload == b"0"
        sub.ack()
    publish(bus, "other.t", 4, producer="elsewhere")
    publish(bus, "mine.b", 2, producer="again")
    publish(bus, "minefield", 1, producer="near")   # 'mine' without the dot: not its prefix
    out = bus.cli("consumers", "ls", "--json")
    assert out.returncode == 0, out.stderr
    position = json.loads(out.stdout)["positions"]["own"]
    assert position["lag"] == 2 + 2, position
    listed = bus.cli("consumers", "ls")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:3] == ["own", "1", "4"], listed.stdout


def test_lag_is_counted_on_a_bounded_window_and_says_when_it_is_a_lower_bound(bus: Bus) -> None:
    """No index on topic: a lag is counted among the 10,000 ids after the
    position at most (writer/consumers.py, LAG_COUNT_IDS), so that `stats`
    stays cheap however far behind a consumer is."""
    with Publisher(bus.config(), producer_id="many") as pub:
        for i in range(10_010):
            pub.publish("far.t" if i % 2 else "near.t", b"x")
        pub.flush(timeout=30)
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"]) as client:
        for args in ({"prefixes": "far."}, {"prefixes": []}, {"prefixes": ["a\x00"]},
                     {"prefixes": ["p"] * 65}):
            with pytest.raises(BusError) as err:
                client.request("consumer_ack", {"consumer": "x", "last_id": 1, **args})
            assert err.value.code == "bad_request", args
        client.request("consumer_ack", {"consumer": "far", "last_id": 0, "prefixes": ["far."]})
        client.request("consumer_ack", {"consumer": "all", "last_id": 10, "prefixes": [""]})
        client.request("consumer_ack", {"consumer": "close", "last_id": 10_000,
                                        "prefixes": ["far.", "near.", "far."]})
        client.request("consumer_ack", {"consumer": "unsaid", "last_id": 10_005})
    positions = bus.writer_stats()["consumers"]["positions"]
    assert {name: (p["lag"], p["lag_exact"], p["behind"], p["prefixes"])
            for name, p in positions.items()} == {
        "far": (5_000, False, 10_010, ["far."]),      # counted on ids 1-10,000 only
        "all": (10_000, True, 10_000, []),
        "close": (10, True, 10, ["far.", "near."]),
        "unsaid": (5, True, 5, None)}                  # never said: every topic
    listed = bus.cli("consumers", "ls")
    assert [line.split()[:4] for line in listed.stdout.splitlines()[1:]] == [
        ["far", "0", ">=5,000", "10,010"], ["all", "10", "10,000", "10,000"],
        ["close", "10,000", "10", "10"], ["unsaid", "10,005", "5", "5"]], listed.stdout


def test_a_consumer_s_many_prefixes_do_not_make_stats_costly(make_bus) -> None:
    """A reader key's consumer_ack may name 64 prefixes: with no index on
    topic each id of a lag's window is compared with every one, so a window
    budget in ids let ten such consumers make one `stats` (which the writer
    also builds every second with HTTP on, in its loop) examine 100,000 ids
    x 64 prefixes, about 40 times one prefix's cost: ingest waited that long.
    The budget is in ids x prefixes."""
    bus = make_bus()
    bus.start_writer()
    ids = 100_000
    payload, topic = (("x'00'", "i % 97") if bus.engine == "sqlite"
                      else ("decode('00', 'hex')", "mod(i, 97)"))
    execute(bus.db, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE "
                    f"i < {ids}) INSERT INTO messages (id, topic, payload, committed_ns) "
                    f"SELECT i, 'noise.' || ({topic}), {payload}, i FROM n")
    wide = [f"wanted.{k}." + "p" * 50 for k in range(64)]  # 4,096 characters at most

    def stats_seconds(prefixes: list[str]) -> float:
        """The fastest of three stats, with ten consumers 10,000 ids apart."""
        with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=20_000) as client:
            for i in range(10):
                client.request("consumer_delete", {"consumer": f"c{i}"})
                client.request("consumer_ack", {"consumer": f"c{i}", "last_id": i * 10_000,
                                                "prefixes": prefixes})
            took = []
            for _ in range(3):
                started = time.perf_counter()
                lags = client.request("stats")["consumers"]["positions"]
                took.append(time.perf_counter() - started)
        assert {name: p["prefixes"] for name, p in lags.items()} == {
            f"c{i}": prefixes for i in range(10)}
        return min(took)

    narrow = stats_seconds(["wanted."])
    many = stats_seconds(wide)
    assert many < 5 * narrow + 0.05, (many, narrow)


def test_what_the_writer_keeps_of_a_consumer_s_prefixes_is_bounded_in_bytes(make_bus) -> None:
    """The writer keeps each consumer's prefixes (BUS_MAX_CONSUMERS of them,
    in memory and in every stats) up to 4,096 of them together: counted in
    characters, 64 prefixes of 64 four-byte characters were kept, about 21 KB
    a consumer in the writer (UCS-4 strings, one object each), and 16 KB in
    its database: 10,000 such consumers, any local process's without CURVE,
    took 210 MB of the writer's 384 MiB BUS_WRITER_MEMORY_LIMIT_BYTES, from
    then on and after every restart. The bound is in bytes (UTF-8)."""
    bus = make_bus()
    writer = bus.start_writer()
    wide = ["\U0001d11e" * 63 + chr(0x10000 + k) for k in range(64)]
    consumers = 2000
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=10_000) as client:
        for i in range(100):  # the allocator's and the connection's first growth
            client.request("consumer_ack", {"consumer": f"warm{i}", "last_id": 0,
                                            "prefixes": ["warm."]})
        client.request("flush")
        before = vm_kib(writer.pid, "VmRSS")
        for i in range(consumers):
            client.request("consumer_ack", {"consumer": f"c{i}", "last_id": 0,
                                            "prefixes": wide})
        client.request("flush")
        grown = vm_kib(writer.pid, "VmRSS") - before
    assert grown < consumers * 8, f"{grown} KiB for {consumers} consumers"
