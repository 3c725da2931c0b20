"""The anchor worker's events out: anchor.submitted, anchor.confirmed,
anchor.error (payloads in docs/protocol.md, "Anchoring"), published through
the bus and flushed (stored by the writer) after each step that matters."""

from __future__ import annotations

import uuid
from typing import Any

import msgpack
import zmq

from anchor.requests import Document
from bus import protocol
from bus.client import BusError, Publisher
from bus.config import BusConfig
from bus.logging import RateLimitedLog, get_logger
from proofs.merkle import MerkleTree

log = get_logger("anchor")

PROOFS_PER_EVENT = 500         # documents per anchor.submitted message (< 1 MiB)


class AnchorEvents:
    """`publisher` is set once the bus answers (no work happens before)."""

    def __init__(self, flush_timeout_s: float, warnings: RateLimitedLog) -> None:
        self.flush_timeout_s = flush_timeout_s
        self.warnings = warnings
        self.publisher: Publisher | None = None

    def connect(self, config: BusConfig, context: zmq.Context) -> None:
        """The publisher, a producer of its own at each start."""
        publisher = Publisher(config, context=context, send_timeout=5.0,
                              producer_id=f"anchor-{uuid.uuid4().hex[:12]}")
        publisher.connect()
        self.publisher = publisher

    def close(self) -> None:
        """What is still unacknowledged gets 2 s to be stored."""
        if self.publisher is None:
            return
        try:
            self.publisher.flush(timeout=2.0)
        except BusError:
            log.warning("events_not_acknowledged", unacked=self.publisher.unacked)
        self.publisher.close()

    def emit(self, topic: str, body: dict[str, Any]) -> None:
        self.publisher.publish(topic, msgpack.packb(body), content_type=protocol.CONTENT_MSGPACK)

    def flush(self) -> None:
        """Wait until the writer has stored the events published so far (they are
        re-sent meanwhile if need be); on a timeout they stay queued for the next
        flush, and the work goes on."""
        if self.publisher is None or not self.publisher.unacked:
            return
        try:
            self.publisher.flush(timeout=self.flush_timeout_s)
        except BusError as exc:
            self.warnings.warning("events", "events_not_acknowledged", error=str(exc),
                                  unacked=self.publisher.unacked)

    def submitted(self, anchor: dict[str, Any], docs: list[Document]) -> None:
        """anchor.submitted: the txid, the root, and each document's proof."""
        tree = MerkleTree([d.hash for d in docs])
        for start in range(0, len(docs), PROOFS_PER_EVENT):
            self.emit(protocol.ANCHOR_SUBMITTED_TOPIC, {
                "anchor_id": anchor["anchor_id"], "txid": anchor["txid"], "root": tree.root,
                "tree_size": tree.size, "fee_sat": anchor["fee_sat"],
                "replaces": anchor["replaced_txids"][-1] if anchor["replaced_txids"] else None,
                "documents": [{"hash": d.hash, "ref": d.ref, "leaf_index": i,
                               "path": tree.path(i)}
                              for i, d in enumerate(docs[start:start + PROOFS_PER_EVENT], start)]})
        self.flush()
