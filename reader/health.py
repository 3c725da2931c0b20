"""The reader's health rule (/healthz, `bus-cli health`): a function of its
`stats` answer alone, importable without the reader's dependencies."""

from __future__ import annotations

from typing import Any


def reader_health(stats: dict[str, Any]) -> str | None:
    error = stats["database_error"]
    return None if error is None else f"database not readable: {error}"
