"""The proxy's `stats` answer, assembled from its parts, and what its /metrics
shows of it (bus/http.py)."""

from __future__ import annotations

from typing import Any

from bus import security
from bus.build import build_info
from bus.http import Series, connection_series, control_series
from proxy.memory import CONTROL, PUBLISHERS, SUBSCRIBERS

# What the proxy's /metrics shows (bus/http.py), read from its `stats`.
HTTP_SERIES = [
    Series("frames_in", "counter", "frames taken in from publishers (libzmq counts frames)",
           lambda s: s["frontend_frames_in"]),
    Series("bytes_in", "counter", "bytes taken in from publishers",
           lambda s: s["frontend_bytes_in"]),
    Series("frames_out", "counter", "frames sent to subscribers",
           lambda s: s["backend_frames_out"]),
    Series("bytes_out", "counter", "bytes sent to subscribers", lambda s: s["backend_bytes_out"]),
    Series("memory_limit_bytes", "gauge", "BUS_PROXY_MEMORY_LIMIT_BYTES (0: off)",
           lambda s: s["memory"]["limit_bytes"]),
    Series("paused", "gauge", "1 while forwarding is paused over the memory limit",
           lambda s: int(s["memory"]["paused"])),
    Series("memory_pauses", "counter", "pauses over the memory limit",
           lambda s: s["memory"]["pauses"]),
    Series("subscriber_cutoffs", "counter", "subscriber sides cut off over the memory limit",
           lambda s: s["memory"]["subscriber_cutoffs"]),
    Series("publisher_cutoffs", "counter", "publisher sides cut off over the memory limit",
           lambda s: s["memory"]["publisher_cutoffs"]),
    Series("forwarding_blocked", "gauge", "1 while the forwarding loop does not answer (a full "
           "capture queue?)", lambda s: int(s["forwarding"] == "blocked")),
    Series("steering_unanswered_seconds", "gauge", "how long the forwarding loop has owed a "
           "reply to a steering command (0: none owed)",
           lambda s: s["steering"]["unanswered_s"]),
    Series("capture_wrong_peers", "counter", "capture handshakes that failed: something other "
           "than the writer at the capture endpoint", lambda s: s["capture"]["wrong_peers"]),
    Series("capture_held", "gauge", "messages held for a writer that is not connected (sent "
           "to it, in order, once it is back)", lambda s: s["capture"]["held"]),
    Series("capture_redials", "counter", "capture endpoint connected again after libzmq gave up "
           "on a wrong peer", lambda s: s["capture"]["redials"]),
    Series("capture_superseded", "counter", "capture connections to a writer dropped once a "
           "newer one (a standby that took the lock over) completed its handshake",
           lambda s: s["capture"]["superseded"]),
    Series("upstream_connected", "gauge", "an edge proxy: 1 while its upstream proxy is "
           "connected (absent on the main proxy)",
           lambda s: int(s["upstream"]["connected"]) if "upstream" in s else None),
    Series("subscription_cutoffs", "counter", "subscriber connections cut off over a "
           "subscription budget", lambda s: sum(s["subscriptions"]["refused"].values())),
    Series("subscription_bytes", "gauge", "bytes the subscriber connections sent (their "
           "subscriptions)", lambda s: s["subscriptions"]["sent_bytes"]),
    *control_series(),
    *connection_series(),
]


def forwarding_state(counters: dict[str, int] | None, capture_down: bool, paused: bool) -> str:
    """`stats`' `forwarding`: "blocked" (the loop did not answer: a full
    capture queue while the writer is down?), "reconnecting" (stopped for the
    capture's course), "paused" (over the memory limit) or "running"."""
    return ("blocked" if counters is None else "reconnecting" if capture_down else
            "paused" if paused else "running")


def proxy_stats(proxy: Any, counters: dict[str, int] | None, now: float) -> dict[str, Any]:
    """The `stats` answer of `proxy` (proxy/service.Proxy) at `now`, with the
    frame counters read from its loop (None: it did not answer; those of
    the loops before the current one are shown)."""
    config = proxy.config
    return {**(counters or proxy.steering.counted),
            "forwarding": forwarding_state(counters, proxy.course.down is not None,
                                           proxy.guard.paused),
            "uptime_seconds": round(now - proxy.started, 3),
            "build": build_info(),
            "control": proxy.dispatcher.counters.snapshot(),
            "security": security.snapshot(config),
            "capture_hwm": config.capture_hwm,
            "capture_hwm_writer_down": config.capture_hwm_writer_down,
            "subscriptions": proxy.subscriptions.snapshot(),
            "steering": proxy.steering.snapshot(now),
            "capture": proxy.course.snapshot(),
            "connections": {side: proxy.connections[side].counts()
                            for side in (PUBLISHERS, SUBSCRIBERS, CONTROL)
                            if side in proxy.connections},
            "memory": proxy.guard.snapshot(),
            **({"upstream": proxy.course.upstream_snapshot()} if proxy.edge else {}),
            "endpoints": proxy.endpoints()}
