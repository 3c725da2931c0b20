"""What the writer tells of itself: `stats` (docs/protocol.md), assembled from
its parts' own counters (`WriterStats`), the /metrics series, /healthz and the
origin design's pages read from it (bus/http.py), and the status line.
"""

from __future__ import annotations

from typing import Any

import storage
from storage import messages
from bus import control, security, sockets
from bus.build import build_info
from bus.config import BusConfig
from bus.http import HttpSide, Series, connection_series, control_series
from writer.commits import Commits
from writer.consumers import ConsumerPositions
from writer.health import writer_health
from writer.ingest import Ingest
from writer.notifications import Notifications
from writer.producers import ProducerLedger
from writer.retention import Retention

# What the writer's /metrics shows (bus/http.py), read from its `stats`.
HTTP_SERIES = [
    Series("messages_received", "counter", "messages read from the capture pipe",
           lambda s: s["ingest"]["messages_received"]),
    Series("messages_rejected", "counter", "messages not stored, by reason",
           lambda s: s["ingest"]["rejected"], "reason"),
    Series("messages_nacked", "counter", "refusals sent to producers, by code",
           lambda s: s["ingest"]["nacked"], "code"),
    Series("rows_committed", "counter", "rows committed (messages and consumer positions)",
           lambda s: s["batch"]["total_writes"]),
    Series("flushes", "counter", "batch commits, by reason",
           lambda s: {reason[len("flush_by_"):]: n for reason, n in s["batch"].items()
                      if reason.startswith("flush_by_")}, "reason"),
    Series("flush_errors", "counter", "failed commits (retried)",
           lambda s: s["batch"]["flush_errors"]),
    Series("buffered_messages", "gauge", "rows waiting for a commit",
           lambda s: s["batch"]["db_queue_size"]),
    Series("backlog_bytes", "gauge", "bytes of messages waiting for a commit",
           lambda s: s["backlog"]["bytes"]),
    Series("commits_failing_seconds", "gauge", "how long commits have been failing (0: they "
           "succeed)", lambda s: s["backlog"]["failing_for_s"] or 0),
    Series("load_messages_per_second", "gauge", "messages to store per second over the load "
           "window",
           lambda s: s["load"]["requests_per_second"]),
    Series("last_message_id", "gauge", "id of the newest stored message",
           lambda s: s["database"]["last_message_id"] or 0),
    Series("wal_bytes", "gauge", "size of the -wal file", lambda s: s["wal"].get("bytes", 0)),
    Series("producers_with_missing", "gauge", "producers with holes in their sequences",
           lambda s: s["producers"]["with_missing"]),
    Series("consumers", "gauge", "durable consumers", lambda s: s["consumers"]["count"]),
    Series("notify_subscribed_bytes", "gauge", "bytes of subscriptions held at the notify "
           "endpoint", lambda s: s["notify"]["subscribed_bytes"]),
    Series("memory_cutoffs", "counter", "times the capture, notify and control connections were "
           "dropped over the memory limit", lambda s: s["memory"]["cutoffs"]),
    Series("quota_refusals", "counter", "requests refused by a quota per key, by quota",
           lambda s: s["quotas"]["refused"], "quota"),
    Series("messages_not_authentic", "counter", "session messages without their session key's mac",
           lambda s: s["security"]["messages_not_authentic"]),
    *control_series(),
    *connection_series(),
]


def batch_page(stats: dict[str, Any]) -> dict[str, Any]:
    """GET /metrics/batch, in the origin design's shape (docs/protocol.md)."""
    batch = stats["batch"]
    config = batch["config"]
    return {"batch_enabled": config["enabled"],
            "metrics": {key: value for key, value in batch.items()
                        if key not in ("buffer_sizes", "db_queue_size", "config")},
            "buffer_sizes": batch["buffer_sizes"], "db_queue_size": batch["db_queue_size"],
            "config": {"batch_size": config["batch_size"],
                       "flush_interval_ms": config["flush_interval_ms"],
                       "max_buffer_size": config["max_buffer_size"]}}


