"""End to end: real proxy and writer processes, a real SQLite file, real signals."""

from __future__ import annotations

import json
import signal
import time

import msgpack
import pytest
import zmq

from bus import protocol
from bus.client import BusTimeout, Publisher, Subscriber
from tests.conftest import (ENDPOINT_VARS, HOLD_ROWS, NEVER_MS, Bus, query, wait_for,
                            wait_until_delivered)


def test_published_message_is_stored_with_its_meta(bus: Bus) -> None:
    before = time.time_ns()
    with Publisher(bus.config(), producer_id="orders-1") as pub:
        assert pub.publish("orders.new", b'{"id": 7}', content_type="application/json",
                           headers={"trace": "abc"}) == 1
        assert pub.publish("orders.new", b'{"id": 8}') == 2
    bus.wait_count(2, "orders.")
    rows = query(bus.db, "SELECT topic, payload, meta, producer_id, producer_seq, publish_ns,"
                         " committed_ns FROM messages ORDER BY id")
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [
        ("orders.new", b'{"id": 7}', "orders-1", 1), ("orders.new", b'{"id": 8}', "orders-1", 2)]
    meta = msgpack.unpackb(rows[0][2])
    assert meta["content_type"] == "application/json" and meta["headers"] == {"trace": "abc"}
    assert before <= rows[0][5] <= rows[0][6] <= time.time_ns()


def test_message_without_any_subscriber_is_stored(bus: Bus) -> None:
    # A subscriber to another prefix exists, none to this topic.
    with Subscriber(["elsewhere."], bus.config()):
        with Publisher(bus.config()) as pub:
            pub.publish("nobody.listens", b"still kept")
        bus.wait_count(1, "nobody.")
    assert query(bus.db, "SELECT payload FROM messages WHERE topic = 'nobody.listens'") == \
        [(b"still kept",)]


def test_first_message_of_a_fresh_publisher_is_not_lost(bus: Bus) -> None:
    # One publisher per message, each closed right after: every first message
    # must survive ZeroMQ's slow-joiner window.
    for i in range(5):
        with Publisher(bus.config(), producer_id=f"fresh-{i}") as pub:
            pub.publish("fresh.one", str(i))
    bus.wait_count(5, "fresh.")
    assert sorted(r[0] for r in query(bus.db, "SELECT producer_id FROM messages")) == \
        [f"fresh-{i}" for i in range(5)]


def test_bus_cli_publish_once_then_the_row_is_there(bus: Bus) -> None:
    result = bus.cli("publish", "cli.once", '{"px": 101.5}', "--json", "--producer-id", "cli")
    assert result.returncode == 0, result.stderr
    assert "published 1 message to cli.once" in result.stderr
    bus.wait_count(1, "cli.")
    [(payload, producer, seq, meta)] = query(
        bus.db, "SELECT payload, producer_id, producer_seq, meta FROM messages")
    assert json.loads(payload) == {"px": 101.5}
    assert (producer, seq) == ("cli", 1)
    assert msgpack.unpackb(meta)["content_type"] == protocol.CONTENT_JSON


def test_bus_cli_publish_reads_stdin_lines_and_count(bus: Bus) -> None:
    result = bus.cli("publish", "cli.lines", "--msgpack", input='{"a": 1}\n{"a": 2}\n[3]\n')
    assert result.returncode == 0, result.stderr
    result = bus.cli("publish", "cli.count", "x" * 100, "--count", "300", "--rate", "0")
    assert result.returncode == 0, result.stderr
    bus.wait_count(3, "cli.lines")
    bus.wait_count(300, "cli.count")
    payloads = [msgpack.unpackb(r[0]) for r in
                query(bus.db, "SELECT payload FROM messages WHERE topic='cli.lines' ORDER BY id")]
    assert payloads == [{"a": 1}, {"a": 2}, [3]]
    seqs = [r[0] for r in query(bus.db, "SELECT producer_seq FROM messages "
                                        "WHERE topic='cli.count' ORDER BY id")]
    assert seqs == list(range(1, 301))


