"""What the console shows of the whole bus (the gateway's `console` op,
admins only): each process's health and the counters the page turns into
rates, read from their `stats` over their control endpoints (the gateway
is their client like `bus-cli stats`), at most every OVERVIEW_MAX_AGE_S
whatever the number of consoles open, and the gateway's own live counts per
topic group.

A process that does not answer within OVERVIEW_TIMEOUT_MS is "down" (its
error said); the fields shown are a chosen few of each `stats` answer
(docs/protocol.md lists them all), so a console's frame stays small.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from bus import security
from bus.client import BusError, ControlClient
from bus.config import BusConfig

OVERVIEW_MAX_AGE_S = 0.5
OVERVIEW_TIMEOUT_MS = 1000
# The durable consumers a console lists at most (the most lagging first).
MAX_CONSUMERS_SHOWN = 100


def _writer_fields(stats: dict[str, Any]) -> dict[str, Any]:
    batch = stats["batch"]
    positions = stats["consumers"]["positions"]
    consumers = sorted(((name, p) for name, p in positions.items()),
                       key=lambda item: -(item[1].get("lag") or 0))[:MAX_CONSUMERS_SHOWN]
    backlog = stats.get("backlog") or {}
    return {
        "stored": batch["total_writes"], "refused": stats["ingest"]["rejected_total"],
        "batch": {k: batch[k] for k in ("total_flushes", "avg_batch_size", "max_batch_size",
                                        "last_flush_ms", "max_flush_ms", "flush_by_size",
                                        "flush_by_time", "flush_by_low_load", "flush_errors")},
        "buffer": batch["buffer_sizes"]["messages"], "load": stats["load"],
        "consumers": [{"name": name, "last_id": p.get("last_id"), "lag": p.get("lag"),
                       "lag_exact": p.get("lag_exact", True)} for name, p in consumers],
        "consumer_count": stats["consumers"]["count"],
        "last_message_id": stats["database"].get("last_message_id"),
        "problem": backlog.get("last_error") if backlog.get("failing_for_s") else None,
        "uptime_seconds": stats["uptime_seconds"]}


def _proxy_fields(stats: dict[str, Any]) -> dict[str, Any]:
    capture = stats["capture"]
    return {"frames_in": stats["frontend_frames_in"], "frames_out": stats["backend_frames_out"],
            "capture": capture.get("state"),
            "problem": None if capture.get("state") in ("direct", "none") else
            f"capture {capture.get('state')}",
            "uptime_seconds": stats["uptime_seconds"]}


def _reader_fields(stats: dict[str, Any]) -> dict[str, Any]:
    return {"pages": stats["requests"], "rows_served": stats["rows_served"],
            "problem": stats.get("database_error"), "uptime_seconds": stats["uptime_seconds"]}


PROCESSES = {"writer": ("control_endpoint", _writer_fields),
             "proxy": ("proxy_control_endpoint", _proxy_fields),
             "reader": ("read_endpoint", _reader_fields)}


class Overview:
    """The processes' stats, each asked in a worker thread with its own
    REQ socket (one request at a time: a console waits for the one running)."""

    def __init__(self, config: BusConfig, ctx: zmq.Context, executor: ThreadPoolExecutor) -> None:
        self.executor = executor
        keys = security.client_keys(config)
        # The writer's endpoint setting may list several writers (standbys):
        # the first that answers is the serving one.
        self.clients = {name: [ControlClient(endpoint, OVERVIEW_TIMEOUT_MS, 0, ctx, keys)
                               for endpoint in getattr(config, field).split(",")]
                        for name, (field, _fields) in PROCESSES.items()}
        self._last: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    def _ask(self, name: str) -> dict[str, Any]:
        error = None
        for client in self.clients[name]:
            try:
                stats = client.request("stats")
                return {"up": True, **PROCESSES[name][1](stats)}
            except BusError as exc:
                error = str(exc)
            except (KeyError, TypeError) as exc:  # another version's stats
                error = f"stats not understood: {type(exc).__name__} {exc}"
        return {"up": False, "problem": error}

    async def read(self, now: float) -> dict[str, Any]:
        async with self._lock:
            if self._last is None or now - self._at >= OVERVIEW_MAX_AGE_S:
                loop = asyncio.get_running_loop()
                answers = await asyncio.gather(*(loop.run_in_executor(self.executor, self._ask, n)
                                                 for n in PROCESSES))
                self._last = dict(zip(PROCESSES, answers))
                self._at = time.monotonic()
            return self._last

    def close(self) -> None:
        for clients in self.clients.values():
            for client in clients:
                client.close()
