"""Every stored anchor request is taken by the anchor worker, whenever it was
submitted (issue 23, item 5), and `anchor submit --wait` says within seconds
when no worker has taken its request. Real processes: a bus, `bus-cli anchor`,
`bus-cli anchor submit`, and the bitcoind of the `node` fixture."""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from bus import protocol
from tests.conftest import Bus, query, wait_for
from tests.test_anchor import (Events, anchor_rows, anchoring, bus_for, doc,  # noqa: F401
                               events, request, start_worker, submitted_docs)


def consumer_position(bus: Bus, name: str = "anchor") -> int | None:
    return bus.request("BUS_CONTROL_ENDPOINT", "consumer_get", {"consumer": name})["last_id"]


def request_ids(bus: Bus) -> list[int]:
    return [row[0] for row in query(bus.db, "SELECT id FROM messages WHERE topic = ?"
                                            " ORDER BY id", ("anchor.request",))]


def test_requests_stored_before_the_workers_first_start_are_anchored(anchoring, node,
                                                                    events) -> None:
    """Stored and acknowledged before the worker's durable consumer existed:
    the consumer was created after the newest stored message, past them, and
    they were never anchored."""
    node.fund([200_000])
    early = [doc(f"early {i}") for i in range(3)]
    request(anchoring, *early)
    assert consumer_position(anchoring) is None  # no worker has ever started on this bus
    worker = anchoring.run("anchor")
    # The timing: one more request 0.3 s after the worker's first start,
    # whether it lands before its consumer exists or after, it is anchored.
    time.sleep(0.3)
    request(anchoring, doc("just after the start"))
    wanted = {*early, doc("just after the start")}
    wait_for(lambda: wanted <= submitted_docs(events).keys() or worker.popen.poll() is not None,
             message="the 4 requests anchored")
    assert worker.popen.poll() is None, worker.stderr.collect()[-10:]
    assert submitted_docs(events).keys() == wanted
    assert sum(size for *_, size in anchor_rows(anchoring)) == 4
    # Its position moves past them once they are recorded.
    wait_for(lambda: consumer_position(anchoring) == max(request_ids(anchoring)),
             message="the consumer's position past the 4 requests")


def test_a_worker_whose_consumer_is_gone_takes_the_new_requests_not_the_anchored_again(
        anchoring, node, events) -> None:
    """The consumer row lost (a restore from before it existed, `consumers rm`):
    the next start reads every stored request again; those anchored already
    are not anchored twice, the one stored meanwhile is anchored."""
    node.fund([200_000, 300_000])
    worker = start_worker(anchoring)
    request(anchoring, doc("first"), doc("second"))
    wait_for(lambda: len(submitted_docs(events)) == 2, message="2 documents anchored")
    assert worker.stop() == 0
    removed = anchoring.cli("consumers", "rm", "anchor")
    assert removed.returncode == 0, removed.stderr
    request(anchoring, doc("while no consumer existed"))
    restarted = start_worker(anchoring)
    wait_for(lambda: doc("while no consumer existed") in submitted_docs(events)
             or restarted.popen.poll() is not None, message="the new request anchored")
    assert [size for *_, size in anchor_rows(anchoring)] == [2, 1]
    assert query(anchoring.db, "SELECT count(*) FROM anchor_documents") == [(3,)]
    stats = anchoring.request("BUS_ANCHOR_CONTROL_ENDPOINT", "stats")
    assert stats["counters"]["duplicates"] == 2 and stats["counters"]["anchored"] == 1


def submit_wait(bus: Bus, digest: bytes, *options: str) -> tuple[Any, float]:
    started = time.monotonic()
    out = bus.cli("anchor", "submit", "--hash", digest.hex(), "--wait", "--timeout", "60",
                  *options, timeout=70)
    return out, time.monotonic() - started


