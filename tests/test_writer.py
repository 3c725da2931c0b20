"""The writer's batching contract, metrics, shutdown and bad input, on real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import msgpack
import pytest
import zmq

from bus import protocol
from bus.client import BusError, ControlClient, Publisher, Subscriber
from tests.conftest import (BUS_CLI, DEADLINE, HOLD_ROWS, LOCKED_ERROR, NEVER_MS, Bus, RawProducer,
                            WriteLock, execute, integrity_ok, query, wait_for,
                            wait_until_delivered)
from tests.test_anchor import cpu_seconds
from tests.test_hostile import publish_acked

# A flush interval of ten minutes: anything stored before then was flushed by
# size, by request or by shutdown. A low-load threshold of 0 turns off the
# "flush at once when idle" path.


def publish_many(bus: Bus, topic: str, n: int, producer_id: str = "p") -> None:
    """n messages with seq 1..n; no acknowledgement subscription to count in batches."""
    producer = RawProducer(bus, producer_id)
    try:
        producer.send(*range(1, n + 1), topic=topic.encode())
    finally:
        producer.close()


def wait_received(bus: Bus, n: int) -> dict:
    return wait_for(lambda: (s := bus.writer_stats())["ingest"]["messages_received"] >= n and s,
                    message=f"writer to receive {n} messages")


def test_flush_by_size_and_everything_else_on_sigterm(make_bus) -> None:
    bus = make_bus(BATCH_SIZE=10, BATCH_FLUSH_INTERVAL_MS=NEVER_MS,
                   **HOLD_ROWS).start()
    publish_many(bus, "size.t", 25)
    stats = wait_received(bus, 25)
    assert bus.count() == 20, "two full batches committed, five rows waiting"
    batch = stats["batch"]
    assert (batch["flush_by_size"], batch["flush_by_time"], batch["db_queue_size"]) == (2, 0, 5)
    assert batch["buffer_sizes"]["messages"] == 5
    assert bus.stop() == (0, 0)
    assert bus.count() == 25
    assert [r[0] for r in query(bus.db, "SELECT producer_seq FROM messages ORDER BY id")] == \
        list(range(1, 26))
    closed = [e for e in bus.writer.log_events() if e["event"] == "database_closed"]
    assert closed and closed[0]["last_message_id"] == 25


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_flushes_a_partial_batch_with_minutes_interval(make_bus, sig) -> None:
    bus = make_bus(BATCH_SIZE=1000, BATCH_FLUSH_INTERVAL_MS=NEVER_MS,
                   **HOLD_ROWS).start()
    publish_many(bus, "term.t", 7)
    wait_received(bus, 7)
    assert bus.count() == 0
    assert bus.writer.stop(sig) == 0
    assert bus.count("term.t") == 7
    assert bus.proxy.stop() == 0


def test_stopping_the_proxy_first_loses_nothing_in_flight(make_bus) -> None:
    # The order systemd and `bus-cli up` use: everything the proxy captured
    # reaches the writer, which stores it before exiting.
    bus = make_bus(BATCH_SIZE=500, BATCH_FLUSH_INTERVAL_MS=NEVER_MS).start()
    publish_many(bus, "inflight.t", 20_000)
    assert bus.stop() == (0, 0)
    assert bus.count("inflight.t") == 20_000


def test_proxy_forwards_what_publishers_already_sent_before_it_exits(make_bus) -> None:
    # Publishers send while the proxy is frozen (SIGSTOP); it is then asked to
    # stop as it wakes up, with all of that still unread in its sockets.
    bus = make_bus().start()
    with Publisher(bus.config(), producer_id="frozen", linger_ms=10_000) as pub:
        os.kill(bus.proxy.pid, signal.SIGSTOP)
        try:
            for i in range(5000):
                pub.publish("frozen.t", b"%d" % i)
            bus.proxy.send_signal(signal.SIGTERM)
        finally:
            os.kill(bus.proxy.pid, signal.SIGCONT)
        assert bus.proxy.wait() == 0
    assert bus.writer.stop() == 0
    assert bus.count("frozen.t") == 5000


def test_flush_by_time(make_bus) -> None:
    bus = make_bus(BATCH_SIZE=1000, BATCH_FLUSH_INTERVAL_MS=200,
                   **HOLD_ROWS).start()
    publish_many(bus, "time.t", 3)
    bus.wait_count(3, "time.t", timeout=5)
    batch = bus.writer_stats()["batch"]
    assert batch["flush_by_time"] >= 1 and batch["flush_by_size"] == 0
    assert batch["flush_by_low_load"] == 0


def test_low_load_flushes_when_idle_without_waiting_for_the_timer(make_bus) -> None:
    bus = make_bus(BATCH_FLUSH_INTERVAL_MS=NEVER_MS).start()  # default threshold 100 msg/s
    publish_many(bus, "quiet.t", 1)
    bus.wait_count(1, "quiet.t", timeout=5)
    stats = bus.writer_stats()
    assert stats["batch"]["flush_by_low_load"] >= 1 and stats["batch"]["flush_by_time"] == 0
    assert stats["load"]["is_low_load"] is True


def test_flush_request_commits_the_buffer(make_bus) -> None:
    bus = make_bus(BATCH_SIZE=1000, BATCH_FLUSH_INTERVAL_MS=NEVER_MS,
                   **HOLD_ROWS).start()
    publish_many(bus, "req.t", 4)
    wait_received(bus, 4)
    assert bus.count() == 0
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"]) as client:
        assert client.request("flush") == {"flushed": 4}
    assert bus.count("req.t") == 4  # committed before the reply
    assert bus.writer_stats()["batch"]["flush_by_request"] == 1


def test_sequential_mode_commits_each_message_alone(make_bus) -> None:
    bus = make_bus(BATCH_WRITE_ENABLED=False, BATCH_SIZE=100).start()
    publish_many(bus, "seq.t", 20)
    bus.wait_count(20, "seq.t")
    batch = wait_for(lambda: (b := bus.writer_stats()["batch"])["total_writes"] >= 20 and b,
                     message="20 writes counted")
    assert batch["config"]["enabled"] is False
    assert batch["max_batch_size"] == 1 and batch["min_batch_size"] == 1
    assert batch["total_flushes"] == batch["total_writes"] >= 20
    assert batch["total_batched_items"] == 0
    # Each row has its own commit time.
    assert len({r[0] for r in query(bus.db, "SELECT committed_ns FROM messages")}) == 20


def test_stats_report_the_seed_metrics_and_proxy_counters(make_bus) -> None:
    bus = make_bus(BATCH_SIZE=10, BATCH_FLUSH_INTERVAL_MS=NEVER_MS,
                   **HOLD_ROWS).start()
    publish_many(bus, "stats.t", 30)
    bus.wait_count(30, "stats.t")
    result = bus.cli("stats", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    batch, load = stats["writer"]["batch"], stats["writer"]["load"]
    for field in ("total_flushes", "total_writes", "total_batched_items", "flush_by_size",
                  "flush_by_time", "flush_by_shutdown", "avg_batch_size", "max_batch_size",
                  "min_batch_size", "db_queue_size", "buffer_sizes", "config"):
        assert field in batch, field
    assert set(batch["buffer_sizes"]) == {"messages", "consumptions", "subscriptions"}
    assert batch["config"] == {"enabled": True, "batch_size": 10, "flush_interval_ms": NEVER_MS,
                               "max_buffer_size": 10000}
    assert (batch["total_flushes"], batch["total_writes"], batch["flush_by_size"]) == (3, 30, 3)
    assert batch["total_batched_items"] == 30
    assert (batch["avg_batch_size"], batch["max_batch_size"], batch["min_batch_size"]) == \
        (10.0, 10, 10)
    assert set(load) == {"requests_per_second", "is_low_load", "threshold", "window_seconds"}
    assert load["threshold"] == 0 and load["window_seconds"] == 2
    assert stats["writer"]["ingest"]["messages_received"] == 30
    assert stats["writer"]["database"]["last_message_id"] == 30
    proxy = stats["proxy"]
    # Each message is three frames (topic, payload, meta) in from the publisher.
    assert proxy["frontend_frames_in"] >= 90 and proxy["frontend_bytes_in"] > 30 * 10
    human = bus.cli("stats")
    assert human.returncode == 0 and "[writer]" in human.stdout and "flush_by_size: 3" in \
        human.stdout and "[proxy]" in human.stdout
    # The batch's own config (the seed's fields) is shown; the settings are not.
    assert "      batch_size: 10" in human.stdout and "BUS_DB" not in human.stdout, human.stdout


def test_stats_exits_non_zero_when_a_process_is_down(make_bus) -> None:
    bus = make_bus(BUS_REQUEST_TIMEOUT_MS=300)
    bus.start_writer()
    result = bus.cli("stats", "--json")
    assert result.returncode == 1
    out = json.loads(result.stdout)
    assert "batch" in out["writer"] and "no reply" in out["proxy"]["error"]


def test_bad_input_is_counted_and_valid_messages_around_it_are_stored(make_bus) -> None:
    bus = make_bus(BUS_MAX_MESSAGE_BYTES=4096, BUS_MAX_TOPIC_BYTES=64).start()
    good_meta = protocol.encode_meta("raw", 1)
    bad = {
        "too_few_frames": [b"only.one.frame"],
        "too_many_frames": [b"t", b"p", good_meta, b"extra"],
        "meta_not_msgpack": [b"t", b"p", b"\xc1"],
        "meta_not_map": [b"t", b"p", msgpack.packb([1, 2, 3])],
        "meta_bad_value": [b"t", b"p", msgpack.packb({"seq": "one"})],
        "message_too_large": [b"t", b"x" * 5000],
        "topic_not_utf8": [b"t\xff\xfe.topic", b"p"],
        "topic_too_long": [b"t" * 65, b"p"],
    }
    # Dropped by the proxy's own socket (it takes in only the first bytes a
    # storable topic can have): never seen by the writer, so not counted there.
    dropped = [[b"", b"p"], [b"\x02ctl", b"p"], [b"\x01sub"], [b"\xff\xfe.topic", b"p"],
               [b"$bus.ack.raw", b"p"]]
    with RawProducer(bus, "raw") as raw:
        for i, frames in enumerate(bad.values()):
            raw.send_frames([b"good.before", b"%d" % i], frames,
                            raw.frames(i + 1, b"good.after", b"%d" % i))
        raw.send_frames(*dropped)
        # The same bad message many times: counted each time, logged at a bounded rate.
        raw.send_frames(*[bad["meta_not_map"]] * 200, [b"good.last", b"end"])
    bus.wait_count(2 * len(bad) + 1, "good.")
    assert bus.count() == 2 * len(bad) + 1, "no bad message was stored"
    stats = wait_for(lambda: (s := bus.writer_stats())["ingest"]["rejected_total"] >= len(bad) + 200
                     and s,
                     message="rejects counted")
    expected = dict.fromkeys(bad, 1)
    expected["meta_not_map"] = 201
    assert stats["ingest"]["rejected"] == expected
    rejected_logs = [e for e in bus.writer.log_events() if e["event"] == "message_rejected"]
    assert {e["reason"] for e in rejected_logs} == set(bad)
    assert len(rejected_logs) < 30, "rejects are logged at a bounded rate"
    assert all(e["level"] == "warning" for e in rejected_logs)
    assert bus.writer.popen.poll() is None and bus.proxy.popen.poll() is None
    assert bus.stop() == (0, 0)


def test_reserved_topics_are_not_stored(bus: Bus) -> None:
    with RawProducer(bus, "raw") as raw:
        raw.send_frames([b"$bus.fake", b"x"], [b"after.reserved", b"y"])
    bus.wait_count(1, "after.")
    assert bus.count("$") == 0
    # Pushed straight into the capture pipe (the proxy takes none in): refused there.
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(bus["BUS_CAPTURE_ENDPOINT"])
    try:
        push.send_multipart([b"$bus.fake", b"x"])
        push.send_multipart([b"after.pushed", b"y"])
        bus.wait_count(1, "after.pushed")
    finally:
        push.close(linger=1000)
        ctx.term()
    assert bus.count("$") == 0
    assert bus.writer_stats()["ingest"]["rejected"] == {"reserved_topic": 1}


def test_bad_control_requests_get_an_error_reply(bus: Bus) -> None:
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.connect(bus["BUS_CONTROL_ENDPOINT"])
    try:
        for raw, code in ((b"\xc1", "bad_request"), (msgpack.packb([1]), "bad_request"),
                          (protocol.encode_request(9, "drop_tables"), "unknown_command")):
            req.send(raw)
            assert req.poll(3000)
            reply = msgpack.unpackb(req.recv())
            assert reply["ok"] is False and reply["error"]["code"] == code
        assert reply["id"] == 9
    finally:
        req.close(linger=0)
        ctx.term()
    assert bus.writer_stats()["control"]["bad_requests"] == 3  # unknown_command too


def test_writer_logs_start_config_and_stop(make_bus) -> None:
    bus = make_bus(BATCH_SIZE=42).start()
    assert bus.stop() == (0, 0)
    events = bus.writer.log_events()
    started = next(e for e in events if e["event"] == "started")
    assert started["config"]["BATCH_SIZE"] == 42 and started["db"] == bus.db
    assert started["process"] == "writer" and "timestamp" in started
    assert [e["event"] for e in events][-1] == "stopped"
    assert any(e["event"] == "stopping" and e["signal"] == "SIGTERM" for e in events)


def test_live_delivery_goes_on_while_the_writer_is_down(make_bus) -> None:
    # The capture queue to the writer is short (BUS_CAPTURE_HWM, 1,000:
    # fairness, tests/test_fairness.py). With only that, the proxy's loop
    # waited in its capture send after about 1,000 messages of a writer
    # restart, and live delivery with it. Now the proxy holds what it
    # captures while no writer is connected (up to BUS_CAPTURE_HWM_WRITER_DOWN)
    # and sends it, oldest first, once the writer is back: live delivery goes
    # on, nothing is lost, each message is stored once and in order, and the
    # capture goes straight to the writer again afterwards.
    bus = make_bus().start()
    assert bus.config().capture_hwm == 1_000
    with Subscriber(["down."], bus.config()) as sub, \
            Publisher(bus.config(), producer_id="down") as pub:
        wait_until_delivered(pub, sub, "down.probe")
        wait_for(lambda: bus.proxy_stats()["capture"]["state"] == "direct",
                 message="the capture straight to the writer")
        assert bus.writer.stop() == 0
        for i in range(20_000):
            pub.publish("down.data", b"%d" % i)
        live = 0
        while live < 20_000:
            msg = sub.receive(timeout=5)
            assert msg is not None, f"live delivery stopped after {live} messages, writer down"
            live += msg.topic == "down.data"
        capture = bus.proxy_stats()["capture"]
        assert capture["state"] == "holding" and capture["held"] >= 19_000, capture
        assert bus.count("down.data") == 0
        bus.start_writer()
        pub.flush(timeout=30)
        bus.wait_count(20_000, "down.data")
        wait_for(lambda: bus.proxy_stats()["capture"]["state"] == "direct",
                 message="the capture straight to the writer again once it is back")
        assert bus.proxy_stats()["capture"]["held"] == 0
        wait_until_delivered(pub, sub, "down.after")
    assert bus.stop() == (0, 0)
    seqs = [r[0] for r in query(bus.db, "SELECT producer_seq FROM messages "
                                        "WHERE topic = 'down.data' ORDER BY id")]
    assert seqs == list(range(seqs[0], seqs[0] + 20_000)), "each message once, in order"
    assert integrity_ok(bus.db)


def test_writer_down_past_what_the_proxy_holds_loses_nothing(make_bus) -> None:
    # Past BUS_CAPTURE_HWM_WRITER_DOWN messages held, the proxy's loop waits
    # in its send, live delivery with it, and the rest waits in the
    # publisher's pipe at the proxy and in the Publisher. Nothing is lost,
    # and live delivery goes on once the writer is back.
    bus = make_bus(BUS_CAPTURE_HWM_WRITER_DOWN=3_000).start()
    with Subscriber(["short."], bus.config()) as sub, \
            Publisher(bus.config(), producer_id="short") as pub:
        wait_until_delivered(pub, sub, "short.probe")
        assert bus.writer.stop() == 0
        for i in range(20_000):
            pub.publish("short.data", b"%d" % i)
        live = 0
        while (msg := sub.receive(timeout=1)) is not None:
            live += msg.topic == "short.data"
        assert 3_000 <= live < 20_000, f"live delivery waits once 3,000 are held ({live})"
        # Waiting at the bound costs the proxy no CPU (a spill left unread in
        # its poller woke its main loop at once, for ever).
        used = cpu_seconds(bus.proxy.pid)
        time.sleep(2.0)  # the CPU of a process that waits, over a fixed span
        assert cpu_seconds(bus.proxy.pid) - used < 0.5, "the proxy spins while it waits"
        bus.start_writer()
        while live < 20_000:
            msg = sub.receive(timeout=5)
            assert msg is not None, f"live delivery stalled after {live} messages"
            live += msg.topic == "short.data"
        pub.flush(timeout=30)
        bus.wait_count(20_000, "short.data")
    assert bus.stop() == (0, 0)
    seqs = [r[0] for r in query(bus.db, "SELECT producer_seq FROM messages "
                                        "WHERE topic = 'short.data' ORDER BY id")]
    assert seqs == list(range(seqs[0], seqs[0] + 20_000)), "each message once, in order"


def test_a_failed_commit_keeps_its_rows_and_retries(make_bus) -> None:
    # Another process holds the database's write lock: commits fail with
    # SQLITE_BUSY, the writer keeps the rows, stays responsive, and stores them
    # once the lock is gone.
    bus = make_bus(BATCH_SIZE=10, BUS_SQLITE_BUSY_TIMEOUT_MS=50).start()
    producer = RawProducer(bus, "locked")  # its session is committed before the lock
    locker = WriteLock(bus.db)
    try:
        producer.send(*range(1, 26), topic=b"locked.t")
        stats = wait_for(lambda: (s := bus.writer_stats())["batch"]["flush_errors"] >= 2 and s,
                         message="failed flushes counted")
        assert stats["batch"]["total_writes"] == 0
    finally:
        locker.release()
        producer.close()
    bus.wait_count(25, "locked.t")
    stats = wait_for(lambda: (s := bus.writer_stats())["batch"]["db_queue_size"] == 0 and s,
                     message="buffer emptied")
    assert stats["batch"]["total_writes"] == 25
    assert [r[0] for r in query(bus.db, "SELECT producer_seq FROM messages ORDER BY id")] == \
        list(range(1, 26))
    failures = [e for e in bus.writer.log_events() if e["event"] == "flush_failed"]
    assert failures and failures[0]["error_type"] == LOCKED_ERROR[bus.engine]
    assert failures[0]["level"] == "error"


def test_a_second_writer_or_proxy_refuses_to_start(make_bus, tmp_path) -> None:
    bus = make_bus().start()
    # Same database, other endpoints: refused by the database lock.
    other = dict(bus.env, BUS_CAPTURE_ENDPOINT=f"ipc://{tmp_path}/cap",
                 BUS_CONTROL_ENDPOINT=f"ipc://{tmp_path}/ctl",
                 BUS_NOTIFY_ENDPOINT=f"ipc://{tmp_path}/notify")
    second = subprocess.run([BUS_CLI, "writer"], env=other, capture_output=True, text=True,
                            timeout=DEADLINE)
    assert second.returncode == 1
    assert "is open in another bus writer" in second.stderr and "Traceback" not in second.stderr
    # Same endpoints, other database: refused by the endpoint check.
    for cmd in ("writer", "proxy"):
        again = subprocess.run([BUS_CLI, cmd], env=dict(bus.env, BUS_DB=str(tmp_path / "b.db")),
                               capture_output=True, text=True, timeout=DEADLINE)
        assert again.returncode == 1 and "is in use by another process" in again.stderr, cmd
    assert bus.stop() == (0, 0)


def test_ipc_endpoints_are_not_stolen_from_a_running_bus(make_bus, tmp_path) -> None:
    # libzmq would silently unlink and take over an ipc path; the bus checks first.
    run = tmp_path / "run"
    run.mkdir()
    endpoints = {name: f"ipc://{run}/{name.lower()}" for name in
                 ("BUS_PUB_ENDPOINT", "BUS_SUB_ENDPOINT", "BUS_CAPTURE_ENDPOINT",
                  "BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT")}
    bus = make_bus(**endpoints).start()
    for cmd in ("writer", "proxy"):
        again = subprocess.run([BUS_CLI, cmd], env=dict(bus.env, BUS_DB=str(tmp_path / "b.db")),
                               capture_output=True, text=True, timeout=DEADLINE)
        assert again.returncode == 1 and "is in use by another process" in again.stderr, cmd
    publish_many(bus, "ipc.t", 10)
    bus.wait_count(10, "ipc.t")
    assert bus.stop() == (0, 0)


@pytest.mark.parametrize("release_lock", [True, False])
def test_shutdown_retries_a_failed_commit_until_its_deadline(make_bus, release_lock) -> None:
    bus = make_bus(BATCH_SIZE=1000, BATCH_FLUSH_INTERVAL_MS=NEVER_MS, **HOLD_ROWS,
                   BUS_SQLITE_BUSY_TIMEOUT_MS=50, BUS_SHUTDOWN_TIMEOUT_MS=3000).start()
    publish_many(bus, "late.t", 5)
    wait_received(bus, 5)
    assert bus.proxy.stop() == 0
    locker = WriteLock(bus.db)
    try:
        bus.writer.send_signal(signal.SIGTERM)
        wait_for(lambda: any(e["event"] == "flush_failed" for e in bus.writer.log_events()),
                 message="a failed shutdown flush")
        if release_lock:
            locker.release()
        code = bus.writer.wait()
    finally:
        locker.release()
    if release_lock:
        assert code == 0 and bus.count("late.t") == 5
    else:
        assert code == 1 and bus.count("late.t") == 0
        assert any("5 buffered rows could not be committed" in line
                   for line in bus.writer.stderr.collect())


def test_a_database_of_a_newer_bus_is_refused(make_bus) -> None:
    """An older writer would rewrite what it does not know (e.g. consumer owners)."""
    bus = make_bus()
    bus.start_writer()
    bus.writer.stop()
    execute(bus.db, "UPDATE bus_meta SET value = '999' WHERE key = 'schema_version'")
    execute(bus.db, "DROP TABLE subscriptions")  # as a newer schema might
    done = bus.cli("writer", timeout=20)
    assert done.returncode != 0 and "schema 999, newer than this writer" in done.stderr
    assert "Traceback" not in done.stderr
    assert query(bus.db, "SELECT value FROM bus_meta WHERE key = 'schema_version'") == \
        [("999",)], "the refused database is left as it was"
    assert not query(bus.db, "SELECT count(*) FROM subscriptions"), "no table created again"


def test_a_database_holding_someone_elses_tables_of_the_same_names_is_refused(make_bus) -> None:
    """A database shared with other systems may already have a `consumers` or
    a `messages` table of its own: the writer wrote into it and added columns,
    and `db copy --to` emptied it."""
    source = make_bus()
    source.start()
    publish_acked(source, "P", "orders.x", 3)
    assert source.stop() == (0, 0)
    bus = make_bus()
    execute(bus.db, "CREATE TABLE consumers (name TEXT, note TEXT)")
    execute(bus.db, "INSERT INTO consumers VALUES ('billing', 'theirs')")
    for args in (["writer"], ["db", "migrate"], ["db", "copy", "--from", source.db, "--to", bus.db]):
        refused = bus.cli(*args, timeout=30)
        assert refused.returncode == 1, (args, refused.stderr)
        assert "already has tables named consumers but no bus schema version" in refused.stderr
        assert "Traceback" not in refused.stderr
    assert query(bus.db, "SELECT name, note FROM consumers") == [("billing", "theirs")]
    assert not query(bus.db, "SELECT count(*) FROM messages"), "no bus table was created"


@pytest.mark.sqlite_only  # a file
def test_a_file_that_is_not_a_database_is_refused_in_one_line(make_bus, tmp_path) -> None:
    """It crashed with a traceback (issue #12)."""
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a database\n" * 200)
    bus = make_bus(BUS_DB=str(garbage))
    result = subprocess.run([BUS_CLI, "writer"], env=bus.env, capture_output=True, text=True,
                            timeout=DEADLINE)
    assert result.returncode == 1 and "is not a bus database" in result.stderr
    assert "Traceback" not in result.stderr
    assert garbage.read_text() == "not a database\n" * 200


def test_a_nul_in_a_topic_or_producer_id_is_refused_and_costs_no_batch(make_bus) -> None:
    """PostgreSQL's text holds no NUL: one such topic failed its whole batch
    and crashed the writer there. Refused at the edge on both engines; the
    valid messages around it are stored."""
    bus = make_bus().start()
    with RawProducer(bus, "nul-around") as raw:
        raw.send(1)
        raw.send_frames(raw.frames(2, b"idem.a\x00b", b"x"))
        raw.send(3)
        bad_producer = protocol.encode_meta("nul\x00id", 1)
        raw.send_frames([b"idem.t", b"x", bad_producer])
        raw.send(4)
    wait_for(lambda: bus.writer_stats()["ingest"]["rejected_total"] >= 2,
             message="both refused")
    bus.request("BUS_CONTROL_ENDPOINT", "flush")
    assert [r[0] for r in query(bus.db, "SELECT producer_seq FROM messages WHERE"
                                        " producer_id = 'nul-around' ORDER BY id")] == [1, 3, 4]
    assert bus.writer.popen.poll() is None
    with pytest.raises(BusError) as refused:  # a history prefix with a NUL, on both engines
        bus.request("BUS_READ_ENDPOINT", "history", {"prefixes": ["idem.a\x00"]})
    assert refused.value.code == protocol.BAD_REQUEST
    assert bus.request("BUS_READ_ENDPOINT", "history", {"prefixes": ["idem."]})["messages"]
    with pytest.raises(protocol.ProtocolError):
        protocol.encode_topic("a\x00b", 256)
    assert not protocol.is_producer_id("a\x00b")
