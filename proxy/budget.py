"""The subscription budget of the proxy's subscriber side (issue 22): what
subscriber connections may send, each and together, read from the kernel's
count of the bytes each connection sent. Stepped by the proxy's loop with the
pass's `now` (`check(connections, now)`)."""

from __future__ import annotations

import socket
import struct
from typing import Any

from bus import protocol, sockets
from bus.logging import get_logger

log = get_logger("proxy")

# How often the bytes each subscriber connection sent are read.
SUBSCRIPTION_CHECK_S = 0.05
# struct tcp_info (linux/tcp.h): tcpi_bytes_received, a __u64 at this offset
# (RFC 4898's ThruOctetsReceived, Linux 4.1 and later).
TCPI_BYTES_RECEIVED_OFFSET = 128


class SubscriptionBudget:
    """What subscriber connections may send, each and together (issue 22).

    libzmq's PUB takes in every subscription a peer sends, into a trie of
    about 80 bytes per subscribed byte (random prefixes), and removes a
    departing peer by walking the whole trie: held subscriptions cost memory,
    and every disconnect costs CPU in the forwarding loop in proportion to
    all of them (10 MB of prefixes: 0.5 s per disconnect). XPUB_MANUAL does
    not help: libzmq 4.3.5 stores each subscription it passes on in a second
    trie (`_manual_subscriptions`) before the owner can refuse it, and walks
    both on a disconnect. What a subscriber sends on its connection is
    subscriptions (after a handshake of at most a few hundred bytes), so the
    kernel's count of bytes received on it (TCP_INFO) bounds what it
    subscribed: bytes, and their number (at least 3 bytes each on the wire).
    A connection over the budget per connection, or the one that sent most
    while all together are over the total, is shut down (as the memory guard
    does, bus/sockets.Connections): libzmq drops its pipe and subscriptions.
    Counted by reason and logged: a SUB cannot be told. It reconnects and
    subscribes again: one whose own subscriptions are over the budget is cut
    off again each time. TCP endpoints only (a Unix socket has no such
    count)."""

    def __init__(self, per_connection: int, total: int) -> None:
        self.per_connection = per_connection
        self.total = total
        self.refused = {protocol.OVER_CONNECTION_SUBSCRIPTION_BUDGET: 0,
                        protocol.OVER_TOTAL_SUBSCRIPTION_BUDGET: 0}
        self.sent_bytes = 0
        self.connections = 0
        self._next_check = 0.0

    def check(self, connections: sockets.Connections, now: float) -> None:
        """Read what each connection sent; cut off those over a budget."""
        if not (self.per_connection or self.total) or now < self._next_check:
            return
        self._next_check = now + SUBSCRIPTION_CHECK_S
        sent: dict[int, int] = {}
        for fd in list(connections.fds):
            # No check of the local port here (it doubles the cost, about 2 us
            # a connection): a descriptor reused by another socket is only read
            # (a non-TCP one fails), and _cut_off checks before it acts.
            try:
                peer = socket.socket(fileno=fd)
            except OSError:  # closed since: its DISCONNECTED event is on its way
                continue
            try:
                info = peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                if len(info) >= TCPI_BYTES_RECEIVED_OFFSET + 8:
                    sent[fd] = struct.unpack_from("=Q", info, TCPI_BYTES_RECEIVED_OFFSET)[0]
            except OSError:
                pass
            finally:
                peer.detach()
        over = [(fd, n, protocol.OVER_CONNECTION_SUBSCRIPTION_BUDGET) for fd, n in sent.items()
                if self.per_connection and n > self.per_connection]
        for fd, _, _ in over:
            del sent[fd]
        total = sum(sent.values())
        if self.total:
            for fd, n in sorted(sent.items(), key=lambda item: -item[1]):
                if total <= self.total:
                    break
                over.append((fd, n, protocol.OVER_TOTAL_SUBSCRIPTION_BUDGET))
                total -= n
                del sent[fd]
        for fd, n, reason in over:
            self._cut_off(connections, fd, n, reason, total)
        self.sent_bytes, self.connections = total, len(sent)

    def _cut_off(self, connections: sockets.Connections, fd: int, sent: int, reason: str,
                 total: int) -> None:
        if not connections.cut(fd):  # closed since, or no longer a subscriber's
            return
        self.refused[reason] += 1
        log.warning("subscriptions_over_budget", reason=reason, sent_bytes=sent,
                    budget_bytes_per_connection=self.per_connection, budget_bytes=self.total,
                    others_sent_bytes=total, action="cut off the subscriber connection")

    def snapshot(self) -> dict[str, Any]:
        return {"budget_bytes_per_connection": self.per_connection, "budget_bytes": self.total,
                "sent_bytes": self.sent_bytes, "connections": self.connections,
                "refused": dict(self.refused)}