def test_bus_cli_publish_rejects_bad_arguments(bus: Bus) -> None:
    bad_json = bus.cli("publish", "t", "{not json", "--json")
    assert bad_json.returncode == 2 and "--json needs JSON" in bad_json.stderr
    bad_topic = bus.cli("publish", "x" * 300, "data")
    assert bad_topic.returncode == 2 and "topic_too_long" in bad_topic.stderr


def test_publish_without_a_proxy_or_a_writer_fails_clearly(make_bus) -> None:
    bus = make_bus(BUS_REQUEST_TIMEOUT_MS=300)
    result = bus.cli("publish", "t", "data")
    assert result.returncode == 1
    assert "did not open a producer session" in result.stderr and \
        "bus-writer running" in result.stderr
    with pytest.raises(BusTimeout, match="bus-writer running"):
        Publisher(bus.config(), connect_timeout=0.2).connect()
    bus.start_writer()
    result = bus.cli("publish", "t", "data")
    assert result.returncode == 1
    assert "did not subscribe" in result.stderr and "bus-proxy running" in result.stderr


def test_tail_prints_what_is_published_after_it_started(bus: Bus) -> None:
    tail = bus.run("tail", "demo.", "--json")
    plain = bus.run("tail", "demo.")
    with Publisher(bus.config(), producer_id="demo") as pub:
        # A SUB's subscription reaches the proxy asynchronously: publish probes
        # until both tails show one, then the messages under test.
        def both_see_a_probe() -> bool:
            pub.publish("demo.probe", b"probe")
            time.sleep(0.05)
            return any("demo.probe" in ln for ln in tail.stdout.collect()) and \
                any("demo.probe" in ln for ln in plain.stdout.collect())
        wait_for(both_see_a_probe, message="tail to receive a probe")
        first = pub.publish("demo.real", msgpack.packb({"n": 1}),
                            content_type=protocol.CONTENT_MSGPACK)
        pub.publish("other.topic", b"not for this tail")
        pub.publish("demo.real", "text two")
    line = tail.stdout.wait_line(lambda ln: "text two" in ln)
    records = [json.loads(ln) for ln in tail.stdout.collect() if "demo.real" in ln]
    assert [r["payload"] for r in records] == [{"n": 1}, "text two"]
    assert records[0]["meta"]["seq"] == first and records[0]["meta"]["producer"] == "demo"
    assert "other.topic" not in "\n".join(tail.stdout.collect())
    assert json.loads(line)["topic"] == "demo.real"
    human = plain.stdout.wait_line(lambda ln: "text two" in ln)
    assert f"demo.real demo#{first + 2} text two" in human
    assert any('demo.real demo#%d {"n": 1}' % first in ln for ln in plain.stdout.collect())
    assert tail.stop(signal.SIGTERM) == 0
    assert plain.stop(signal.SIGINT) == 130  # what a shell expects after Ctrl-C


def test_tail_stops_after_n_messages(bus: Bus) -> None:
    tail = bus.run("tail", "count.", "-n", "3")
    with Publisher(bus.config()) as pub:
        def tail_has_exited_or_publish() -> bool:
            pub.publish("count.x", b"m")
            return tail.popen.poll() is not None
        wait_for(tail_has_exited_or_publish, interval=0.05, message="tail -n 3 to exit")
    assert tail.wait() == 0
    assert len([ln for ln in tail.stdout.collect() if "count.x" in ln]) == 3


def test_library_subscriber_yields_topic_payload_meta(bus: Bus) -> None:
    with Subscriber(["lib."], bus.config()) as sub, \
            Publisher(bus.config(), producer_id="lib") as pub:
        wait_until_delivered(pub, sub, "lib.probe")
        seq = pub.publish("lib.event", b"\x00\xffbinary")
        msg = sub.receive(timeout=5)
        while msg is not None and msg.topic == "lib.probe":  # probes still in flight
            msg = sub.receive(timeout=5)
    assert msg is not None
    assert (msg.topic, msg.payload, msg.producer, msg.seq) == ("lib.event", b"\x00\xffbinary",
                                                               "lib", seq)
    assert isinstance(msg.time_ns, int)


