"""The proxy's memory guard (BUS_PROXY_MEMORY_LIMIT_BYTES; proxy/service.py's
module doc tells the rule): over the limit forwarding pauses, a side that
keeps memory growing is cut off, and forwarding resumes under 75% of the limit
(or 10 s after the guard's last action with the writer connected).

`MemoryGuard.step(now)` once a pass of the proxy's loop, or a test's; RSS is
read, and free memory released, by the functions it is given. What it acts
on is its host's (`GuardedProxy`): the forwarding loop and the sockets of each
side (proxy/forwarding.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any, Protocol

import zmq

from bus import sockets
from bus.config import BusConfig
from bus.logging import RateLimitedLog, get_logger
from bus.runner import release_free_memory, resident_bytes
from proxy.capture import CAPTURE_TAIL_WAIT_S

log = get_logger("proxy")

# How often the guard reads RSS (what arrives between two reads is the most
# the limit can be overshot by), the fraction of the limit under which
# forwarding resumes, how long a pause may not bring memory back before
# subscribers are cut off, and how much growth while paused cuts off a side.
MEMORY_CHECK_S = 0.02
MEMORY_RESUME_FRACTION = 0.75
SUBSCRIBER_CUTOFF_AFTER_S = 1.0
CUTOFF_GROWTH_FRACTION = 0.125
# Memory coming back by this fraction of the limit since the lowest point of
# a pause is progress (a capture queue draining into a slow writer, what is
# held going to it): the 1 s to a subscriber cut-off starts again from it.
PROGRESS_FRACTION = 1 / 64
# Paused this long since its last action without memory coming back, the guard
# resumes forwarding anyway (and pauses again if memory grows again).
PAUSE_GIVE_UP_S = 10.0

SUBSCRIBERS, PUBLISHERS, CONTROL, WRITER = "subscribers", "publishers", "control", "writer"
CUTOFF_COUNTERS = {PUBLISHERS: "publisher_cutoffs", SUBSCRIBERS: "subscriber_cutoffs",
                   CONTROL: "control_cutoffs"}
# A side the guard closes and opens again: its socket's attribute on the host.
SIDE_SOCKETS = {PUBLISHERS: "frontend", SUBSCRIBERS: "backend"}


class GuardedProxy(Protocol):
    """What the memory guard acts on: the forwarding loop and the sides it
    forwards between (proxy/forwarding.py)."""
    connections: dict[str, sockets.Connections]
    frontend: zmq.Socket | None   # None: cut off
    backend: zmq.Socket | None

    def running(self) -> bool: ...

    def stop(self) -> None: ...

    def resume(self) -> None: ...

    def close_side(self, side: str) -> None: ...

    def open_side(self, side: str) -> None: ...


class HeldForWriter(Protocol):
    """What the capture's course holds for the writer (proxy/capture.py)."""
    held: Sized
    held_taken_at: float


