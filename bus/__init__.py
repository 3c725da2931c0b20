"""The bus: wire protocol, configuration, logging, sockets and security (the
kernel), and the client library in bus.client.

The kernel never loads the client library: a process that imports
bus.protocol does not import bus.client. `from bus import Publisher` still
works, importing bus.client on first use (PEP 562); `from bus.client import
Publisher` is the documented path.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BusError", "BusTimeout", "ControlClient", "Message", "Publisher", "Subscriber"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import bus.client  # here, not above: see the docstring
        return getattr(bus.client, name)
    raise AttributeError(f"module 'bus' has no attribute {name!r}")
