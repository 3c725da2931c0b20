"""Acknowledged means stored (issue #10): producer sessions, negative
acknowledgements, notifications only the writer can send, and a durable tail
that acknowledges only what it printed."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from bus import protocol
from bus.client import BusTimeout, MessageRefused, ProducerFenced, Publisher, Subscriber
from bus.config import with_overrides
from tests.conftest import BUS_CLI, Bus, RawProducer, query, signed, wait_for
from writer.producers import MAX_REFUSALS, NotAuthentic, ProducerLedger, ProducerState

# --- the ledger's sessions ------------------------------------------------------


def test_a_new_session_fences_the_old_one_and_goes_on_after_its_last_seq() -> None:
    ledger = ProducerLedger(lambda _producer: None)
    first = ledger.open("p", 1, b"k1" * 16)
    assert (first.epoch, first.max_seq) == (1, 0)
    for seq in (1, 2, 3, 5):
        assert ledger.accept("p", 1, seq, 2, signed(first, seq)) == (True, None)
    second = ledger.open("p", 3, b"k2" * 16)
    assert second.epoch == 2 and second.holes == [] and second.abandoned == 1  # seq 4: gone
    old = signed(second, 6, epoch=1, key=b"k1" * 16)
    assert ledger.accept("p", 1, 6, 4, old) == (False, protocol.PRODUCER_FENCED)
    assert ledger.accept("p", 3, 6, 4, signed(second, 6, epoch=3)) == \
        (False, protocol.UNKNOWN_SESSION)
    with pytest.raises(NotAuthentic):  # the old session's key, the new epoch
        ledger.accept("p", 2, 6, 4, signed(second, 6, key=b"k1" * 16))
    assert ledger.accept("p", 2, 6, 4, signed(second, 6)) == (True, None)   # next_seq was 6
    assert ledger.accept("p", 2, 6, 4, signed(second, 6)) == (False, None)  # a retransmission
    assert second.contiguous_seq == 6


def test_a_refused_seq_is_decided_remembered_and_nacked_again() -> None:
    state = ProducerState("p", epoch=1)
    assert state.accept(1, 10)
    assert state.refuse(3, "topic_too_long", 10) == "topic_too_long"
    assert (state.contiguous_seq, state.holes, state.refused) == (1, [[2, 2]], 1)
    assert state.accept(2, 10)
    assert state.contiguous_seq == 3, "the refusal no longer holds the watermark back"
    assert state.refuse(3, "topic_too_long", 10) == "topic_too_long"  # sent again
    assert state.refusal_of(3) == "topic_too_long" and state.refused == 1
    assert state.refuse(2, "message_too_large", 10) is None, "2 was stored: not refused now"
    for seq in range(4, 4 + MAX_REFUSALS + 10):
        state.refuse(seq, "meta_bad_value", 10)
    assert len(state.refusals) == MAX_REFUSALS and state.refused == MAX_REFUSALS + 11
    assert ProducerState.from_row(state.row()) == state  # (the row's key: None, not stored)


# --- through the real processes -----------------------------------------------


def stored(bus: Bus, producer: str) -> list[tuple[int, int]]:
    """(seq, epoch) of each stored message of `producer`, in id order."""
    return [(seq, msgpack.unpackb(meta)["epoch"]) for seq, meta in query(
        bus.db, "SELECT producer_seq, meta FROM messages WHERE producer_id = ? ORDER BY id",
        (producer,))]


def test_a_restarted_publisher_stores_everything_it_publishes(bus: Bus) -> None:
    for run in range(1, 4):
        with Publisher(bus.config(), producer_id="pricer-1") as pub:
            assert pub.epoch == run and pub.last_seq == (run - 1) * 1000
            for i in range(1000):
                pub.publish("prices.eurusd", b"%d-%d" % (run, i))
            pub.flush(timeout=15)
            assert pub.acked_seq == run * 1000
    rows = stored(bus, "pricer-1")
    assert [seq for seq, _ in rows] == list(range(1, 3001)), "3,000 stored, none skipped"
    assert [epoch for _, epoch in rows] == [1] * 1000 + [2] * 1000 + [3] * 1000
    assert bus.writer_stats()["producers"]["duplicates_skipped"] == 0


def test_bus_cli_publish_with_a_fixed_producer_id_stores_every_run(bus: Bus) -> None:
    for run in range(3):
        done = bus.cli("publish", "cli.runs", f"run {run}", "--wait", "--producer-id", "cron-1")
        assert done.returncode == 0, done.stderr
    assert [r[0] for r in query(bus.db, "SELECT payload FROM messages WHERE producer_id = "
                                        "'cron-1' ORDER BY id")] == [b"run 0", b"run 1", b"run 2"]


def test_an_old_incarnation_left_running_is_fenced(bus: Bus) -> None:
    old = Publisher(bus.config(), producer_id="twin", resend_after=0.2)
    old.connect()
    try:
        old.publish("twin.t", b"old-1", wait=True, timeout=10)
        with Publisher(bus.config(), producer_id="twin") as new:
            assert new.epoch == old.epoch + 1 and new.last_seq == 1
            old.publish("twin.t", b"old-2")          # still running, unaware
            new.publish("twin.t", b"new-2", wait=True, timeout=10)
            with pytest.raises(ProducerFenced, match="fenced"):
                old.flush(timeout=10)
            with pytest.raises(ProducerFenced):
                old.publish("twin.t", b"old-3")
            with pytest.raises(ProducerFenced):
                old.flush(timeout=1)  # nothing pending: still told
            new.publish("twin.t", b"new-3", wait=True, timeout=10)
    finally:
        old.close()
    assert [r[0] for r in query(bus.db, "SELECT payload FROM messages WHERE producer_id = 'twin'"
                                        " ORDER BY id")] == [b"old-1", b"new-2", b"new-3"]
    assert bus.writer_stats()["ingest"]["nacked"].get(protocol.PRODUCER_FENCED, 0) >= 1


def raw_socket(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


FORGED = [[b"$bus.ack.victim", msgpack.packb({"producer": "victim", "epoch": 1,
                                             "contiguous_seq": 1_000_000, "max_seq": 1_000_000,
                                             "refused": 0, "committed_ns": 1})],
          [b"$bus.nack.victim", msgpack.packb({"producer": "victim", "epoch": 1, "seq": 1,
                                              "code": "x", "reason": "forged"})],
          [b"$bus.commit", msgpack.packb({"last_id": 10**9, "rows": 1, "committed_ns": 1})],
          [b"$anything", b"x"]]


def test_forged_notifications_never_reach_a_subscriber_or_a_publisher(bus: Bus) -> None:
    ctx = zmq.Context()
    victim = Publisher(bus.config(), producer_id="victim", resend_after=0.2)
    victim.connect()
    forged = [[FORGED[0][0], msgpack.packb({**msgpack.unpackb(FORGED[0][1]),
                                            "epoch": victim.epoch})], *FORGED[1:]]
    # Every way a client might send: a plain PUB, and an XPUB told to send
    # everything whatever the proxy subscribed to (XPUB_MANUAL + subscribe "").
    pub = raw_socket(ctx, zmq.PUB, bus["BUS_PUB_ENDPOINT"])
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.LINGER, 0)
    xpub.setsockopt(zmq.XPUB_MANUAL, 1)
    xpub.connect(bus["BUS_PUB_ENDPOINT"])
    assert xpub.poll(5000)
    xpub.recv()
    xpub.setsockopt(zmq.SUBSCRIBE, b"")  # the last subscriber's pipe now gets everything
    everything = raw_socket(ctx, zmq.SUB, bus["BUS_SUB_ENDPOINT"])
    everything.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        with Subscriber(["$"], bus.config()) as notes, \
                Publisher(bus.config(), producer_id="witness") as witness:
            # The data path works: a witness's messages reach the raw SUB.
            wait_for(lambda: witness.publish("seen.t", b"w") and everything.poll(50),
                     message="the raw SUB to receive data")
            assert bus.writer.stop() == 0           # nothing is acknowledged any more
            victim.publish("victim.t", b"unstored")
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                for frames in forged:
                    pub.send_multipart(frames)
                    xpub.send_multipart(frames)
                time.sleep(0.01)
            with pytest.raises(BusTimeout):
                victim.flush(timeout=1.0)
            assert victim.acked_seq == 0 and victim.unacked == 1
            received = []
            while everything.poll(200):
                received.append(everything.recv_multipart()[0])
            assert received and all(not t.startswith(b"$") for t in received), received
            # The writer's own notifications came before it stopped; none of the forged.
            while (note := notes.receive(timeout=0.5)) is not None:
                assert note.payload not in {frames[1] for frames in forged}, note
    finally:
        victim.close(linger_ms=0)
        for sock in (pub, xpub, everything):
            sock.close()
        ctx.term()
    bus.start_writer()
    assert bus.count("$") == 0


def test_data_from_the_subscriber_side_is_neither_stored_nor_delivered(bus: Bus) -> None:
    ctx = zmq.Context()
    xsub = raw_socket(ctx, zmq.XSUB, bus["BUS_SUB_ENDPOINT"])
    listener = raw_socket(ctx, zmq.SUB, bus["BUS_SUB_ENDPOINT"])
    listener.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        with Publisher(bus.config(), producer_id="honest") as pub:
            wait_for(lambda: pub.publish("side.probe", b"p") and listener.poll(50),
                     message="the listener to receive")
            # A forged unsubscribe from everything, then data, from the subscriber side.
            xsub.send(b"\x00")
            for i in range(50):
                xsub.send_multipart([b"side.t", b"%d" % i])
                xsub.send_multipart([b"side.t", b"%d" % i, protocol.encode_meta("honest", 10**6)])
            # Ingestion goes on: the proxy's own subscriptions are its own.
            for i in range(100):
                pub.publish("side.after", b"%d" % i)
            pub.flush(timeout=10)
        assert bus.count("side.t") == 0 and bus.count("side.after") == 100
        topics = set()
        while listener.poll(200):
            topics.add(listener.recv_multipart()[0])
        assert b"side.t" not in topics and b"side.after" in topics
    finally:
        for sock in (xsub, listener):
            sock.close()
        ctx.term()


def nacks(sock: zmq.Socket, count: int) -> list[dict]:
    found = []
    deadline = time.monotonic() + 10
    while len(found) < count and time.monotonic() < deadline:
        if sock.poll(100):
            topic, payload = sock.recv_multipart()
            if topic.startswith(b"$bus.nack."):
                found.append(msgpack.unpackb(payload))
    return found


def test_each_refusal_gets_its_nack_and_acknowledgements_go_on(make_bus) -> None:
    bus = make_bus(BUS_MAX_MESSAGE_BYTES=4096, BUS_MAX_TOPIC_BYTES=64).start()
    ctx = zmq.Context()
    notes = raw_socket(ctx, zmq.SUB, bus["BUS_NOTIFY_ENDPOINT"])
    notes.setsockopt(zmq.SUBSCRIBE, b"$bus.nack.refused")
    notes.setsockopt(zmq.SUBSCRIBE, b"$bus.ack.refused")
    with RawProducer(bus, "refused") as first:
        old_epoch = first.epoch
    raw = RawProducer(bus, "refused")             # a second session: epoch 2
    try:
        frames = raw.frames
        bad = {  # seq -> frames; each names the session with its mac, so each can be nacked
            1: frames(1, b"r" * 65, b"p"),
            2: frames(2, b"r.t", b"x" * 5000),
            3: [b"r.t", b"p", raw.signer.signed_meta(b"r.t", b"p", {
                "producer": "refused", "epoch": raw.epoch, "seq": 3, "time_ns": 1 << 63})],
            5: frames(5, b"r\xff.t", b"p"),
        }
        codes = {1: "topic_too_long", 2: "message_too_large", 3: "meta_bad_value",
                 5: "topic_not_utf8"}
        # A 4th frame, which no mac covers: refused, never attributed (a copy of
        # a real message with a frame added must not get its seq refused).
        raw.send_frames([*frames(4, b"r.t", b"p"), b"extra"])
        wait_for(lambda: raw.send(99, topic=b"probe.t") or notes.poll(100),
                 message="notifications to reach the test")   # (99 opens a hole 1..98)
        raw.send_frames(*bad.values())
        raw.send_frames([b"r.t", b"fenced", protocol.encode_meta("refused", 6, old_epoch)],
                        [b"r.t", b"unknown", protocol.encode_meta("refused", 6, raw.epoch + 5)])
        found = nacks(notes, 6)
        assert {(n["seq"], n["code"]) for n in found} == {
            *codes.items(), (6, protocol.PRODUCER_FENCED), (6, protocol.UNKNOWN_SESSION)}
        assert all(n["reason"] and n["producer"] == "refused" for n in found)
        # Resent unchanged, a refused message is nacked again, not stored.
        raw.send_frames(bad[1])
        assert [(n["seq"], n["code"]) for n in nacks(notes, 1)] == [(1, "topic_too_long")]
        # The refusals do not hold the watermark back: the rest of the hole is filled.
        raw.send(4, *range(6, 99), topic=b"r.t")
        bus.wait_count(94, "r.")
        wait_for(lambda: bus.writer_stats()["producers"]["with_missing"] == 0,
                 message="the hole filled")
        assert bus.count("r.") == 94 and bus.count("probe.") == 1
        assert bus.writer_stats()["ingest"]["rejected"]["too_many_frames"] == 1
    finally:
        raw.close()
        notes.close()
        ctx.term()
    rows = query(bus.db, "SELECT contiguous_seq, refused, refusals FROM producers "
                         "WHERE producer_id = 'refused'")
    assert rows[0][:2] == (99, 4)
    assert sorted(map(tuple, msgpack.unpackb(rows[0][2]))) == sorted(codes.items())


def test_a_publisher_learns_of_refusals_and_the_next_1000_are_acknowledged(make_bus) -> None:
    bus = make_bus(BUS_MAX_TOPIC_BYTES=64).start()
    # A client configured for longer topics than the writer stores: only the
    # writer can refuse what this Publisher lets through.
    lax = with_overrides(bus.config(), max_topic_bytes=1000)
    with Publisher(lax, producer_id="lax") as pub:
        with pytest.raises(MessageRefused) as refused:
            pub.publish("t" * 100, b"too long a topic", wait=True, timeout=10)
        assert refused.value.code == "topic_too_long"
        assert refused.value.refused[0][:2] == (1, "topic_too_long")
        for i in range(1000):
            pub.publish("lax.t", b"%d" % i)
        pub.flush(timeout=15)                       # no MessageRefused: reported once
        assert (pub.acked_seq, pub.refused_total) == (1001, 1)
        # Refusals in the middle of a stream, reported by flush().
        for i in range(10):
            pub.publish("u" * 70 if i in (3, 7) else "lax.t", b"x")
        with pytest.raises(MessageRefused) as refused:
            pub.flush(timeout=10)
        assert [seq for seq, _code, _reason in refused.value.refused] == [1005, 1009]
    assert bus.count("lax.t") == 1008 and bus.count("t") == 0


def test_a_publisher_that_missed_its_nacks_asks_for_them(make_bus) -> None:
    bus = make_bus(BUS_MAX_TOPIC_BYTES=64).start()
    lax = with_overrides(bus.config(), max_topic_bytes=1000)
    with Publisher(lax, producer_id="deaf") as pub:
        pub._acks.setsockopt(zmq.UNSUBSCRIBE, protocol.nack_topic("deaf"))
        pub.publish("lax.t", b"ok", wait=True, timeout=10)   # the unsubscribe has arrived
        pub.publish("v" * 80, b"refused")
        pub.publish("lax.t", b"ok")
        with pytest.raises(MessageRefused) as refused:
            pub.flush(timeout=10)
        assert [(seq, code) for seq, code, _ in refused.value.refused] == [(2, "topic_too_long")]
        assert "producer_status" in refused.value.refused[0][2]


def test_bus_cli_publish_wait_exits_non_zero_naming_the_reason(make_bus) -> None:
    bus = make_bus(BUS_MAX_TOPIC_BYTES=64).start()
    done = bus.cli("publish", "w" * 100, "data", "--wait", "--max-topic-bytes", "1000")
    assert done.returncode == 1
    assert "refused by the writer" in done.stderr and "topic_too_long" in done.stderr
    assert "Traceback" not in done.stderr
    too_big = bus.cli("publish", "big.t", "--wait", input="x" * 1_048_600 + "\n")
    assert too_big.returncode == 1 and "message_too_large" in too_big.stderr
    assert "line 1 of standard input" in too_big.stderr and "Traceback" not in too_big.stderr


def test_the_python_client_checks_every_frame_before_sending(bus: Bus) -> None:
    cfg = bus.config()
    with Publisher(cfg, producer_id="careful") as pub:
        # The payload alone fits; with the meta frame the message does not.
        with pytest.raises(protocol.ProtocolError, match="message_too_large"):
            pub.publish("c.t", b"x" * (cfg.max_message_bytes - 10))
        with pytest.raises(protocol.ProtocolError, match="meta_bad_value"):
            pub.publish("c.t", b"x", headers={"k": 1})
        with pytest.raises(protocol.ProtocolError, match="reserved_topic"):
            pub.publish("$bus.ack.careful", b"x")
        assert pub.publish("c.t", b"fine", wait=True, timeout=10) == 1, "no seq was used up"
    with pytest.raises(ValueError):
        Publisher(cfg, producer_id="x" * 129)


# --- the durable tail ---------------------------------------------------------------


def test_a_durable_tail_cut_by_a_closed_pipe_or_ctrl_c_skips_nothing(bus: Bus) -> None:
    def tail_lines(*args: str) -> list[str]:
        done = bus.cli("tail", "feed.", "--durable", "audit", *args)
        assert done.returncode == 0, done.stderr
        return [line.split()[-1] for line in done.stdout.splitlines()]

    with Publisher(bus.config(), producer_id="feed") as pub:
        # `bus-cli tail --durable audit | head -3`, with messages arriving one by one.
        tail = subprocess.Popen([BUS_CLI, "tail", "feed.", "--durable", "audit"], env=bus.env,
                                cwd=bus.tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        # What `head -3` does, but writing each line at once (head buffers in a pipe).
        head = subprocess.Popen([sys.executable, "-c", "import sys\nfor _ in range(3): "
                                 "print(sys.stdin.readline(), end='', flush=True)"],
                                stdin=tail.stdout, stdout=subprocess.PIPE, text=True)
        tail.stdout.close()  # head holds the only read end
        try:
            # A new NAME starts after the newest message: publish once it exists.
            wait_for(lambda: "audit" in bus.writer_stats()["consumers"]["positions"],
                     message="the durable consumer")
            for i in range(1, 4):
                pub.publish("feed.t", b"m%d" % i, wait=True, timeout=10)
                assert select.select([head.stdout], [], [], 10)[0], f"m{i} not printed"
                line = head.stdout.readline()
                assert line.split()[-1] == f"m{i}", line
            assert head.wait(10) == 0
            pub.publish("feed.t", b"m4", wait=True, timeout=10)  # meets the closed pipe
            tail.wait(10)
        finally:
            for proc in (tail, head):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
            head.stdout.close()
        pub.publish("feed.t", b"m5", wait=True, timeout=10)
        assert tail_lines("-n", "1") == ["m4"], "the line the closed pipe refused is not lost"
        # Ctrl-C of a tail waiting for more.
        interrupted = bus.run("tail", "feed.", "--durable", "audit")
        interrupted.stdout.wait_line(lambda line: line.endswith("m5"))
        interrupted.send_signal(signal.SIGINT)
        assert interrupted.wait() == 130  # what a shell expects after Ctrl-C
        pub.publish("feed.t", b"m6", wait=True, timeout=10)
    assert tail_lines("-n", "1") == ["m6"], "resumed after the last line printed"


# --- hostile input on the paths this issue added ----------------------------------


def test_a_request_of_two_frames_is_refused_not_fatal(bus: Bus) -> None:
    ctx = zmq.Context()
    try:
        for name in ("BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT", "BUS_READ_ENDPOINT"):
            req = raw_socket(ctx, zmq.REQ, bus[name])
            req.send_multipart([protocol.encode_request(1, "ping"), b"x"])
            assert req.poll(5000), f"no reply from {name}"
            reply = msgpack.unpackb(req.recv())
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
            req.close()
    finally:
        ctx.term()
    for proc in (bus.writer, bus.proxy, bus.reader):
        assert proc.popen.poll() is None, proc.stderr.collect()[-5:]


def test_a_seq_far_ahead_is_refused_and_does_not_break_the_producer(bus: Bus) -> None:
    ctx = zmq.Context()
    notes = raw_socket(ctx, zmq.SUB, bus["BUS_NOTIFY_ENDPOINT"])
    notes.setsockopt(zmq.SUBSCRIBE, b"$bus.nack.jump")
    try:
        with RawProducer(bus, "jump") as raw:
            wait_for(lambda: raw.send(2**63 - 1, topic=b"jump.t") or notes.poll(100),
                     message="the nack of a seq at 2^63-1")
            assert {n["code"] for n in nacks(notes, 1)} == {protocol.SEQ_OUT_OF_WINDOW}
            raw.send(1, 2, topic=b"jump.t")
            bus.wait_count(2, "jump.")
    finally:
        notes.close()
        ctx.term()
    with Publisher(bus.config(), producer_id="jump") as pub:
        assert pub.last_seq == 2, "the sequence goes on from what was stored"
        pub.publish("jump.t", b"3", wait=True, timeout=10)
    assert sorted(r[0] for r in query(bus.db, "SELECT producer_seq FROM messages "
                                              "WHERE producer_id = 'jump'")) == [1, 2, 3]


def test_a_subscription_as_long_as_a_topic_is_served(bus: Bus) -> None:
    topic = "long." + "x" * (bus.config().max_topic_bytes - 5)
    with Subscriber([topic], bus.config()) as sub, \
            Publisher(bus.config(), producer_id="long") as pub:
        wait_for(lambda: pub.publish(topic, b"p") and sub.receive(timeout=0.1),
                 message="a message on a 256-byte topic to reach its subscriber")


def test_bus_cli_tail_shows_the_writer_notifications_decoded(bus: Bus) -> None:
    tail = bus.run("tail", "$bus.ack.shown", "--json")
    with Publisher(bus.config(), producer_id="shown") as pub:
        line = wait_for(lambda: pub.publish("shown.t", b"x", wait=True) and
                        next(iter(tail.stdout.collect()), None), message="an ack line")
    record = json.loads(line)
    assert record["topic"] == "$bus.ack.shown" and record["payload"]["producer"] == "shown"
    assert record["payload"]["epoch"] == 1 and "contiguous_seq" in record["payload"]


def test_a_nack_for_a_seq_this_session_did_not_send_is_ignored() -> None:
    """Another key can make the writer nack (epoch + 1, seq) before this
    session is opened with that epoch (unknown_session): the nack must not be
    taken for a refusal of a message this session sends later."""
    from bus.config import load_config
    pub = Publisher(load_config(env={}), producer_id="p")
    pub.epoch, pub.last_seq, pub.acked_seq = 3, 10, 7
    pub._mac = protocol.SessionMac(b"k" * 32)
    topic = protocol.nack_topic("p")
    for seq in (11, 50, 7, 3):  # not sent yet, or decided before
        pub._apply_nack(topic, pub._mac.notification(topic, {
            "epoch": 3, "seq": seq, "code": "unknown_session", "reason": "forged"}))
    assert pub.refused_total == 0
    pub._apply_nack(topic, pub._mac.notification(topic, {
        "epoch": 3, "seq": 9, "code": "topic_too_long", "reason": "real"}))
    assert pub.refused_total == 1 and pub._refusals == {9: ("topic_too_long", "real")}
    pub.close()
