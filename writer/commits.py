"""The writer's commits: the batch buffer, when it is committed, and how.

One transaction per BATCH_SIZE rows, or when the oldest row has waited
BATCH_FLUSH_INTERVAL_MS, or at once when the capture is idle and the load is
low, or (group commit, BATCH_GROUP_COMMIT) when the capture ran dry and the
last commit is far enough behind (`step`); BATCH_WRITE_ENABLED=false commits
every message on its own (`sequential`: decided here, and only here). A failed
commit keeps its rows and is retried after FLUSH_RETRY_SECONDS; after a full
disk, the backlog is committed in parts that fit. On PostgreSQL
(BUS_PG_OVERLAP_COMMITS), a batch commits on the store's thread while the loop
gathers the next: one in flight at a time, landed by `step`. Every commit
owes its notifications (writer/notifications.py). Every method takes `now`
(time.monotonic() seconds).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from bus.config import BusConfig
from bus.http import HttpSide
from bus.logging import get_logger
from writer.batch import BatchBuffer, BatchMetrics, DetachedRows, LoadMeter
from writer.notifications import Notifications, OwedAck, acks_of
from writer.producers import ProducerLedger

log = get_logger("writer")

# After a failed flush, wait this long before trying again.
FLUSH_RETRY_SECONDS = 0.5
# Longest wait for a landed commit's callback (microseconds, on its thread).
CALLBACK_WAIT_S = 1.0
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


@dataclass
class InFlight:
    """A commit running while the loop goes on (Commits.overlapped)."""
    future: Future[tuple[int, int | None]]
    rows: DetachedRows
    acks: list[OwedAck]  # as of the rows it carries
    reason: str
    started: float  # perf_counter(): when it was handed over, and when it ended
    ended: float = 0.0
    # Set by the future's callback, on the committer thread, after `ended` and
    # the wakeup: once it is, nothing of this commit touches the writer's state.
    told: threading.Event = field(default_factory=threading.Event)


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
        # BUS_PG_OVERLAP_COMMITS, on a store whose commits can run beside the
        # loop (storage/postgres.py, start_batch): one at a time, and what it
        # carries is acknowledged only once it has landed. `wakeup_fd` is
        # readable when it has (docs/architecture.md, "One commit in flight").
        self.overlapped = cfg.pg_overlap_commits and not self.sequential and \
            getattr(store, "overlaps_commits", False)
        self.in_flight: InFlight | None = None
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) \
            if self.overlapped else None

    def step(self, now: float, idle: bool) -> None:
        """Commit if a commit is due (`idle`: the capture ran dry or brought
        nothing to store in this pass)."""
        if self.in_flight is not None:
            if not self.in_flight.future.done():
                return  # what arrives meanwhile is the next batch
            self._land(now)
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
            self.flush(reason, now, overlap=self.overlapped)

    def flush(self, reason: str, now: float, overlap: bool = False) -> bool:
        """Commit the whole buffer as one transaction; True once it is (or,
        with `overlap`, once it is on its way: `step` lands it). A commit in
        flight lands first. On a transient database error the rows stay
        buffered and the flush is retried later. After a full disk, the
        backlog is committed in parts that fit (halved after each failure,
        doubled after each success), so that any space freed is used at once,
        until the rest fits in one transaction."""
        if self.in_flight is not None:
            self._land(now)  # waits; its rows are buffered again if it failed
        if self.store is None or not (self.buffer or self.producers.dirty):
            return True
        flush_started = time.perf_counter()  # the pace counts every part of it
        while len(self.buffer.messages) > self._rows_per_transaction():
            if not self._commit_part(reason, now):
                return False
        if overlap and self._part_rows is None:
            self._start(reason)
            return True
        items = len(self.buffer)
        started = time.perf_counter()
        try:
            committed_ns, last_id = self.store.write_batch(
                self.buffer.messages, self.producers.dirty_rows(), self.buffer.consumptions)
        except self.store.transient_errors as exc:
            self._flush_failed(exc, now)
            return False
        seconds = time.perf_counter() - started
        self._recovered(now, items)
        if items:  # not for a write of producer counters alone
            self.metrics.record_flush(items, reason, seconds, batched=not self.sequential)
            if self.timings is not None:
                self.timings.observe(seconds, items, self.buffer.oldest_at)
        self.notifications.owe_commit(committed_ns, last_id, len(self.buffer.messages),
                                      acks_of(self.producers.committed()))
        self.buffer.clear()
        self._paced(now, time.perf_counter() - flush_started)
        return True

    def _start(self, reason: str) -> None:
        """Hand the whole buffer to the store's committer (start_batch), with
        the producers' rows and acknowledgements as of its rows."""
        producer_rows = self.producers.dirty_rows()
        acks = acks_of(self.producers.committing())
        rows = self.buffer.detach()
        flight = InFlight(self.store.start_batch(rows.messages, producer_rows,
                                                 rows.consumptions),
                          rows, acks, reason, time.perf_counter())
        self.in_flight = flight
        wakeup_fd = self.wakeup_fd

        def ended(_future: Future[Any]) -> None:  # on the committer thread
            flight.ended = time.perf_counter()
            os.eventfd_write(wakeup_fd, 1)
            flight.told.set()
        flight.future.add_done_callback(ended)

    def _land(self, now: float) -> bool:
        """The commit in flight, waited for if need be: its acknowledgements
        owed and its rows released if it committed, its rows and producer
        states back in the buffer if it failed (retried as any failed
        flush). True if it committed."""
        flight, self.in_flight = self.in_flight, None
        failure = flight.future.exception()  # waits
        # Its callback runs just after done(): its wakeup must not be left for
        # a closed descriptor, nor its `ended` be read before it is set.
        flight.told.wait(CALLBACK_WAIT_S)
        self._clear_wakeup()
        if failure is not None:
            self.buffer.restore(flight.rows)
            self.producers.failed()
            if not isinstance(failure, self.store.transient_errors):
                raise failure
            self._flush_failed(failure, now)
            return False
        committed_ns, last_id = flight.future.result()
        self.buffer.release()
        self.producers.landed()
        seconds = (flight.ended or time.perf_counter()) - flight.started
        items = len(flight.rows.messages) + len(flight.rows.consumptions)
        self._recovered(now, items)
        if items:
            self.metrics.record_flush(items, flight.reason, seconds, batched=True)
            if self.timings is not None:
                self.timings.observe(seconds, items, flight.rows.oldest_at)
        self.notifications.owe_commit(committed_ns, last_id, len(flight.rows.messages),
                                      flight.acks)
        # Not paced (GROUP_COMMIT_PACE): the commit did not stop the loop, so
        # the next drained capture is committed as soon as this one landed.
        return True

    def settle(self, now: float) -> None:
        """Land the commit in flight, waiting for it if need be: for a reader
        of the counters that also reads the database (`stats`), which would
        otherwise see the commit's rows before its counters."""
        if self.in_flight is not None:
            self._land(now)

    def commit_ended(self, timeout: float) -> bool:
        """Has the commit in flight ended (True if there is none), waited for
        at most `timeout` seconds? Not landed: `step` does that."""
        return self.in_flight is None or self.in_flight.told.wait(timeout)

    def _clear_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wakeup_fd)

    def close(self) -> None:
        """After the last flush: the wakeup's descriptor."""
        if self.wakeup_fd is not None:
            os.close(self.wakeup_fd)
            self.wakeup_fd = None

    def _recovered(self, now: float, rows: int) -> None:
        if self.failing_since is not None:
            log.info("flush_recovered", failed_for_s=round(now - self.failing_since, 3),
                     rows=rows)
            self.failing_since = self._part_rows = self.last_error = None

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
        self.notifications.owe_commit(committed_ns, last_id, count, acks_of(states))
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

    @property
    def holding_capture(self) -> bool:
        """Is the capture left unread? While the buffer is full, and while a
        commit is in flight and the next batch is complete (its rows would
        only make that batch larger than BATCH_SIZE)."""
        return self.buffer.is_full or (self.in_flight is not None and self.buffer.room == 0)

    def poll_timeout_ms(self, now: float) -> tuple[int, bool]:
        """How long the loop may wait for input before a commit is due, and
        whether that wait is for a retry (nothing else is then waited for)."""
        if self.in_flight is not None:  # its end wakes the poll (wakeup_fd)
            return 1000, False
        if self.buffer.is_full or (self.buffer and now < self.retry_at):
            return max(1, int((self.retry_at - now) * 1000) + 1), True
        wait = self.buffer.seconds_until_due(now)
        if self.group_commit and self.buffer:  # wake for the drained commit
            drained = max(0.0, self.group_commit_at - now)
            wait = drained if wait is None else min(wait, drained)
        return (1000 if wait is None else int(wait * 1000) + 1), False

    def backlog(self, now: float) -> dict[str, Any]:
        """stats: what waits for a commit, and since when commits fail."""
        return {"rows": len(self.buffer) + self.buffer.held_rows,
                "bytes": self.buffer.bytes + self.buffer.held_bytes,
                "failing_for_s": None if self.failing_since is None
                else round(now - self.failing_since, 3),
                "last_error": self.last_error, "part_rows": self._part_rows}

    def snapshot(self) -> dict[str, Any]:
        """stats' `batch`: the commits' counters, the buffer and the batch settings."""
        cfg = self.config
        batch = self.metrics.snapshot()
        batch.update(buffer_sizes=self.buffer.sizes(), db_queue_size=len(self.buffer) + self.buffer.held_rows,
                     config={"enabled": not self.sequential, "batch_size": cfg.batch_size,
                             "flush_interval_ms": cfg.batch_flush_interval_ms,
                             "max_buffer_size": cfg.batch_max_buffer_size})
        return batch
