"""An edge proxy's upstream (BUS_PROXY_UPSTREAM): what takes the capture's
course's place in a proxy that captures nothing.

An edge's publisher side is a SUB connected to the upstream proxy's
subscriber endpoint (bus/sockets.open_edge_upstream, which says why not an
XSUB), its subscriber side a PUB, with libzmq's forwarding loop between
them, as in the ZeroMQ Guide's proxy chains. Nothing is captured here: every
message an edge forwards was captured by the upstream proxy, which the
writer stores once.

libzmq reconnects the SUB by itself after an upstream restart, and
subscribes again on the new connection. Only a failed handshake makes it
give up on the endpoint for good: something other than the bus listening
there (a process that bound the upstream's port while it restarted, a CURVE
server with another key). Then `tend(now)` stops the forwarding loop (which
owns the socket while it runs), connects the SUB again on the main thread,
backing off as the capture does (bus/sockets.Connections.redial_due), and
runs the loop again. Stepped with the pass's `now` by the proxy's loop or a
test (tests/test_proxy_parts.py; the edge's processes: tests/test_edge.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from bus import sockets
from bus.logging import RateLimitedLog, get_logger
from proxy.steering import STEER_TERMINATE, Steering

log = get_logger("proxy")
# A wrong peer that stays at the upstream's port is met at each redial (about
# every second): said once a minute.
_wrong_peer_log = RateLimitedLog(log, interval=60.0)

# The capture's course of an edge (`stats` capture.state): it captures nothing.
CAPTURE_NONE = "none"


class UpstreamCourse:
    """The course of an edge proxy's forwarding loop, in the place of
    proxy/capture.CaptureCourse: no capture, and the upstream connection
    kept (hooks: `upstream()` its Connections, `forwarding()` whether the
    loop runs, `start_forwarding()` runs it again, `paused()` whether the
    memory guard holds it stopped)."""

    def __init__(self, endpoint: str, steering: Steering,
                 upstream: Callable[[], sockets.Connections], forwarding: Callable[[], bool],
                 start_forwarding: Callable[[], None], paused: Callable[[], bool]) -> None:
        self.endpoint = endpoint
        self.steering = steering
        self.upstream = upstream
        self.forwarding = forwarding
        self.start_forwarding = start_forwarding
        self.paused = paused
        # Why the loop was stopped here (None: it was not): the forwarding
        # loop keeps its sockets while this is set.
        self.down: str | None = None
        # What CaptureCourse holds for a writer, and the capture the loop was
        # given: nothing, ever.
        self.held: deque[list[bytes]] = deque()
        self.loop_capture = None
        self.wrong_peer_seen: str | None = None

    def next_run_capture(self) -> None:
        return None

    def tend(self, now: float) -> None:
        """Connect the upstream again once libzmq gave up on it (see the
        module's doc); called once a pass, never waits."""
        upstream = self.upstream()
        if upstream.gave_up is not None and self.wrong_peer_seen is None:
            self.wrong_peer_seen = upstream.gave_up
            _wrong_peer_log.warning(
                "something other than the upstream proxy at its endpoint",
                "upstream_wrong_peer", now, endpoint=self.endpoint,
                error=upstream.gave_up, wrong_peers=upstream.wrong_peers,
                redials=upstream.redials, action="connecting to the upstream proxy again")
        if upstream.redial_due(now):
            if self.forwarding():  # it owns the socket: stopped first
                if self.down is None:
                    self.down = f"a wrong peer at the upstream endpoint: {upstream.gave_up}"
                    self.steering.settle(wait_ms=50)
                    self.steering.send(STEER_TERMINATE, 0)
                return
            upstream.redial()
            self.wrong_peer_seen = None
        # Stopped here, and not held stopped by the memory guard (whose
        # resume leaves the loop to this course while `down` is set).
        if self.down is not None and not self.forwarding() and not self.paused():
            self.down = None
            self.start_forwarding()

    def snapshot(self) -> dict[str, Any]:
        """`stats` capture: an edge captures nothing (the fields of the main
        proxy's, at zero, so that one /metrics reads both)."""
        return {"state": CAPTURE_NONE, "held": 0, "held_peak": 0, "spilled": 0, "rescued": 0,
                "wrong_peers": 0, "redials": 0, "last_wrong_peer": None, "superseded": 0}

    def upstream_snapshot(self) -> dict[str, Any]:
        """`stats` upstream: the endpoint, whether a handshake with it holds,
        and its failed handshakes and redials."""
        upstream = self.upstream()
        return {"endpoint": self.endpoint, "connected": upstream.handshaken,
                **upstream.snapshot()}

    # What the proxy asks of a capture's course on an edge too (the rest it
    # asks only of a proxy with a capture), which an edge has nothing for.

    def watch_room(self) -> None:
        pass

    def spilling(self) -> bool:
        return False

    def must_read_spill(self) -> bool:
        return False

    def close(self) -> None:
        pass
