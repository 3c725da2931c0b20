"""Audit seals, built by the anchor worker (docs/protocol.md, "Audit seals").

Every BUS_AUDIT_INTERVAL_S the worker seals the stored messages of the
BUS_AUDIT_PREFIXES topics since the last seal: it reads them from the reader
(history pages, as any subscriber catching up), computes each one's digest
and the RFC 6962 root as they stream by (proofs/audit.py: O(log n) memory),
stores the digests through the writer a chunk at a time (`audit_leaves`),
closes the seal with its root (`audit_finish`), and hands what the writer
stored as the seal's document (the hash of its seal record: its id, id range,
size, digest version, root and prefixes) to the anchoring like any document
hash. One history page per loop pass, so the
worker's loop (blocks, control requests) never waits for a whole seal.

A seal covers an id range: from the message after the last seal's to the
newest message stored when the seal began (or BUS_AUDIT_MAX_MESSAGES matching
ones, the rest left to the next seal, at once). Nothing matching in it: the
seal is closed empty (root SHA-256 of nothing, RFC 6962's empty tree) and not
anchored, so the next one does not read that range again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack

from anchor.reservations import UtxoClient
from bus import protocol
from bus.client.history import HistoryClient
from bus.logging import get_logger
from proofs.audit import EMPTY_ROOT, SEAL_RECORD, RootBuilder, message_digest

log = get_logger("anchor")

CHUNK_LEAVES = 4096            # leaves per audit_leaves request (storage/audit.py's chunk)
DIGEST_VERSION = 2             # how this worker's seals digest a message: every column


class Sealer:
    def __init__(self, prefixes: list[str], interval_s: float, max_messages: int,
                 max_rate: float, utxos: UtxoClient, history: HistoryClient,
                 on_sealed: Callable[[int, bytes], None]) -> None:
        self.prefixes = prefixes
        self.interval_s = interval_s
        self.max_messages = max_messages
        self.max_rate = max_rate         # sealed messages per second, at most
        self.utxos = utxos
        self.history = history
        self.on_sealed = on_sealed
        self.counters = {"seals": 0, "sealed_messages": 0, "empty_seals": 0, "pages": 0}
        self.cpu_s = 0.0                 # process CPU spent sealing
        self._next = 0.0                 # the next page (or seal) not before (monotonic)
        self._seal: dict[str, Any] | None = None

    def wake_at(self) -> float | None:
        """When the seal being built takes its next page (None: no seal)."""
        return self._next if self._seal is not None else None

    def step(self, now: float) -> None:
        """One history page of the seal in progress, or a new seal when due;
        paced to BUS_AUDIT_MAX_RATE sealed messages a second, so that a seal
        takes a share of the machine, not all its idle CPU at once."""
        if now < self._next:
            return
        started = time.process_time()
        try:
            if self._seal is None:
                self._begin()
            pace = self._page() / self.max_rate
            # In a seal, its next page; after one, the next seal's start (now
            # for a backlog, else BUS_AUDIT_INTERVAL_S), paced all the same.
            self._next = max(self._next, now) + pace if self._seal is not None else \
                max(self._next, now + pace)
        finally:
            self.cpu_s += time.process_time() - started

    def _begin(self) -> None:
        begun = self.utxos.call("audit_begin", {"request_id": uuid.uuid4().hex,
                                                "prefixes": self.prefixes,
                                                "seal_version": SEAL_RECORD,
                                                "digest_version": DIGEST_VERSION})
        self._seal = {"seal_id": begun["seal_id"], "after": begun["first_id"] - 1,
                      "upto": None, "root": RootBuilder(), "ids": [], "digests": [],
                      "chunk": 0, "size": 0}

    def _page(self) -> int:
        """Seal the messages of one history page; how many."""
        seal = self._seal
        size_before = seal["size"]
        page = self.history.page(self.prefixes, after_id=seal["after"])
        self.counters["pages"] += 1
        if seal["upto"] is None:
            seal["upto"] = page.last_id    # the seal ends at what was stored when it began
            if seal["upto"] <= seal["after"]:  # nothing stored since the last seal
                self._seal = None          # (the open seal goes with the next begin)
                self._next = time.monotonic() + self.interval_s
                return 0
        upto, full = seal["upto"], False
        for row_id, topic, payload, meta_raw, committed_ns in page.rows:
            if row_id > upto:
                break
            if seal["size"] >= self.max_messages:
                full = True
                break
            meta = {} if meta_raw is None else msgpack.unpackb(meta_raw, raw=False,
                                                               strict_map_key=False)
            # The columns the writer derives from the meta, derived as it does.
            digest = message_digest(row_id, topic, payload, meta_raw,
                                    meta.get(protocol.META_PRODUCER), meta.get(protocol.META_SEQ),
                                    meta.get(protocol.META_TIME_NS), committed_ns,
                                    version=DIGEST_VERSION)
            seal["root"].add(digest)
            seal["ids"].append(row_id.to_bytes(8, "big"))
            seal["digests"].append(digest)
            seal["size"] += 1
            seal["after"] = row_id
            if len(seal["ids"]) == CHUNK_LEAVES:
                self._store_leaves()
        if not full:
            seal["after"] = max(seal["after"], min(page.after_id, upto))
        sealed = seal["size"] - size_before
        if full or seal["after"] >= upto or not page.more:
            self._finish(backlog=full)
        return sealed

    def _store_leaves(self) -> None:
        seal = self._seal
        if seal["ids"]:
            self.utxos.call("audit_leaves", {"seal_id": seal["seal_id"], "chunk": seal["chunk"],
                                             "ids": b"".join(seal["ids"]),
                                             "digests": b"".join(seal["digests"])})
            seal["chunk"] += 1
            seal["ids"], seal["digests"] = [], []

    def _finish(self, backlog: bool) -> None:
        self._store_leaves()
        seal, self._seal = self._seal, None
        root = seal["root"].root if seal["size"] else EMPTY_ROOT
        finished = self.utxos.call("audit_finish", {
            "request_id": uuid.uuid4().hex, "seal_id": seal["seal_id"],
            "last_id": seal["after"], "size": seal["size"], "root": root})
        self._next = time.monotonic() + (0 if backlog else self.interval_s)
        if not seal["size"]:
            self.counters["empty_seals"] += 1
            return
        self.counters["seals"] += 1
        self.counters["sealed_messages"] += seal["size"]
        # A writer from before seal records names no document: the root is
        # what it stored a version 1 seal for.
        document = finished.get("document", root)
        log.info("audit_sealed", seal_id=seal["seal_id"], messages=seal["size"],
                 last_id=seal["after"], root=root.hex(), document=document.hex(),
                 cpu_s=round(self.cpu_s, 3))
        self.on_sealed(seal["seal_id"], document)

    def snapshot(self) -> dict[str, Any]:
        in_progress = self._seal["size"] if self._seal is not None else 0
        return {**self.counters, "in_progress": in_progress, "cpu_s": round(self.cpu_s, 3),
                "building": self._seal is not None, "max_rate": self.max_rate,
                "prefixes": self.prefixes}
