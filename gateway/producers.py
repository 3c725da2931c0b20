"""Producer sessions the gateway holds for its WebSocket clients: each a
bus.client.Publisher (a producer session with the writer: epochs, seqs,
re-sends, authenticated acknowledgements) run in a thread of its own, so
that "acknowledged means stored" holds from the browser to the database: a
publish is answered once the writer has acknowledged its seq (stored) or
refused it (the nack's code and reason), never before.

The event loop hands a session its messages (`submit`, never blocking) and
learns what was decided through `on_decided`, called in the loop's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from bus import protocol
from bus.client import BusError, ProducerFenced, Publisher
from bus.config import BusConfig, with_overrides
from bus.logging import get_logger

log = get_logger("gateway")

# How long a session thread waits for acknowledgements between two looks at
# what the loop handed it.
ACK_WAIT_S = 0.02
# Messages a session's socket queues for the proxy at most (copies sent
# again included); past it a publish is answered busy.
SEND_QUEUE = 256
# Some of the messages decided with this one were refused, and the writer
# could not say which (more than the 256 refusals it keeps were missed):
# it may or may not be stored.
UNDECIDED = "undecided"


@dataclass
class Submitted:
    """A publish handed to a session: `ref` is the gateway's handle on it."""

    ref: Any
    topic: str
    payload: bytes
    content_type: str | None
    headers: dict[str, str] | None


# (ref, seq or None, error (code, reason) or None) for each decided publish.
Decision = tuple[Any, int | None, tuple[str, str] | None]


class ProducerSession(threading.Thread):
    """One producer id's session, in its thread."""

    def __init__(self, config: BusConfig, producer_id: str, context: zmq.Context,
                 on_decided: Callable[[list[Decision]], None], max_pending: int) -> None:
        super().__init__(name=f"producer {producer_id}", daemon=True)
        self.config = config
        self.producer_id = producer_id
        self.context = context
        self.on_decided = on_decided
        self.inbox: queue.SimpleQueue[Submitted | None] = queue.SimpleQueue()
        self.max_pending = max_pending
        self.pending = 0            # submitted, not decided (read by the loop)
        self.used_at = time.monotonic()
        self.error: str | None = None
        self.stored = self.refused = 0
        self.epoch: int | None = None
        self._ending = threading.Event()

    def submit(self, item: Submitted) -> bool:
        """Hand a message over (from the event loop); False if the session
        holds max_pending already, or is ending."""
        if self._ending.is_set() or self.error is not None or self.pending >= self.max_pending:
            return False
        self.pending += 1
        self.used_at = time.monotonic()
        self.inbox.put(item)
        return True

    def stop(self) -> None:
        self._ending.set()
        self.inbox.put(None)

    def run(self) -> None:
        # A short queue to the proxy: what the session sends again when the
        # writer is slow piles up there, at most SEND_QUEUE messages.
        publisher = Publisher(with_overrides(self.config, pub_hwm=SEND_QUEUE),
                              producer_id=self.producer_id, context=self.context,
                              send_timeout=0, linger_ms=0)
        refs: dict[int, Any] = {}
        try:
            try:
                publisher.connect()
                self.epoch = publisher.epoch
            except (BusError, zmq.ZMQError) as exc:
                self.error = f"no producer session: {exc}"
                log.warning("producer_session_failed", producer=self.producer_id,
                            error=str(exc))
            while self.error is None and not self._ending.is_set():
                decided = self._publish_waiting(publisher, refs)
                publisher.read_acks(0 if decided or not refs else ACK_WAIT_S)
                publisher.tend(time.monotonic())
                decided += self._decided(publisher, refs)
                if publisher.fenced is not None:
                    self.error = publisher.fenced
                if decided:
                    self._hand_over(decided)
        except Exception as exc:  # a bug: the connections' publishes fail, the gateway goes on
            self.error = f"producer session ended: {type(exc).__name__}: {exc}"
            log.exception("producer_session_crashed", producer=self.producer_id)
        finally:
            self._fail_rest(refs)
            publisher.close(linger_ms=0)

    def _publish_waiting(self, publisher: Publisher, refs: dict[int, Any]) -> list[Decision]:
        decided: list[Decision] = []
        wait = ACK_WAIT_S if not refs else None
        while True:
            try:
                item = self.inbox.get(timeout=wait) if wait else self.inbox.get_nowait()
            except queue.Empty:
                return decided
            wait = None
            if item is None:
                return decided
            try:
                seq = publisher.publish(item.topic, item.payload, content_type=item.content_type,
                                        headers=item.headers)
                refs[seq] = item.ref
            except (UnicodeError, TypeError) as exc:  # what the gateway let through: one refused
                decided.append((item.ref, None, (protocol.BAD_REQUEST, str(exc)[:200])))
            except protocol.ProtocolError as exc:
                decided.append((item.ref, None, (exc.reason, str(exc))))
            except ProducerFenced as exc:
                self.error = str(exc)
                decided.append((item.ref, None, (protocol.PRODUCER_FENCED, str(exc))))
            except BusError as exc:  # the proxy's queue is full: not sent
                decided.append((item.ref, None, (protocol.BUSY, str(exc))))

    def _decided(self, publisher: Publisher, refs: dict[int, Any]) -> list[Decision]:
        acked = publisher.acked_seq
        if not refs or min(refs) > acked:
            return []
        refused, unknown = publisher.take_refusals()
        reasons = {seq: (code, reason) for seq, code, reason in refused}
        decided: list[Decision] = []
        for seq in sorted(s for s in refs if s <= acked):
            error = reasons.get(seq) or (
                (UNDECIDED, "the writer refused some messages decided with this one and "
                            "could not say which") if unknown else None)
            decided.append((refs.pop(seq), seq, error))
            if error is None:
                self.stored += 1
            else:
                self.refused += 1
        return decided

    def _hand_over(self, decided: list[Decision]) -> None:
        self.pending -= len(decided)
        try:
            self.on_decided(decided)
        except RuntimeError:  # the gateway's loop closed (a stop past its deadline): nobody to tell
            pass

    def _fail_rest(self, refs: dict[int, Any]) -> None:
        """What was not decided when the session ended: answered unavailable
        (the client may publish it again; the writer may have stored it)."""
        why = self.error or "the gateway is stopping"
        code = protocol.PRODUCER_FENCED if self.error and "fenced" in self.error \
            else protocol.UNAVAILABLE
        rest: list[Decision] = [(ref, seq, (code, why)) for seq, ref in sorted(refs.items())]
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                rest.append((item.ref, None, (code, why)))
        if rest:
            self._hand_over(rest)