def load_page(stats: dict[str, Any]) -> dict[str, Any]:
    """GET /metrics/load, in the origin design's shape."""
    return {"load_monitoring_enabled": True, **stats["load"]}


def open_http(config: BusConfig) -> HttpSide | None:
    """The writer's HTTP side (BUS_WRITER_HTTP; None when off)."""
    if not config.writer_http:
        return None
    return HttpSide("writer", config.writer_http, HTTP_SERIES, writer_health,
                    {"/metrics/batch": batch_page, "/metrics/load": load_page})


def stored_ids(store: Any) -> tuple[int | None, int | None]:
    """(first, last) stored message id; (None, None) while the database
    cannot be read: stats must answer when the database does not."""
    try:
        return store.first_message_id(), store.last_message_id()
    except store.transient_errors:
        return None, None


class WriterStats:
    """The writer's `stats`, from each part's snapshot; `started`: the
    writer's start (time.monotonic())."""

    def __init__(self, config: BusConfig, store: Any, started: float, *, commits: Commits,
                 ingest: Ingest, notifications: Notifications, retention: Retention,
                 producers: ProducerLedger, consumers: ConsumerPositions, quotas: Any,
                 utxos: Any, anchors: Any, audit: Any, dispatcher: control.Dispatcher,
                 guard: sockets.PeerMemoryGuard) -> None:
        self.config = config
        self.store = store
        self.started = started
        self.commits = commits
        self.ingest = ingest
        self.notifications = notifications
        self.retention = retention
        self.producers = producers
        self.consumers = consumers
        self.quotas = quotas
        self.utxos = utxos
        self.anchors = anchors
        self.audit = audit
        self.dispatcher = dispatcher
        self.guard = guard

    def snapshot(self, now: float) -> dict[str, Any]:
        """`stats` at `now` (time.monotonic())."""
        cfg = self.config
        # Its database reads wait for the commit in flight anyway; landed
        # first, the counters agree with the rows they read.
        self.commits.settle(now)
        first_id, last_id = stored_ids(self.store)
        return {
            "batch": self.commits.snapshot(),
            "load": self.commits.load.snapshot(now),
            "ingest": self.ingest.snapshot(self.notifications.nacked),
            "control": self.dispatcher.counters.snapshot(),
            "producers": self.producers.snapshot(),
            "quotas": self.quotas.snapshot(),
            "consumers": self.consumers.snapshot(last_id, self._count_lag),
            "utxos": self.utxos.snapshot(),
            "anchors": self.anchors.snapshot(),
            "audit": self.audit.snapshot(),
            "retention": self.retention.snapshot(),
            "security": {**security.snapshot(cfg),
                         "commands_forbidden": self.dispatcher.counters.forbidden,
                         "messages_not_authentic": self.ingest.forged},
            "notify": self.notifications.snapshot(),
            "memory": self.guard.snapshot(),
            "connections": self.guard.connections(),
            "backlog": self.commits.backlog(now),
            "wal": self.store.snapshot(),
            "database": {"path": storage.redact(cfg.db), "synchronous": cfg.sqlite_synchronous,
                         "first_message_id": first_id, "last_message_id": last_id},
            "uptime_seconds": round(now - self.started, 3),
            "build": build_info(),
            "config": cfg.public(),
        }

    def _count_lag(self, after_id: int, upto: int, prefixes: tuple[str, ...] | None
                   ) -> int | None:
        """A consumer's lag (writer/consumers.py, LagCounter); None while the
        database cannot be read (busy, reconnecting)."""
        try:
            return messages.count_matching(self.store.conn, after_id, upto, list(prefixes or ()))
        except self.store.transient_errors:
            return None

    def status_line(self, now: float) -> str:
        """What `systemctl status` shows (bus/runner.py)."""
        commits = self.commits
        line = (f"stored {commits.metrics.total_writes:,} messages; "
                f"{commits.load.requests_per_second(now):,.0f} msg/s; "
                f"{len(commits.buffer):,} buffered")
        if commits.failing_since is not None:
            line += f"; commits failing for {now - commits.failing_since:.0f} s: " \
                    f"{commits.last_error}"
        return line