class MemoryGuard:
    def __init__(self, config: BusConfig, host: GuardedProxy, course: HeldForWriter,
                 rss: Callable[[], int] = resident_bytes,
                 release: Callable[[], None] = release_free_memory) -> None:
        self.config = config
        self.host = host
        self.course = course
        self.rss_of = rss
        self.release = release
        # When forwarding was paused (None: running), when the guard last
        # acted, RSS after that and its lowest since, when to read RSS next,
        # and what it did so far.
        self.paused_at: float | None = None
        self.last_action = 0.0
        self.mark = 0
        self.low = 0
        self.next_check = 0.0
        self.rss = 0
        self.actions = {"pauses": 0, "subscriber_cutoffs": 0, "publisher_cutoffs": 0,
                        "control_cutoffs": 0, "resume_retries": 0}
        self._resume_log = RateLimitedLog(log)

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def step(self, now: float) -> None:
        """Keep RSS under BUS_PROXY_MEMORY_LIMIT_BYTES (see the module's doc)."""
        limit = self.config.proxy_memory_limit_bytes
        if not limit or now < self.next_check:
            return
        self.next_check = now + MEMORY_CHECK_S
        self.rss = self.rss_of()
        if self.paused_at is None:
            if self.rss <= limit:
                return
            self.release()
            self.rss = self.rss_of()
            if self.rss <= limit:
                return
            self._pause(now, limit)
            return
        if self.host.running():  # a blocked loop has not taken the pause yet
            return
        if self.rss >= limit * MEMORY_RESUME_FRACTION:
            self.release()
            self.rss = self.rss_of()
        writer_connected = self._writer_connected()
        held = self.course.held
        if held and now - self.course.held_taken_at < CAPTURE_TAIL_WAIT_S:
            # What is held is going to the writer: that is what brings memory
            # back, not a cut-off, and memory in transit to the capture is no
            # one streaming in (the clocks and the mark below start again once
            # it is sent, or once the writer stops taking it).
            self.last_action, self.mark = now, self.rss
        if self.rss < self.low - limit * PROGRESS_FRACTION:
            # Memory is coming back: something drains. Not the slow
            # subscriber's queue a cut-off is for (that one does not move).
            self.last_action, self.low = now, self.rss
        if self.rss < limit * MEMORY_RESUME_FRACTION:
            self._resume(now, limit, "memory_back_under_limit")
        elif self.rss > self.mark + limit * CUTOFF_GROWTH_FRACTION:
            # Still growing with nothing forwarded: someone is streaming in, on
            # one side or the other (or an endless request on the control).
            self._cut_off(PUBLISHERS if self.host.frontend is not None else
                          SUBSCRIBERS if self.host.backend is not None else CONTROL, now, limit)
        elif (writer_connected and self.host.backend is not None and not held
              and now - self.last_action >= SUBSCRIBER_CUTOFF_AFTER_S):
            # The capture queue drains into a connected writer; what does not
            # drain is a slow subscriber's queue, or held subscriptions. (What
            # the proxy holds for the writer is no subscriber's: while there
            # is some, the subscribers stay.)
            self._cut_off(SUBSCRIBERS, now, limit)
        elif writer_connected and now - self.last_action >= PAUSE_GIVE_UP_S:
            # What holds the memory is no queue of this process that drains:
            # forwarding goes on (and pauses again if memory grows).
            self._resume(now, limit, "memory_still_over_limit")

    def _writer_connected(self) -> bool:
        """Whether the capture queue drains into a writer. An edge proxy has
        none (proxy/upstream.py): nothing of its memory waits for a writer,
        as with a writer connected."""
        writer = self.host.connections.get(WRITER)
        return writer is None or bool(writer.fds)

    def _pause(self, now: float, limit: int) -> None:
        """End the forwarding loop, keeping its sockets and their queues. A
        loop blocked in a capture send takes the TERMINATE once it is free."""
        self.paused_at = self.last_action = now
        self.mark = self.low = self.rss
        self.actions["pauses"] += 1
        log.warning("memory_limit_reached", action="paused forwarding", rss_bytes=self.rss,
                    limit_bytes=limit, writer_connected=self._writer_connected())
        self.host.stop()

    def _cut_off(self, side: str, now: float, limit: int) -> None:
        """Close one side's socket while forwarding is paused: its connections,
        queues and subscriptions go with it, and its peers stay out (they retry)
        until forwarding resumes, so that publishers re-sending do not fill the
        proxy again. The control endpoint's connections are dropped instead
        (bus/sockets.Connections): it must go on answering."""
        self.actions[CUTOFF_COUNTERS[side]] += 1
        log.warning("memory_limit_reached", action=f"cut off {side}", rss_bytes=self.rss,
                    limit_bytes=limit)
        self.host.close_side(side)
        self.last_action = now
        self.release()
        self.rss = self.mark = self.low = self.rss_of()

    def _resume(self, now: float, limit: int, event: str) -> None:
        """Open again the sides that were cut off, and forward. A side that
        cannot be opened yet stays closed, and forwarding paused, until the
        next memory check tries again: its port still held by the socket just
        closed (libzmq closes in the background), taken meanwhile by another
        process (only without socket activation: the units' listening sockets
        stay open here), or no descriptor free. Never an exit, never a wait
        that holds the main loop."""
        for side, name in SIDE_SOCKETS.items():
            if getattr(self.host, name) is None:
                try:
                    self.host.open_side(side)
                except (sockets.EndpointInUse, zmq.ZMQError, OSError) as exc:
                    self.actions["resume_retries"] += 1
                    self._resume_log.warning(name, "resume_postponed", side=name,
                                             error=str(exc), action="stays paused; tried "
                                             "again at the next memory check")
                    return
        (log.info if event == "memory_back_under_limit" else log.warning)(
            event, action="resumed forwarding", rss_bytes=self.rss, limit_bytes=limit,
            paused_ms=round((now - (self.paused_at or now)) * 1000))
        self.paused_at = None
        self.host.resume()

    def snapshot(self) -> dict[str, Any]:
        return {"rss_bytes": self.rss_of(), "limit_bytes": self.config.proxy_memory_limit_bytes,
                "paused": self.paused_at is not None, **self.actions}
