"""The reader's health rule (/healthz, `bus-cli health`): a function of its
`stats` answer alone, importable without the reader's dependencies."""

from __future__ import annotations

from typing import Any


def database_health(stats: dict[str, Any]) -> str | None:
    """Why the reader cannot read its database (None: it can): what withholds
    the systemd watchdog's ping (bus/runner.py)."""
    error = stats["database_error"]
    return None if error is None else f"database not readable: {error}"


def reader_health(stats: dict[str, Any]) -> str | None:
    """/healthz: the database readable and, on a hot standby, not too far
    behind its primary (a restart of the reader mends no lag: not the
    watchdog's business)."""
    if (unreadable := database_health(stats)) is not None:
        return unreadable
    replica = stats.get("replica")
    if replica is None:  # SQLite, or a primary
        return None
    if replica["receiver"] != "streaming":
        return (f"a hot standby that receives nothing from its primary (WAL receiver "
                f"{replica['receiver'] or 'not running'}): its pages may end behind")
    if replica["behind_s"] is not None and replica["behind_s"] > stats["max_lag_s"]:
        return (f"a hot standby {replica['behind_s']:.1f} s behind its primary "
                f"({replica['behind_bytes']} bytes of WAL to replay; BUS_READER_MAX_LAG_S "
                f"{stats['max_lag_s']:g})")
    return None
