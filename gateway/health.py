"""The gateway's health rule (/healthz): a function of its stats alone."""

from __future__ import annotations

from typing import Any


def gateway_health(stats: dict[str, Any]) -> str | None:
    """Why the gateway cannot serve (None: it can): its live feed's endpoint
    has a wrong peer (something else bound the proxy's or the writer's port)."""
    if stats["live"]["gave_up"]:
        return "a wrong peer at the proxy's or the writer's endpoint"
    return None
