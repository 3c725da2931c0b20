"""The proxy's health rule (/healthz, `bus-cli health`): a function of its
`stats` answer alone, importable without the proxy."""

from __future__ import annotations

from typing import Any

# How long the loop may owe a reply before /healthz (and with it the watchdog)
# calls the capture stalled. A loop that answers late is slow, not stalled:
# under a flood on a loaded machine, or behind a writer that takes its
# captures in bursts, it answers within a second or two, and a restart would
# lose what the proxy holds. Well under the units' WatchdogSec (30 s).
STALLED_AFTER_S = 5.0


def proxy_health(stats: dict[str, Any]) -> str | None:
    """Why the proxy is not healthy, for /healthz (None: it is): its
    forwarding, and an edge's upstream."""
    why = forwarding_health(stats)
    upstream = stats.get("upstream")
    if why is None and upstream is not None and not upstream["connected"]:
        why = (f"no upstream: not connected to the upstream proxy at {upstream['endpoint']}"
               + (f" ({upstream['last_wrong_peer']})" if upstream["last_wrong_peer"] else ""))
    return why


def forwarding_health(stats: dict[str, Any]) -> str | None:
    """Why the forwarding loop is not healthy (None: it is): what the systemd
    watchdog is pinged by, since a restart cures that and not an upstream
    that is away."""
    unanswered_s = stats["steering"]["unanswered_s"]
    if stats["forwarding"] == "blocked" and unanswered_s >= STALLED_AFTER_S:
        return (f"capture stalled: the forwarding loop has not answered for {unanswered_s:.0f} "
                "s (its capture queue is full: is the writer down?)")
    if stats["forwarding"] == "paused":
        return (f"forwarding paused: {stats['memory']['rss_bytes'] >> 20} MB, over its memory "
                f"limit of {stats['memory']['limit_bytes'] >> 20} MB")
    return None