def test_submit_wait_says_within_seconds_that_no_worker_took_the_request(make_bus,
                                                                          node) -> None:
    """No worker: the request is stored; --wait says so within seconds (the
    default --take-timeout, 10 s), instead of waiting silently for --timeout.
    A worker started then anchors it; a request it takes waits for its
    anchoring beyond --take-timeout (BUS_ANCHOR_INTERVAL_S=3)."""
    anchoring = bus_for(make_bus, node, BUS_ANCHOR_INTERVAL_S=3)
    out, took = submit_wait(anchoring, doc("nobody takes it"))
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert took < 25, took
    assert f"Error: no anchor worker has taken the request for {doc('nobody takes it').hex()}" \
        in out.stderr, out.stderr
    assert "no anchor worker has started on this bus" in out.stderr, out.stderr
    assert "stored: a worker anchors it once it starts" in out.stderr, out.stderr
    events = Events(anchoring)
    try:
        node.fund([200_000, 300_000])
        start_worker(anchoring)
        out, took = submit_wait(anchoring, doc("taken"), "--take-timeout", "1")
        assert out.returncode == 0, out.stderr
        assert took >= 2.5 and '"status": "submitted"' in out.stdout, (took, out.stdout)
        assert {doc("nobody takes it"), doc("taken")} <= submitted_docs(events).keys()
    finally:
        events.close()


def test_submit_wait_says_when_a_running_worker_does_not_take_the_request(make_bus,
                                                                          node) -> None:
    """The worker answers, holds a full batch (BUS_ANCHOR_MAX_DOCUMENTS) it
    cannot anchor (no UTXO) and reads no more: --wait names that, and exits 1,
    within seconds."""
    anchoring = bus_for(make_bus, node, BUS_ANCHOR_MAX_DOCUMENTS=1)
    events = Events(anchoring)
    try:
        start_worker(anchoring)
        request(anchoring, doc("held"))
        events.wait("anchor.error", lambda e: e["error"] == "no_utxo")
        out, took = submit_wait(anchoring, doc("not read"))
        assert out.returncode == 1, (out.returncode, out.stderr)
        assert took < 25, took
        assert "Error: no anchor worker has taken the request" in out.stderr, out.stderr
        assert "holds a full batch of 1 documents (BUS_ANCHOR_MAX_DOCUMENTS)" in out.stderr, \
            out.stderr
        node.fund([200_000, 300_000])  # then both are anchored, one batch each
        wait_for(lambda: {doc("held"), doc("not read")} <= submitted_docs(events).keys(),
                 message="both anchored once funded")
    finally:
        events.close()


def test_submit_wait_says_at_once_when_the_worker_has_read_past_the_request(make_bus,
                                                                           node) -> None:
    """A worker that has read every request up to the newest stored id and
    holds no such hash, with no proof of it, has passed the request by (what
    the worker did before its consumer started at the first stored message):
    said at once, not after --take-timeout. A stand-in answers the worker's
    control endpoint so."""
    anchoring = bus_for(make_bus, node)
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.bind(anchoring["BUS_ANCHOR_CONTROL_ENDPOINT"])
    done = threading.Event()

    def answer() -> None:
        while not done.is_set():
            if not rep.poll(50):
                continue
            request_id, cmd, args = protocol.decode_request(rep.recv_multipart())
            result = "pong" if cmd == "ping" else {
                "hash": args.get("hash"), "waiting": False, "consumer": "anchor", "reading": True,
                "read_through_id": 10**9, "documents": 0, "max_documents": 10_000}
            rep.send(protocol.encode_reply_ok(request_id, result))

    stand_in = threading.Thread(target=answer, daemon=True)
    stand_in.start()
    try:
        out, took = submit_wait(anchoring, doc("passed by"))
    finally:
        done.set()
        stand_in.join(5)
        rep.close(linger=0)
        ctx.term()
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert took < 8, took  # not the default --take-timeout, 10 s
    assert "has read every stored request up to message 1,000,000,000 and does not hold this " \
           "one: a defect" in out.stderr, out.stderr
