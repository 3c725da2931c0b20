"""The writer's retention (BUS_RETENTION_*): the oldest messages deleted in
chunks, each its own short transaction between batches, so that ingest never
waits for more than one chunk. `step(now)` deletes one chunk when due: every
loop pass while there is a backlog, else once every RETENTION_IDLE_SECONDS.
"""

from __future__ import annotations

import time
from typing import Any

from bus.config import BusConfig
from bus.logging import get_logger
from storage import audit as audit_rows

log = get_logger("writer")

# Retention runs this often when it has nothing left to delete, else every loop.
RETENTION_IDLE_SECONDS = 1.0


class Retention:
    """Deletes from `store` (storage.open_store's) what BUS_RETENTION_MAX_AGE_S
    and BUS_RETENTION_MAX_MESSAGES no longer keep."""

    def __init__(self, config: BusConfig, store: Any) -> None:
        self.config = config
        self.store = store
        self.enabled = bool(config.retention_max_age_s or config.retention_max_messages)
        self.due_at = 0.0
        self.counts = {"deleted_total": 0, "chunks": 0, "errors": 0,
                       "last_chunk_ms": 0.0, "max_chunk_ms": 0.0}
        if not config.audit_prefixes and audit_rows.last_sealed_id(store.conn):
            log.warning("retention_ignores_seals", reason="the database has audit seals and "
                        "BUS_AUDIT_PREFIXES is not set here: retention does not wait for the "
                        "seals (set it as the anchor worker has it)")

    def _sealed_upto(self) -> int:
        """With sealed topics, retention stops at the last sealed message: an
        unsealed message of a sealed topic is never deleted (nor, since
        retention goes in id order, anything after it)."""
        return audit_rows.last_sealed_id(self.store.conn)

    def due(self, now: float) -> bool:
        """Is a chunk due at `now` (time.monotonic())?"""
        return self.enabled and now >= self.due_at

    def step(self, now: float, now_ns: int | None = None) -> None:
        """Delete one chunk of expired messages if one is due at `now`
        (time.monotonic()); `now_ns`: the wall clock the messages' age is
        counted from (time.time_ns() if not given)."""
        cfg = self.config
        if not self.due(now):
            return
        if now_ns is None:
            now_ns = time.time_ns()
        before_ns = now_ns - int(cfg.retention_max_age_s * 1e9) \
            if cfg.retention_max_age_s else None
        started = time.perf_counter()
        try:
            deleted = self.store.delete_expired(before_ns, cfg.retention_max_messages or None,
                                                cfg.retention_chunk_rows,
                                                self._sealed_upto() if cfg.audit_prefixes
                                                else None)
        except self.store.transient_errors as exc:
            self.counts["errors"] += 1
            self.due_at = now + RETENTION_IDLE_SECONDS
            log.warning("retention_failed", error=str(exc), error_type=type(exc).__name__)
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        if deleted:
            counts = self.counts
            counts["deleted_total"] += deleted
            counts["chunks"] += 1
            counts["last_chunk_ms"] = round(elapsed_ms, 3)
            counts["max_chunk_ms"] = round(max(counts["max_chunk_ms"], elapsed_ms), 3)
        backlog = deleted >= cfg.retention_chunk_rows
        self.due_at = now if backlog else now + RETENTION_IDLE_SECONDS

    def poll_timeout_ms(self, now: float) -> int | None:
        """How long the loop may wait before the next chunk is due (None: never)."""
        if not self.enabled:
            return None
        return max(0, int((self.due_at - now) * 1000) + 1)

    def snapshot(self) -> dict[str, Any]:
        """stats' `retention`."""
        cfg = self.config
        return {"max_age_s": cfg.retention_max_age_s,
                "max_messages": cfg.retention_max_messages, **self.counts}
