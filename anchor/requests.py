"""Request intake: the anchor.request messages read, the documents waiting to
be anchored, and when to anchor them.

The requests come from the durable consumer BUS_ANCHOR_CONSUMER, read
without auto-acknowledgement: its position moves only past requests that are
recorded in an anchor (or refused, or repeated), so a worker that dies with
documents waiting reads them again at its next start. At most
BUS_ANCHOR_MAX_DOCUMENTS wait in memory; past that the intake stops reading
and the rest waits in the database. A batch is due when it is full, or
BUS_ANCHOR_INTERVAL_S after its first document came.

Every method that depends on the time takes it (`now`, monotonic seconds),
so a test steps the intake without waiting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from bus import protocol
from bus.client import Subscriber
from bus.config import BusConfig
from bus.logging import RateLimitedLog
from bus.protocol import Message

MAX_REF_CHARS = protocol.MAX_ANCHOR_REF_CHARS


class RequestRefused(ValueError):
    """An anchor.request that cannot be anchored (bad payload)."""


@dataclass(slots=True)
class Document:
    hash: bytes
    ref: str | None
    message_id: int | None


def parse_request(payload: bytes) -> tuple[bytes, str | None]:
    """(hash, ref) of an anchor.request payload: a msgpack or JSON map
    {hash: 32 bytes or 64 hex chars, ref?: str}, or the 32 raw bytes."""
    if len(payload) == 32:
        return payload, None
    try:
        request = msgpack.unpackb(payload, raw=False)
    except Exception:
        try:
            request = json.loads(payload)
        except ValueError:
            raise RequestRefused("payload is not msgpack, JSON or 32 raw bytes") from None
    if not isinstance(request, dict):
        raise RequestRefused("payload must be a map {hash, ref?}")
    digest = request.get("hash")
    if isinstance(digest, str):
        try:
            digest = bytes.fromhex(digest)
        except ValueError:
            raise RequestRefused("'hash' is not hex") from None
    if not (isinstance(digest, bytes) and len(digest) == 32):
        raise RequestRefused("'hash' must be a SHA-256: 32 bytes or 64 hex characters")
    ref = request.get("ref")
    if ref is not None and not (isinstance(ref, str) and len(ref) <= MAX_REF_CHARS
                                and "\x00" not in ref):
        raise RequestRefused(f"'ref' must be a string of at most {MAX_REF_CHARS} characters,"
                             " no NUL")
    return digest, ref


class RequestIntake:
    """The documents waiting to be anchored, each hash once, in the order read.

    `requests` is the durable subscriber, set once the bus answers; `emit`
    publishes an event (anchor.error for a refused request); `counters` is
    the worker's (requests, refused, duplicates counted here)."""

    def __init__(self, max_documents: int, interval_s: float,
                 emit: Callable[[str, dict[str, Any]], None], counters: dict[str, int],
                 warnings: RateLimitedLog, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_documents = max_documents
        self.interval_s = interval_s
        self.emit = emit
        self.counters = counters
        self.warnings = warnings
        self.clock = clock                       # stamps requests read during a wait
        self.requests: Subscriber | None = None
        self.pending: list[Document] = []
        self._hashes: set[bytes] = set()
        self.since: float | None = None          # when the oldest waiting document came
        self.last_taken: Message | None = None   # the newest request read

    def __len__(self) -> int:
        return len(self.pending)

    def waiting(self, digest: bytes) -> bool:
        return digest in self._hashes

    @property
    def full(self) -> bool:
        """No more requests are read until a batch is anchored."""
        return len(self.pending) >= self.max_documents

    def due_at(self) -> float | None:
        """When the waiting documents are anchored at the latest (None: none wait)."""
        return None if self.since is None else self.since + self.interval_s

    def due(self, now: float) -> bool:
        return bool(self.pending) and (self.full or now >= self.since + self.interval_s)

    def waiting_s(self, now: float) -> float:
        return round(now - self.since, 3) if self.since is not None else 0.0

    def status(self, digest: bytes) -> dict[str, Any]:
        """`request_status`: whether `digest` waits here, how far the stored
        requests are read."""
        requests = self.requests
        return {"hash": digest, "waiting": self.waiting(digest), "reading": requests is not None,
                "read_through_id": requests.received_through if requests is not None else None,
                "documents": len(self.pending), "max_documents": self.max_documents}

    # --- reading ----------------------------------------------------------------------

    def connect(self, config: BusConfig, context: zmq.Context) -> None:
        """The durable consumer. A new one starts before the first stored
        message (after_id=0), not after the newest: requests stored before the
        worker's first start (or while its consumer was gone) are read too.
        Those already anchored are left out when a batch is anchored
        (`anchor_known`)."""
        self.requests = Subscriber([protocol.ANCHOR_REQUEST_TOPIC], config, context=context,
                                   durable=config.anchor_consumer, auto_ack=False, after_id=0)

    def close(self) -> None:
        if self.requests is not None:
            self.requests.close()  # stores the position of what was recorded, no further

    def read(self, wait: float) -> None:
        """Read requests, waiting up to `wait` seconds for the first, until the
        batch is full or none is left to read."""
        msg = self.requests.receive(wait)
        now = self.clock() if msg is not None else 0.0
        while msg is not None:
            self.accept(msg, now)
            if self.full:
                break
            msg = self.requests.receive(0)
        if not self.pending and self.last_taken is not None:
            self.requests.ack(self.last_taken)  # only refused or repeated requests read

    def accept(self, msg: Message, now: float) -> None:
        """One request read: its document waits, or it is refused (an
        anchor.error event) or a repeat of one waiting."""
        self.counters["requests"] += 1
        self.last_taken = msg
        try:
            digest, ref = parse_request(msg.payload)
        except RequestRefused as exc:
            self.counters["refused"] += 1
            self.warnings.warning("refused", "anchor_request_refused", message_id=msg.id,
                                  detail=str(exc))
            self.emit(protocol.ANCHOR_ERROR_TOPIC, {"error": protocol.BAD_REQUEST,
                                                    "reason": str(exc), "message_id": msg.id})
            return
        if digest in self._hashes:
            self.counters["duplicates"] += 1
            return
        self._hashes.add(digest)
        self.pending.append(Document(digest, ref, msg.id))
        if self.since is None:
            self.since = now

    def add(self, doc: Document, now: float) -> None:
        """A document from elsewhere than a request (a seal's root) joins the batch."""
        if doc.hash not in self._hashes:
            self._hashes.add(doc.hash)
            self.pending.append(doc)
            self.since = self.since or now

    def requeue(self, docs: list[Document], now: float) -> None:
        """An anchor's documents back to wait (bitcoind refused its transaction)."""
        for doc in docs:
            if doc.hash not in self._hashes:
                self._hashes.add(doc.hash)
                self.pending.append(doc)
        self.since = self.since or now

    # --- a batch ----------------------------------------------------------------------

    def batch(self) -> list[Document]:
        """The documents of the next anchor: the oldest, up to max_documents."""
        return self.pending[:self.max_documents]

    def done(self, batch: list[Document], now: float) -> None:
        """The batch is recorded (or was anchored before): it is done here, and the
        durable position moves past its newest request."""
        del self.pending[:len(batch)]
        for doc in batch:
            self._hashes.discard(doc.hash)
        self.since = now if self.pending else None
        if not self.pending:
            self.requests.ack(self.last_taken)
        else:  # the rest of what was read waits for the next anchoring
            self.requests.ack(max(d.message_id or 0 for d in batch))
