"""The writer's commits: the batch buffer, when it is committed, and how.

One transaction per BATCH_SIZE rows, or when the oldest row has waited
BATCH_FLUSH_INTERVAL_MS, or at once when the capture is idle and the load is
low, or (group commit, BATCH_GROUP_COMMIT) when the capture ran dry and the
last commit is far enough behind (`step`); BATCH_WRITE_ENABLED=false commits
every message on its own (`sequential`: decided here, and only here). A failed
commit keeps its rows and is retried after FLUSH_RETRY_SECONDS; after a full
disk, the backlog is committed in parts that fit. Every commit owes its
notifications (writer/notifications.py). Every method takes `now`
(time.monotonic() seconds).
"""

from __future__ import annotations

import time
from typing import Any

from bus.config import BusConfig
from bus.http import HttpSide
from bus.logging import get_logger
from writer.batch import BatchBuffer, BatchMetrics, LoadMeter
from writer.notifications import Notifications
from writer.producers import ProducerLedger

log = get_logger("writer")

# After a failed flush, wait this long before trying again.
FLUSH_RETRY_SECONDS = 0.5
# Group commit's pace: after a commit that took C seconds (all its parts), a
# drained capture is committed no sooner than (1 + GROUP_COMMIT_PACE) x C after
# the loop pass that made it began (its read counts as pause), so that commits
# take at most 1 / (1 + GROUP_COMMIT_PACE) of the writer's time. What arrives
# meanwhile is the next batch: under load the batches grow by themselves, at a
# trickle each message is committed at once. Unpaced (a commit at every dry
# read), 50,000 msg/s collapsed to 9,000 acknowledged msg/s here, in commits
# of 22 rows; paced at 1, 41,500 msg/s with a p99 of 1.6 s. At 2 and 4 the
# bus keeps 50,000 msg/s and its full acknowledged rate (108,000-128,000 msg/s
# either way, alternating runs), and 2 waits less: acknowledgement p99 at
# 10,000 msg/s 2.2-2.8 ms against 2.9-4.4 (README, "Group commit").
# PostgreSQL's commit_delay and Kafka's linger.ms wait a fixed time instead,
# and default to none for the same reason: a wait only pays under load, and
# the commit's own cost measures the load.
GROUP_COMMIT_PACE = 2


