"""The writer's ingest: the capture pipe read, each message decoded and
validated, a session's mac checked, and its row handed to the batch buffer
(writer/commits.py). Bad input is counted, and refused with a nack when it
names a producer session (writer/notifications.py). `drain(now)` reads one
pass; `message(frames, now)` takes one message.
"""

from __future__ import annotations

import time

import zmq

from bus import protocol
from bus.config import DRAIN_WINDOW_IDLES, BusConfig
from bus.logging import RateLimitedLog, get_logger
from writer.commits import Commits
from writer.notifications import Notifications
from writer.producers import NotAuthentic, ProducerLedger

log = get_logger("writer")

# zmq.NOBLOCK as a plain int: pyzmq converts its Python enum at every call,
# 0.05 us each, three calls a message in drain.
NOBLOCK = int(zmq.NOBLOCK)
# Refusals whose meta names no session: it is not a msgpack map (the one
# refused_session would read again, and fail on, as decode_meta did).
UNATTRIBUTABLE = frozenset({protocol.META_NOT_MSGPACK, protocol.META_NOT_MAP})


class Ingest:
    """Reads the capture PULL `sock` into `commits`' buffer."""

    def __init__(self, config: BusConfig, sock: zmq.Socket, commits: Commits,
                 producers: ProducerLedger, notifications: Notifications) -> None:
        self.config = config
        self.capture = sock
        self.commits = commits
        self.buffer = commits.buffer
        self.producers = producers
        self._owe_nack = notifications.owe_nack
        self.rejected: dict[str, int] = {}  # by reason
        self.messages_received = 0
        self.forged = 0     # session messages without their session key's mac
        self._rejects = RateLimitedLog(log)
        self._drain_ns = 0

    def drain(self, now: float) -> bool:
        """Read until the next flush by size is due; True if the socket ran dry
        or brought nothing to store.

        This loop is the writer's hot path (see bench/). Frames are received as
        zmq.Frame (copy=False) because `Frame.more` is far cheaper than a
        getsockopt(RCVMORE) per frame; `Frame.bytes` then gives the bytes that
        msgpack and SQLite handle fastest.
        """
        recv = self.capture.recv
        noblock, max_frames = NOBLOCK, protocol.MAX_FRAMES  # looked up once a read
        # One transaction per message in sequential mode, but still many messages
        # per poll: the comparison is about commits, not system calls.
        sequential = self.commits.sequential
        room = self.config.batch_size if sequential else max(1, self.buffer.room)
        self._drain_ns = time.time_ns()  # "last seen" time of producers in this read
        ingest, flush = self.message, self.commits.flush
        received = 0
        rows_before = len(self.buffer.messages)
        valid_before = self.messages_received
        idle = False
        while received < room:
            try:
                frame = recv(noblock, copy=False)
            except zmq.Again:
                idle = True
                break
            frames = [frame.bytes]
            # ZeroMQ delivers a multipart message whole: the other parts are here.
            while frame.more:
                frame = recv(noblock, copy=False)
                if len(frames) <= max_frames:  # keep enough to reject it
                    frames.append(frame.bytes)
            received += 1
            ingest(frames, now)
            if sequential and self.buffer:
                flush("size", now)
        # The load that batching is for is the rows to commit: refused,
        # forged and repeated messages add none. A pass that read none is as
        # good as a dry socket, which a flood of them never leaves: the rows
        # buffered are committed then as at any low load, not after
        # BATCH_FLUSH_INTERVAL_MS (issue 22). (Sequential mode commits each
        # row as it comes: its load is the messages that passed validation.)
        rows = self.messages_received - valid_before if sequential \
            else len(self.buffer.messages) - rows_before
        self.commits.load.record(rows, now)
        return idle or not rows

    def drain_before_exit(self, deadline: float) -> None:
        """Read what the proxy already sent until the pipe is quiet, within the
        deadline and for at most DRAIN_WINDOW_IDLES x drain_idle_ms: what is not
        read stays in the proxy's queue for the next writer (except this
        socket's own receive queue). Stops early if commits fail and the buffer
        is full."""
        idle_ms = self.config.drain_idle_ms
        deadline = min(deadline, time.monotonic() + DRAIN_WINDOW_IDLES * idle_ms / 1000.0)
        while time.monotonic() < deadline and not self.buffer.is_full:
            if not self.capture.poll(idle_ms):
                return
            now = time.monotonic()
            self.drain(now)
            if self.buffer.due(now) or self.buffer.is_full:
                self.commits.flush("shutdown", now)

    def message(self, frames: list[bytes], now: float) -> None:
        """Validate one capture message and buffer its row; bad input is counted,
        and refused with a nack when it names a producer session."""
        cfg = self.config
        try:
            topic, payload, meta_raw, meta = protocol.decode_message(
                frames, cfg.max_topic_bytes, cfg.max_message_bytes)
            if topic[0] == protocol.RESERVED_PREFIX:  # the proxy takes none in: pushed here
                raise protocol.ProtocolError(protocol.RESERVED_TOPIC, topic[:64])
            producer, seq = meta.get(protocol.META_PRODUCER), meta.get(protocol.META_SEQ)
            epoch = meta.get(protocol.META_EPOCH)
            if producer is not None and (epoch is None or seq is None):
                # Only a session's mac shows who sent a message in a producer's
                # name: stored without one, it would pass for the producer's.
                raise protocol.ProtocolError(protocol.SESSION_REQUIRED,
                                             "a message naming a producer must be sent in "
                                             "its session (producer_open: epoch and seq)")
        except protocol.ProtocolError as exc:
            self.reject(exc, frames)
            return
        self.messages_received += 1
        if producer is not None:  # in a whole session (epoch and seq): checked above
            try:
                # frames: [topic, payload, meta], what the session's mac covers
                store, nack = self.producers.accept(producer, epoch, seq, self._drain_ns,
                                                    frames)
            except NotAuthentic:
                self.not_authentic(producer, epoch, seq)
                return
            if not store:
                if nack is not None:  # an older session, or a seq refused before
                    self._owe_nack(producer, epoch, seq, nack, "")
                return  # or a retransmission of a stored message: acknowledged again
        self.buffer.add_message((topic, payload, meta_raw, producer, seq,
                                 meta.get(protocol.META_TIME_NS)), now,
                                len(frames[0]) + len(payload) + (len(meta_raw) if meta_raw else 0))

    def reject(self, exc: protocol.ProtocolError, frames: list[bytes]) -> None:
        """Count a refused message (and log it, rate-limited); nack it if it
        names a session. Cheap: a flood of invalid messages costs the writer
        what it takes to read them, little more (issue 22)."""
        reason = exc.reason
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._rejects.due(reason):  # the event's fields built only when logged
            topic = frames[0][:64] if frames else b""
            self._rejects.warning(reason, "message_rejected", detail=exc.detail,
                                  frames=len(frames), topic=topic.decode("utf-8", "replace"))
        if reason in UNATTRIBUTABLE:
            return
        session = protocol.refused_session(frames, self.config.max_message_bytes)
        if session is not None:
            producer, epoch, seq = session
            # (refused_session names only messages of exactly 3 frames.) Refusing
            # a forgery would decide the real message's seq: its mac is checked.
            try:
                code = self.producers.refuse(producer, epoch, seq, exc.reason, self._drain_ns,
                                             frames)
            except NotAuthentic:
                self.not_authentic(producer, epoch, seq)
                return
            if code is not None:
                self._owe_nack(producer, epoch, seq, code,
                               str(exc) if code == exc.reason else "")

    def not_authentic(self, producer: str, epoch: int, seq: int) -> None:
        """A message of a producer's current session without its session key's
        mac: sent by someone else, or altered on the way. Counted and logged
        (rate-limited), never nacked."""
        self.forged += 1
        if self._rejects.due("forged"):  # the event's fields built only when logged
            self._rejects.warning("forged", "message_not_authentic", producer=producer,
                                  epoch=epoch, seq=seq,
                                  detail="no valid mac: not sent with this session's key")

    def snapshot(self, nacked: dict[str, int]) -> dict[str, object]:
        """stats' `ingest` (`nacked`: the notifications' count by code)."""
        return {"messages_received": self.messages_received,
                "rejected_total": sum(self.rejected.values()),
                "rejected": dict(self.rejected), "nacked": dict(nacked)}
