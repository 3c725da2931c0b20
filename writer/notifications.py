"""The writer's notify endpoint: the notifications owed to producers and
subscribers, and their sending.

What a loop pass commits and refuses is owed here (`owe_commit`, `owe_nack`)
and sent once after the pass (`send`): many commits in one pass (sequential
mode) cost one acknowledgement per producer, not one per commit. Nacks go
first ($bus.nack.<producer>), then each producer's acknowledgement
($bus.ack.<producer>, its contiguous watermark) and the commit watermark
($bus.commit); an acknowledgement passes the seqs it refused. Each ends with
the mac of its session (protocol.SessionMac.notification), so that only the
writer can tell a publisher what is stored.

The subscriptions the endpoint's XPUB passes on (`read_subscriptions`) are
counted against a budget, and a new acknowledgement subscription is answered
with the producer's current acknowledgement. No clock of its own: the wall
time of such an acknowledgement can be given (`now_ns`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from bus import protocol
from bus.logging import RateLimitedLog, get_logger
from bus.runner import release_free_memory
from writer.producers import MAX_SEQ_AHEAD, ProducerLedger, ProducerState

log = get_logger("writer")

# Frames read from the notify endpoint per loop pass at most: a peer that floods
# it must not starve the capture, and its subscriptions must be counted about
# as fast as libzmq takes them in (it does so whenever the socket is used).
NOTIFY_READS_PER_PASS = 10_000
# Topic bytes of the subscriptions the notify endpoint may hold (as counted from
# what XPUB_VERBOSER passes on) before it is reopened: libzmq cannot refuse or
# count them, and its trie takes about 50 bytes per subscribed byte (1 MiB:
# about 17,000 clients with their ack and nack subscriptions; 50 MB at worst).
NOTIFY_SUBSCRIPTION_BUDGET_BYTES = 1 << 20
# pyzmq's send without its Python wrapper (see Notifications._send).
_backend_send = zmq.backend.Socket.send
COMMIT_TOPIC = protocol.COMMIT_TOPIC.encode()
# A client's subscription to its acknowledgements, as the notify XPUB passes it on.
ACK_SUBSCRIPTION = bytes((protocol.SUBSCRIBE,)) + protocol.ACK_TOPIC_PREFIX.encode()
# The reason a nack gives for the refusals that only the writer decides.
REFUSAL_REASONS = {
    protocol.PRODUCER_FENCED: "a newer session of this producer was opened (producer_open): "
                              "this one is fenced",
    protocol.UNKNOWN_SESSION: "this writer never opened this epoch: open a new session",
    protocol.SEQ_OUT_OF_WINDOW: f"seq more than {MAX_SEQ_AHEAD:,} above the highest one of "
                                "this producer: not stored, and not decided",
}


# An acknowledgement owed to a producer session, and the mac of its session.
OwedAck = tuple[protocol.SessionMac | None, dict[str, Any]]


def acks_of(states: list[ProducerState]) -> list[OwedAck]:
    """The acknowledgements of `states` as they are now (a copy), for owe_commit."""
    return [(state.signer, state.ack(0)) for state in states]


class Notifications:
    """The notify XPUB `sock` and what is owed on it. `drop_peers` drops
    every connection of the endpoint (bus/sockets.Connections.drop_all): past
    the subscription budget."""

    def __init__(self, sock: zmq.Socket, producers: ProducerLedger,
                 drop_peers: Callable[[], Any]) -> None:
        self.sock = sock
        self.producers = producers
        self._drop_peers = drop_peers
        self._warnings = RateLimitedLog(log)
        self.nacked: dict[str, int] = {}  # by code
        self.subscribed_bytes = 0  # an estimate: see read_subscriptions
        self.drops = 0
        # Owed to producer sessions, with the session's mac (None: an epoch
        # whose key the writer does not hold, sent without a mac).
        self.owed_nacks: list[tuple[protocol.SessionMac | None, dict[str, Any]]] = []
        # By (producer, epoch): a session ended in this pass (producer_remove,
        # producer_open) still gets the acknowledgement of what was committed.
        self.owed_acks: dict[tuple[str, int], tuple[protocol.SessionMac | None,
                                                    dict[str, Any]]] = {}
        self.owed_commit: dict[str, Any] | None = None

    def owe_nack(self, producer: str, epoch: int, seq: int, code: str, reason: str) -> None:
        """Tell the producer, after this loop pass, that (epoch, seq) is not stored."""
        self.nacked[code] = self.nacked.get(code, 0) + 1
        state = self.producers.peek(producer)
        signer = state.signer if state is not None and state.epoch == epoch else None
        self.owed_nacks.append((signer, {"producer": producer, "epoch": epoch, "seq": seq,
                                         "code": code,
                                         "reason": reason or REFUSAL_REASONS.get(code, code)}))

    def owe_commit(self, committed_ns: int, last_id: int | None, messages: int,
                   acks: list[OwedAck]) -> None:
        """Note what was just committed: `messages` rows up to `last_id`, and
        the acknowledgements `acks` (acks_of the states it committed, as they
        were when it was written: the states move on with messages not yet
        committed), stamped `committed_ns`."""
        for signer, ack in acks:
            ack["committed_ns"] = committed_ns
            self.owed_acks[ack["producer"], ack["epoch"]] = (signer, ack)
        if last_id is not None:
            rows = self.owed_commit["rows"] if self.owed_commit else 0
            self.owed_commit = {"last_id": last_id, "rows": rows + messages,
                                "committed_ns": committed_ns}

    def read_subscriptions(self, now_ns: int | None = None) -> None:
        """Answer each new acknowledgement subscription with the producer's
        current acknowledgement, so that its client knows the path works. Only a
        producer with nothing uncommitted: its in-memory state would acknowledge
        rows not yet stored (a dirty one is acknowledged by its commit anyway).

        The bytes of held subscriptions are counted (each subscribe adds, each
        unsubscribe, explicit or by a disconnect, takes away; a peer repeating
        a subscription makes the count high, never low). Past the budget the
        endpoint is reopened: every client reconnects and subscribes again, and
        a flood costs the writer no more than the budget."""
        for _ in range(NOTIFY_READS_PER_PASS):
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not frame:
                continue
            if frame[0] == protocol.UNSUBSCRIBE:
                self.subscribed_bytes = max(0, self.subscribed_bytes - len(frame) + 1)
                continue
            self.subscribed_bytes += len(frame) - 1
            if self.subscribed_bytes > NOTIFY_SUBSCRIPTION_BUDGET_BYTES:
                self.drop_connections()
                return
            if not frame.startswith(ACK_SUBSCRIPTION):
                continue
            try:
                producer = frame[len(ACK_SUBSCRIPTION):].decode("utf-8")
            except UnicodeDecodeError:
                continue
            state = self.producers.peek(producer) if producer else None
            if state is not None and not self.producers.is_dirty(producer):
                self.owed_acks[producer, state.epoch] = (
                    state.signer, state.ack(time.time_ns() if now_ns is None else now_ns))

    def drop_connections(self) -> None:
        """Past the notify budget: drop every notify connection (its
        subscriptions go with it); clients reconnect and subscribe again."""
        self.drops += 1
        self._warnings.warning("notify_subscriptions_over_budget", "notify_connections_dropped",
                               subscribed_bytes=self.subscribed_bytes,
                               budget_bytes=NOTIFY_SUBSCRIPTION_BUDGET_BYTES)
        self._drop_peers()
        self.subscribed_bytes = 0
        release_free_memory()

    def connections_dropped(self) -> None:
        """Every connection was dropped (the memory guard): no subscription is held."""
        self.subscribed_bytes = 0

    def send(self) -> None:
        """Publish what is owed: each nack, then each acknowledgement and the
        commit watermark (see the module's doc)."""
        send = self._send
        for signer, nack in self.owed_nacks:
            topic = protocol.nack_topic(nack["producer"])
            send(topic, msgpack.packb(nack) if signer is None
                 else signer.notification(topic, nack))
        self.owed_nacks.clear()
        for (producer, _epoch), (signer, ack) in self.owed_acks.items():
            topic = protocol.ack_topic(producer)
            send(topic, msgpack.packb(ack) if signer is None
                 else signer.notification(topic, ack))
        self.owed_acks.clear()
        if self.owed_commit:
            send(COMMIT_TOPIC, msgpack.packb(self.owed_commit))
            self.owed_commit = None

    def _send(self, topic: bytes, payload: bytes) -> None:
        """One notification: pyzmq's own send (its Cython layer) twice, not
        send_multipart, whose Python wrapper costs 4 us a message here (its
        flags are Python enums): a commit's acknowledgement and watermark
        are sent after every batch. An XPUB never blocks: past its
        high-water mark a subscriber's notifications are dropped, as before."""
        _backend_send(self.sock, topic, zmq.SNDMORE)
        _backend_send(self.sock, payload)

    def snapshot(self) -> dict[str, Any]:
        """stats' `notify`."""
        return {"subscribed_bytes": self.subscribed_bytes,
                "budget_bytes": NOTIFY_SUBSCRIPTION_BUDGET_BYTES, "drops": self.drops}
