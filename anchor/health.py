"""The anchor worker's health rule (/healthz, `bus-cli health`): a function
of its `stats` answer alone, importable without embit and the worker."""

from __future__ import annotations

from typing import Any


def anchor_health(stats: dict[str, Any]) -> str | None:
    bitcoind = stats["bitcoind"]
    if bitcoind["error"] is not None:
        return f"bitcoind unreachable at {bitcoind['url']}: {bitcoind['error']}"
    if not stats["wallet_sync"]["ready"]:
        return "starting: the wallet's UTXOs are not synced yet"
    return None