def test_plain_zmq_pub_without_meta_is_stored(bus: Bus) -> None:
    # What a C, Go or JavaScript client with a bare PUB socket does.
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(bus["BUS_PUB_ENDPOINT"])
    try:
        # A PUB cannot see when the proxy's subscription arrives: retry a probe.
        wait_for(lambda: pub.send_multipart([b"raw.probe", b""]) or bus.count("raw.probe"),
                 interval=0.05, message="a plain PUB probe to be stored")
        for i in range(3):
            pub.send_multipart([b"raw.trade", b"price=%d" % i])
        bus.wait_count(3, "raw.trade")
    finally:
        pub.close(linger=0)
        ctx.term()
    rows = query(bus.db, "SELECT payload, meta, producer_id, producer_seq, publish_ns"
                         " FROM messages WHERE topic = 'raw.trade' ORDER BY id")
    assert rows == [(b"price=%d" % i, None, None, None, None) for i in range(3)]


def test_bus_cli_up_runs_all_three_and_ctrl_c_stores_everything(make_bus) -> None:
    bus = make_bus(BATCH_FLUSH_INTERVAL_MS=NEVER_MS, **HOLD_ROWS)
    up = bus.run("up")
    up.stdout.wait_line(lambda ln: ln == "Ctrl-C stops all three.")
    shown = "\n".join(up.stdout.collect())
    for name in ENDPOINT_VARS:
        if name != "BUS_ANCHOR_CONTROL_ENDPOINT":  # `up` runs no anchor worker
            assert f"{bus[name]}   ({name})" in shown
    assert bus.db in shown
    with Publisher(bus.config()) as pub:
        for i in range(50):
            pub.publish("up.t", b"%d" % i)
    assert bus.count() == 0, "nothing committed yet: ten-minute interval, no low-load flush"
    assert up.stop(signal.SIGINT) == 0, up.stderr.collect()
    assert bus.count("up.t") == 50
    assert "bus stopped" in up.stderr.collect()[-1]


def test_publisher_refuses_what_the_writer_would_not_store(bus: Bus) -> None:
    with Publisher(bus.config(), producer_id="strict") as pub:
        for topic, payload, reason in (("$bus.ack", b"", "reserved_topic"),
                                       ("t" * 300, b"", "topic_too_long"),
                                       ("\x01t", b"", "topic_control_char"),
                                       ("big", b"x" * (1 << 20), "message_too_large")):
            with pytest.raises(protocol.ProtocolError) as err:
                pub.publish(topic, payload)
            assert err.value.reason == reason
        assert pub.publish("ok.after", b"fine") == 1, "refused messages take no sequence"
    bus.wait_count(1, "ok.")
    result = bus.cli("publish", "$bus.fake", "x")
    assert result.returncode == 2 and "reserved_topic" in result.stderr


def test_the_processes_up_starts_say_where_each_of_their_settings_came_from(make_bus) -> None:
    """`up` passed every setting to its children in their environment, so
    `config --running` said "environment" for a flag, a file and a default
    alike. Now each child reads up's file and environment and takes its flags."""
    bus = make_bus(BATCH_FLUSH_INTERVAL_MS=20)  # the environment's
    config = bus.tmp_path / "bus.toml"
    config.write_text("BUS_MAX_TOPIC_BYTES = 300\n")
    up = bus.run("--config", "bus.toml", "up", "--batch-size", "7", "--no-batch-write-enabled")
    up.stdout.wait_line(lambda ln: ln == "Ctrl-C stops all three.")
    running = bus.cli("config", "--running", "--json")
    assert running.returncode == 0, running.stderr
    writer = json.loads(running.stdout)["writer"]["settings"]
    assert writer["BATCH_SIZE"] == {"value": 7, "from": "flag --batch-size"}
    assert writer["BATCH_WRITE_ENABLED"] == {"value": False,
                                             "from": "flag --batch-write-enabled"}
    assert writer["BATCH_FLUSH_INTERVAL_MS"] == {"value": 20,
                                                 "from": "environment BATCH_FLUSH_INTERVAL_MS"}
    assert writer["BUS_MAX_TOPIC_BYTES"] == {"value": 300, "from": f"config file {config}"}
    assert writer["BUS_LOG_LEVEL"]["from"] == "default"
    assert up.stop(signal.SIGINT) == 0, up.stderr.collect()
