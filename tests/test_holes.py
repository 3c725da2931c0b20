"""Acknowledgements' holes (issue 25, item 5): a message lost on the way is
never nacked (a forger's copy must not decide the real message's seq), so
every acknowledgement lists the seqs missing below the highest received, and
a publisher sends just those again. Engine-independent (the writer's producer
ledger, not its storage): run on SQLite only."""

from __future__ import annotations

import time

import msgpack
import zmq

from bus import protocol
from bus.client import ControlClient, Publisher
from tests.conftest import Bus
from tests.test_acks import seqs_of


def damaged(frames: tuple[bytes, bytes, bytes]) -> tuple[bytes, bytes, bytes]:
    """A message whose mac's last byte is changed: the writer drops it as not
    authentic (and never nacks it, as a forger's copy must not decide the
    real message's seq)."""
    topic, payload, meta = frames
    return topic, payload, meta[:-1] + bytes((meta[-1] ^ 1,))


class DropsMessages(Publisher):
    """A Publisher whose messages `drop_seqs` each leave damaged the first
    time (copies lost on the way)."""

    def __init__(self, *args, drop_seqs: set[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_seqs = set(drop_seqs)

    def _send(self, frames: tuple[bytes, bytes, bytes]) -> None:
        if self.last_seq in self.drop_seqs:
            self.drop_seqs.discard(self.last_seq)
            frames = damaged(frames)
        super()._send(frames)


def first_acknowledgement(bus: Bus, pub: Publisher, acks: zmq.Socket) -> None:
    """Connect `pub`, subscribe `acks` to its acknowledgements and read the
    one the writer answers a new subscription with: from then on `acks`
    hears every acknowledgement of the session."""
    pub.connect()
    acks.connect(bus["BUS_NOTIFY_ENDPOINT"])
    acks.subscribe(protocol.ack_topic(pub.producer_id))
    assert acks.poll(5000), "no acknowledgement for the new subscription"
    acks.recv_multipart()


def test_a_dropped_message_is_re_sent_alone_from_the_acknowledgement_s_holes(bus: Bus) -> None:
    # Before acknowledgements listed holes, the publisher learnt of the
    # missing seq only from contiguous_seq stalling, and after resend_after
    # sent its whole window again: 991 of 1,000 messages for one dropped.
    with DropsMessages(bus.config(), producer_id="holey", drop_seqs={10},
                       resend_after=5.0) as pub:
        for i in range(1000):
            pub.publish("holes.t", b"%d" % i)
        pub.flush(timeout=20)
        assert pub.resent == 1, f"{pub.resent} messages sent again for one dropped"
        assert pub.holes_resent == 1, "sent again for the acknowledgement's hole"
    assert seqs_of(bus, "holey") == list(range(1, 1001))
    stats = bus.writer_stats()
    assert stats["security"]["messages_not_authentic"] == 1
    (producer,) = [p for p in ControlClient(bus["BUS_CONTROL_ENDPOINT"]).request(
        "producers_list")["producers"] if p["producer"] == "holey"] or [None]
    assert producer is None or producer["duplicates"] == 0


def test_an_acknowledgement_lists_the_session_s_holes_under_its_mac(bus: Bus) -> None:
    ctx = zmq.Context.instance()
    with DropsMessages(bus.config(), producer_id="gappy", drop_seqs={3}) as pub, \
            ctx.socket(zmq.SUB) as acks:
        first_acknowledgement(bus, pub, acks)
        for i in range(5):
            pub.publish("holes.t", b"%d" % i)
        pub.flush(timeout=10)
        seen = []
        while not seen or seen[-1][0] < 5:
            assert acks.poll(5000), f"acknowledgements stopped at {seen}"
            topic, payload = acks.recv_multipart()
            assert pub._mac.notification_is_authentic(topic, payload)
            ack = msgpack.unpackb(payload)
            seen.append((ack["contiguous_seq"], ack["max_seq"], ack["holes"]))
    assert (2, 5, [[3, 3]]) in seen, seen
    assert seen[-1] == (5, 5, [])


def test_an_acknowledgement_with_many_holes_is_read_not_taken_for_a_forgery(bus: Bus) -> None:
    """A client decodes a notification before it checks its mac, so it takes
    at most a few maps and arrays (protocol.decode_notification): 8, which an
    acknowledgement listing 7 holes or more (each an array) passes. The
    publisher ignored every such acknowledgement as not authentic, its holes
    and its contiguous_seq with them, and waited for resend_after."""
    dropped = set(range(2, 41, 2))  # 20 holes
    with DropsMessages(bus.config(), producer_id="sieve", drop_seqs=dropped,
                       resend_after=60.0) as pub:
        for i in range(50):
            pub.publish("holes.t", b"%d" % i)
        pub.flush(timeout=10)
        assert pub.holes_resent == len(dropped), pub.notifications_ignored
        assert "not_authentic" not in pub.notifications_ignored, pub.notifications_ignored
    assert seqs_of(bus, "sieve") == list(range(1, 51))


class LosesMessages(Publisher):
    """Every copy of the messages `lost_seqs` leaves with a damaged mac, the
    re-sent ones too: holes that stay (a path that keeps dropping them)."""

    def __init__(self, *args, lost_seqs: set[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lost_seqs = lost_seqs
        self._lost: list[tuple[bytes, bytes, bytes]] = []

    def _send(self, frames: tuple[bytes, bytes, bytes]) -> None:
        if self.last_seq in self.lost_seqs:
            self._lost.append(frames)
            frames = damaged(frames)
        super()._send(frames)

    def _resend(self, frames: tuple[bytes, bytes, bytes]) -> bool:
        if any(frames is lost for lost in self._lost):
            frames = damaged(frames)
        return super()._resend(frames)


def test_an_acknowledgement_s_holes_already_re_sent_cost_the_publisher_nothing(bus: Bus) -> None:
    """Each acknowledgement listing holes that were re-sent within
    resend_after skipped, per hole, every kept message below it (itertools.
    islice over the deque) to re-send nothing: with 32 holes 60,000 messages
    deep, 5 ms of the publisher's thread per acknowledgement, one per commit,
    for as long as the holes stayed."""
    lost = {100} | set(range(59_900, 59_962, 2))  # 32 holes, the lowest first
    ctx = zmq.Context.instance()
    with LosesMessages(bus.config(), producer_id="deep", lost_seqs=lost,
                       resend_after=60.0, max_unacked=100_000) as pub, \
            ctx.socket(zmq.SUB) as acks:
        first_acknowledgement(bus, pub, acks)
        for i in range(60_000):
            pub.publish("deep.t", b"x")
        last = None
        while last is None or msgpack.unpackb(last[1])["max_seq"] < 60_000:
            assert acks.poll(10_000), "acknowledgements stopped"
            last = acks.recv_multipart()
        assert len(msgpack.unpackb(last[1])["holes"]) == 32
        pub._apply_ack(*last)  # its holes re-sent now, if they were not yet
        assert pub.unacked > 59_000 and not pub.notifications_ignored, pub.notifications_ignored
        started = time.process_time()
        for _ in range(50):
            pub._apply_ack(*last)
        per_ack = (time.process_time() - started) / 50
    assert per_ack < 0.001, f"{per_ack * 1000:.2f} ms an acknowledgement"


class DropsOneSeqAlways(Publisher):
    """Every copy of message `drop_seq` leaves with a damaged mac, until told
    otherwise: drops that go on (a flood at the proxy, say)."""

    drop_seq = 10
    copies = 0

    def _send(self, frames: tuple[bytes, bytes, bytes]) -> None:
        super()._send(self._dropped(frames, self.last_seq))

    def _resend(self, frames: tuple[bytes, bytes, bytes]) -> bool:
        seq = msgpack.unpackb(frames[2][:-16] + bytes(16))["seq"]
        return super()._resend(self._dropped(frames, seq))

    def _dropped(self, frames: tuple[bytes, bytes, bytes], seq: int
                 ) -> tuple[bytes, bytes, bytes]:
        if seq != self.drop_seq:
            return frames
        self.copies += 1
        return damaged(frames)


def test_a_hole_that_stays_is_sent_again_less_and_less_often(bus: Bus) -> None:
    # 6 s of publishing while every copy of seq 10 is dropped: every
    # acknowledgement lists the hole, which is sent again after 1, 2, 4 s
    # (backing off as the re-sends of a stalled window do), not every second.
    with DropsOneSeqAlways(bus.config(), producer_id="stubborn", resend_after=1.0) as pub:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            pub.publish("holes.t", b"x")
            pub.read_acks(0.01)
        copies = pub.copies
        pub.drop_seq = 0
        pub.flush(timeout=40)
    assert 3 <= copies <= 4, f"{copies} copies of the dropped message in 6 s"
    assert seqs_of(bus, "stubborn") == list(range(1, pub.last_seq + 1))