class CommitTimings:
    """The commit histograms of the writer's /metrics (bus/http.py)."""

    def __init__(self, http: HttpSide) -> None:
        self.commit_seconds = http.histogram(
            "batch_commit_seconds", "time to commit one batch",
            (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.batch_rows = http.histogram(
            "batch_rows", "rows in one committed batch",
            (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000))
        self.batch_wait_seconds = http.histogram(
            "batch_wait_seconds", "how long the oldest row of a batch waited in the writer "
            "before its commit (the writer's part of acknowledgement latency)",
            (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))

    def observe(self, seconds: float, rows: int, oldest_at: float | None) -> None:
        self.commit_seconds.observe(seconds)
        self.batch_rows.observe(rows)
        if oldest_at is not None:
            self.batch_wait_seconds.observe(max(0.0, time.monotonic() - oldest_at))


class Commits:
    """The buffer and its commits to `store` (storage.open_store's), with the
    producers' states (`producers`) and what each commit owes (`notifications`)."""

    def __init__(self, config: BusConfig, store: Any, producers: ProducerLedger,
                 notifications: Notifications, timings: CommitTimings | None = None) -> None:
        cfg = config
        self.config = cfg
        # BATCH_WRITE_ENABLED=false: each message its own transaction (a buffer
        # of one), read many a poll all the same (writer/ingest.py), and not
        # counted as batched. Everything else asks this attribute.
        self.sequential = not cfg.batch_write_enabled
        self.buffer = BatchBuffer(1 if self.sequential else cfg.batch_size,
                                  cfg.batch_flush_interval_ms / 1000.0, cfg.batch_max_buffer_size,
                                  cfg.batch_max_buffer_bytes)
        self.metrics = BatchMetrics()
        self.load = LoadMeter(cfg.batch_low_load_threshold, cfg.batch_load_window_seconds)
        self.store = store
        self.producers = producers
        self.notifications = notifications
        self.timings = timings
        self.retry_at = 0.0
        self.failing_since: float | None = None  # first failed commit of a failing run
        self.last_error: str | None = None
        self._part_rows: int | None = None  # after a full disk: rows per transaction
        self.group_commit = cfg.batch_group_commit and not self.sequential
        self.group_commit_at = 0.0  # a drained capture is committed from then on

    def step(self, now: float, idle: bool) -> None:
        """Commit if a commit is due (`idle`: the capture ran dry or brought
        nothing to store in this pass)."""
        if now < self.retry_at:
            return
        if not self.buffer:
            if self.producers.dirty:
                # Only retransmissions arrived: what they repeat is committed, but
                # their publisher missed the acknowledgement. A commit of the ledger
                # alone sends it again.
                self.flush("ack", now)
            return
        reason = self.buffer.due(now)
        if reason is None and idle:
            if self.load.is_low_load(now):
                reason = "low_load"
            elif self.group_commit and now >= self.group_commit_at:
                reason = "drained"
        if reason is not None:
            self.flush(reason, now)

    def flush(self, reason: str, now: float) -> bool:
        """Commit the whole buffer as one transaction; True once it is. On a
        transient database error the rows stay buffered and the flush is retried
        later. After a full disk, the backlog is committed in parts that fit
        (halved after each failure, doubled after each success), so that any
        space freed is used at once, until the rest fits in one transaction."""
        if self.store is None or not (self.buffer or self.producers.dirty):
            return True
        flush_started = time.perf_counter()  # the pace counts every part of it
        while len(self.buffer.messages) > self._rows_per_transaction():
            if not self._commit_part(reason, now):
                return False
        items = len(self.buffer)
        started = time.perf_counter()
        try:
            committed_ns, last_id = self.store.write_batch(
                self.buffer.messages, self.producers.dirty_rows(), self.buffer.consumptions)
        except self.store.transient_errors as exc:
            self._flush_failed(exc, now)
            return False
        seconds = time.perf_counter() - started
        if self.failing_since is not None:
            log.info("flush_recovered", failed_for_s=round(now - self.failing_since, 3),
                     rows=items)
            self.failing_since = self._part_rows = self.last_error = None
        if items:  # not for a write of producer counters alone
            self.metrics.record_flush(items, reason, seconds, batched=not self.sequential)
            if self.timings is not None:
                self.timings.observe(seconds, items, self.buffer.oldest_at)
        self.notifications.owe_commit(committed_ns, last_id, len(self.buffer.messages),
                                      self.producers.committed())
        self.buffer.clear()
        self._paced(now, time.perf_counter() - flush_started)
        return True

    def _commit_part(self, reason: str, now: float) -> bool:
        """Commit the oldest buffered messages that one transaction may take
        (_rows_per_transaction), and the consumer positions, with their
        producers' states as of those messages."""
        count = self._rows_per_transaction()
        part = self.buffer.messages[:count]
        states = self.producers.replay(part)
        positions = len(self.buffer.consumptions)
        started = time.perf_counter()
        try:
            committed_ns, last_id = self.store.write_batch(
                part, [state.row() for state in states], self.buffer.consumptions)
        except self.store.transient_errors as exc:
            self._flush_failed(exc, now)
            return False
        self.metrics.record_flush(count + positions, reason, time.perf_counter() - started,
                                  batched=not self.sequential)
        self.notifications.owe_commit(committed_ns, last_id, count, states)
        self.buffer.take(count)
        if self._part_rows is not None:  # after a full disk (not a part for a small one)
            self._part_rows = count * 2
            log.info("backlog_part_committed", rows=count, waiting_rows=len(self.buffer),
                     waiting_bytes=self.buffer.bytes)
        return True

    def _paced(self, now: float, seconds: float) -> None:
        """After a flush in the pass begun at `now` whose commits (all its
        parts) took `seconds`: when a drained capture may be committed next
        (GROUP_COMMIT_PACE)."""
        self.group_commit_at = now + seconds * (1 + GROUP_COMMIT_PACE)

    def _rows_per_transaction(self) -> int:
        """How many of the buffered messages one transaction takes: after a
        full disk, `_part_rows`; and on a small disk no more than the store's
        `transaction_bytes` (a part of the free space, storage/sqlite.py
        wal_budget): a WAL holding more than the database file has room for
        could never be checkpointed."""
        messages = len(self.buffer.messages)
        rows = messages if self._part_rows is None else self._part_rows
        budget = getattr(self.store, "transaction_bytes", None)
        if budget is not None and self.buffer.bytes > budget:
            rows = min(rows, messages * budget // self.buffer.bytes)
        return max(1, rows)

    def _flush_failed(self, exc: Exception, now: float) -> None:
        self.metrics.flush_errors += 1
        self.retry_at = now + FLUSH_RETRY_SECONDS
        if self.failing_since is None:
            self.failing_since = now
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.store.is_disk_full(exc):
            # All or nothing would wait for room for the whole backlog at once.
            waiting = len(self.buffer.messages)
            self._part_rows = max(1, min(self._part_rows or waiting, waiting) // 2)
        log.error("flush_failed", error=str(exc), error_type=type(exc).__name__,
                  waiting_rows=len(self.buffer), waiting_bytes=self.buffer.bytes,
                  failing_for_s=round(now - self.failing_since, 3),
                  will_retry_in_s=FLUSH_RETRY_SECONDS, next_part_rows=self._part_rows)

    def poll_timeout_ms(self, now: float) -> tuple[int, bool]:
        """How long the loop may wait for input before a commit is due, and
        whether that wait is for a retry (nothing else is then waited for)."""
        if self.buffer.is_full or (self.buffer and now < self.retry_at):
            return max(1, int((self.retry_at - now) * 1000) + 1), True
        wait = self.buffer.seconds_until_due(now)
        if self.group_commit and self.buffer:  # wake for the drained commit
            drained = max(0.0, self.group_commit_at - now)
            wait = drained if wait is None else min(wait, drained)
        return (1000 if wait is None else int(wait * 1000) + 1), False

    def backlog(self, now: float) -> dict[str, Any]:
        """stats: what waits for a commit, and since when commits fail."""
        return {"rows": len(self.buffer), "bytes": self.buffer.bytes,
                "failing_for_s": None if self.failing_since is None
                else round(now - self.failing_since, 3),
                "last_error": self.last_error, "part_rows": self._part_rows}

    def snapshot(self) -> dict[str, Any]:
        """stats' `batch`: the commits' counters, the buffer and the batch settings."""
        cfg = self.config
        batch = self.metrics.snapshot()
        batch.update(buffer_sizes=self.buffer.sizes(), db_queue_size=len(self.buffer),
                     config={"enabled": not self.sequential, "batch_size": cfg.batch_size,
                             "flush_interval_ms": cfg.batch_flush_interval_ms,
                             "max_buffer_size": cfg.batch_max_buffer_size})
        return batch
