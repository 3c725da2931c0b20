"""The writer's health rule (/healthz, `bus-cli health`): a function of its
`stats` answer alone, importable without the writer's dependencies."""

from __future__ import annotations

from typing import Any


def writer_health(stats: dict[str, Any]) -> str | None:
    """Why the writer is not healthy, for /healthz (None: it is)."""
    backlog = stats["backlog"]
    if backlog["failing_for_s"] is not None:
        return (f"database not writable for {backlog['failing_for_s']:.0f} s: "
                f"{backlog['last_error']} ({backlog['rows']} rows waiting)")
    return None
