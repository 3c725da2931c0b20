"""The bus: wire protocol, configuration, logging, sockets, proxy and client library."""

from bus.client import BusError, BusTimeout, ControlClient, Message, Publisher, Subscriber

__all__ = ["BusError", "BusTimeout", "ControlClient", "Message", "Publisher", "Subscriber"]
