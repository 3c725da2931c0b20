"""Every stored anchor request is taken by the anchor worker, whenever it was
submitted (issue 23, item 5). Real processes: a bus, `bus-cli anchor`,
`bus-cli anchor submit`, and the bitcoind of the `node` fixture."""

from __future__ import annotations

import time

from tests.conftest import Bus, query, wait_for
from tests.test_anchor import (anchor_rows, anchoring, doc, events,  # noqa: F401
                               request, start_worker, submitted_docs)


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
