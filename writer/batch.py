"""The batch buffer and the writer's batch and load metrics.

Pure bookkeeping, no I/O and no clock of its own: every method takes `now`
(time.monotonic() seconds), so unit tests step it by hand.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from storage.messages import MessageRow
from storage.sessions import ConsumptionRow

# Why a batch was flushed; each has a counter `flush_by_<reason>`.
FLUSH_REASONS = ("size", "time", "shutdown", "low_load", "drained", "request")


class DetachedRows(NamedTuple):
    """A buffer's rows as a commit in flight took them (BatchBuffer.detach)."""
    messages: list[MessageRow]
    consumptions: list[ConsumptionRow]
    oldest_at: float | None
    bytes: int


class BatchBuffer:
    """Rows waiting for the next transaction, by kind.

    Flush by size when `batch_size` rows are waiting, by time when the oldest has
    waited `flush_interval` seconds. Rows stay here until their transaction has
    committed, so a failed flush loses nothing; `is_full` tells the writer to stop
    reading its socket, which pushes back to the proxy's high-water mark.
    """

    def __init__(self, batch_size: int, flush_interval: float, max_size: int,
                 max_bytes: int = 64 << 20) -> None:
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_size = max_size
        self.max_bytes = max_bytes
        self.bytes = 0  # topic, payload and meta of the buffered messages
        self.messages: list[MessageRow] = []
        # Durable-consumer positions join the batch here (the seed's "consumptions").
        self.consumptions: list[ConsumptionRow] = []
        self.oldest_at: float | None = None
        # Rows handed to a commit still in flight (detach): counted against the
        # limits until that commit lands (release) or fails (restore).
        self.held_rows = 0
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self.messages) + len(self.consumptions)

    def add_message(self, row: MessageRow, now: float, size: int | None = None) -> None:
        """Buffer a message row; `size`: its bytes if the caller knows them."""
        if self.oldest_at is None:
            self.oldest_at = now
        self.messages.append(row)
        self.bytes += _row_bytes(row) if size is None else size

    def add_consumption(self, row: ConsumptionRow, now: float) -> None:
        if self.oldest_at is None:
            self.oldest_at = now
        self.consumptions.append(row)

    @property
    def room(self) -> int:
        """How many more rows to read before the next flush by size."""
        return max(0, self.batch_size - len(self))

    @property
    def is_full(self) -> bool:
        return len(self) + self.held_rows >= self.max_size or \
            self.bytes + self.held_bytes >= self.max_bytes

    def due(self, now: float) -> str | None:
        """The reason a flush is due now, or None."""
        if not self:
            return None
        if len(self) >= self.batch_size:
            return "size"
        if now - self.oldest_at >= self.flush_interval:
            return "time"
        return None

    def seconds_until_due(self, now: float) -> float | None:
        if self.oldest_at is None:
            return None
        return max(0.0, self.oldest_at + self.flush_interval - now)

    def clear(self) -> None:
        self.messages = []
        self.consumptions = []
        self.oldest_at = None
        self.bytes = 0

    def take(self, count: int) -> None:
        """Drop the oldest `count` messages and every consumption: committed by a
        transaction of part of the buffer (writer: a full disk's backlog)."""
        self.bytes -= sum(_row_bytes(row) for row in self.messages[:count])
        del self.messages[:count]
        self.consumptions = []
        if not self.messages:
            self.clear()

    def detach(self) -> DetachedRows:
        """Hand every row to a commit that runs while more are buffered: the
        buffer is empty, and still holds their count and bytes."""
        rows = DetachedRows(self.messages, self.consumptions, self.oldest_at, self.bytes)
        self.clear()
        self.held_rows, self.held_bytes = len(rows.messages) + len(rows.consumptions), rows.bytes
        return rows

    def release(self) -> None:
        """The detached rows are committed."""
        self.held_rows = self.held_bytes = 0

    def restore(self, rows: DetachedRows) -> None:
        """The commit of the detached `rows` failed: they are buffered again,
        before those buffered since."""
        self.release()
        self.messages = rows.messages + self.messages
        self.consumptions = rows.consumptions + self.consumptions
        self.bytes += rows.bytes
        if rows.oldest_at is not None:
            self.oldest_at = rows.oldest_at

    def sizes(self) -> dict[str, int]:
        # "subscriptions" stays for the seed's metrics shape: the proxy no longer
        # passes subscriptions to the writer (docs/protocol.md, "The capture pipe").
        return {"messages": len(self.messages), "consumptions": len(self.consumptions),
                "subscriptions": 0}


def _row_bytes(row: MessageRow) -> int:
    """The bytes of a buffered message's frames, as the writer received them."""
    return len(row[0].encode("utf-8")) + len(row[1]) + (len(row[2]) if row[2] else 0)


class BatchMetrics:
    def __init__(self) -> None:
        self.total_flushes = 0
        self.total_writes = 0
        self.total_batched_items = 0
        self.flush_by = dict.fromkeys(FLUSH_REASONS, 0)
        self.flush_errors = 0
        self.max_batch_size = 0
        self.min_batch_size: int | None = None
        self.last_flush_ms = 0.0
        self.max_flush_ms = 0.0

    def record_flush(self, items: int, reason: str, seconds: float, batched: bool) -> None:
        self.total_flushes += 1
        self.total_writes += items
        if batched:
            self.total_batched_items += items
        self.flush_by[reason] += 1
        self.max_batch_size = max(self.max_batch_size, items)
        self.min_batch_size = items if self.min_batch_size is None else min(self.min_batch_size, items)
        self.last_flush_ms = seconds * 1000.0
        self.max_flush_ms = max(self.max_flush_ms, self.last_flush_ms)

    def snapshot(self) -> dict[str, Any]:
        return {
            "total_flushes": self.total_flushes,
            "total_writes": self.total_writes,
            "total_batched_items": self.total_batched_items,
            **{f"flush_by_{reason}": n for reason, n in self.flush_by.items()},
            "flush_errors": self.flush_errors,
            "avg_batch_size": round(self.total_writes / self.total_flushes, 2)
            if self.total_flushes else 0.0,
            "max_batch_size": self.max_batch_size,
            "min_batch_size": self.min_batch_size or 0,
            "last_flush_ms": round(self.last_flush_ms, 3),
            "max_flush_ms": round(self.max_flush_ms, 3),
        }


class LoadMeter:
    """Messages per second over a sliding window, kept in one-second buckets."""

    def __init__(self, threshold: float, window_seconds: float) -> None:
        self.threshold = threshold
        self.window_seconds = window_seconds
        self._buckets: deque[list[float]] = deque()  # [second, count]
        self._in_window = 0

    def record(self, count: int, now: float) -> None:
        second = float(int(now))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, count])
        self._in_window += count
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.window_seconds:
            self._in_window -= int(self._buckets.popleft()[1])

    def requests_per_second(self, now: float) -> float:
        self._expire(now)
        return self._in_window / self.window_seconds

    def is_low_load(self, now: float) -> bool:
        return self.requests_per_second(now) < self.threshold

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"requests_per_second": round(self.requests_per_second(now), 2),
                "is_low_load": self.is_low_load(now), "threshold": self.threshold,
                "window_seconds": self.window_seconds}
