"""The capture's course: where the forwarding loop's copy of each message goes
(proxy/service.py's module doc tells the whole story).

    direct      the loop captures straight to a writer that completed its
                handshake, and nothing is held
    holding     no writer (or a wrong peer): the loop captures into the spill,
                and what arrives there is held here, in order
    draining    the writer is back: what is held goes to it, oldest first,
                as the capture's queue takes it
    wrong_peer  the capture's handshake failed: something other than the
                writer listens at the capture endpoint

`CaptureCourse.tend(now)` moves between them, once a pass of the proxy's loop
(or a test's); it stops and starts the forwarding loop through the hooks it is
given, and never waits long.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from bus import sockets
from bus.config import BusConfig
from bus.logging import get_logger
from proxy.steering import STEER_TERMINATE, Steering

log = get_logger("proxy")

# A forwarding loop that has not ended this long after TERMINATE is blocked
# in a capture send: it is given the rescue pipe to finish into.
CAPTURE_RESCUE_AFTER_S = 0.1
CAPTURE_RESCUE_ENDPOINT = "inproc://bus-proxy-capture-rescue"
# While no writer is there, the forwarding loop captures into this pipe (the
# spill) and the main thread holds what arrives, for the writer once it is
# back (see proxy/service.py's doc).
CAPTURE_SPILL_ENDPOINT = "inproc://bus-proxy-capture-spill"
# Messages moved between the spill, what is held and the capture in one pass
# of the main loop: control requests and the memory guard keep their turn.
CAPTURE_MOVES_PER_PASS = 20_000
# The forwarding loop waits (stopped) for a connected writer to take the last
# of what is held only while the writer takes something at least this often;
# a writer that stops reading then (SIGSTOP, a stuck commit) gets the loop
# running on the spill again, not live delivery stopped for as long.
CAPTURE_TAIL_WAIT_S = 0.5
# The capture's course, in `stats` (capture.state).
CAPTURE_DIRECT, CAPTURE_HOLDING, CAPTURE_DRAINING, CAPTURE_WRONG_PEER = (
    "direct", "holding", "draining", "wrong_peer")


class CaptureCourse:
    """What was captured and not yet sent to the writer, and which capture
    each run of the forwarding loop is given.

    Hooks: `writer()` the capture's connections (bus/sockets.Connections),
    `forwarding()` whether the loop runs, `start_forwarding()` runs it again
    (it asks `next_run_capture()` where to capture), `paused()` whether the
    memory guard holds it stopped."""

    def __init__(self, config: BusConfig, steering: Steering,
                 writer: Callable[[], sockets.Connections], forwarding: Callable[[], bool],
                 start_forwarding: Callable[[], None], paused: Callable[[], bool]) -> None:
        self.config = config
        self.steering = steering
        self.writer = writer
        self.forwarding = forwarding
        self.start_forwarding = start_forwarding
        self.paused = paused
        self.ctx: zmq.Context | None = None
        self.capture: zmq.Socket | None = None
        self.poller: zmq.Poller | None = None
        # The capture's recovery from a wrong peer: why the forwarding loop was
        # stopped for it (None: it was not), when TERMINATE was sent, the
        # rescue pipe of a loop blocked in a capture send, and the messages the
        # loop sent into it, to be sent again first.
        self.down: str | None = None
        self.stop_sent = 0.0
        self.rescue: zmq.Socket | None = None
        self.rescued_total = 0
        # What was captured and not yet sent to the writer, oldest first: the
        # rescued burst of a blocked loop, then what the loop spilled while no
        # writer was there. The loop captures straight to the writer only
        # while this is empty, so nothing overtakes it.
        # Held as bytes: a frame copied costs about 430 bytes a message of
        # 100 (three frames), a zmq.Frame kept about 990.
        self.held: deque[list[bytes]] = deque()
        self.spilled_total = 0
        self.held_peak = 0
        # The capture the running (or last) forwarding loop was given.
        self.loop_capture: zmq.Socket | None = None
        self.spill: zmq.Socket | None = None   # opened by open()
        self.spill_reader: zmq.Socket | None = None
        self.held_taken_at = 0.0  # when the writer last took a held message
        # (when, how many) the writer took of what is held, over the last
        # CAPTURE_TAIL_WAIT_S: how fast it takes the tail.
        self.takes: deque[tuple[float, int]] = deque()
        self.wrong_peer_seen: str | None = None
        self.feeding = False        # self.capture registered for POLLOUT
        self.reading_spill = False  # self.spill_reader registered for POLLIN

    def open(self, ctx: zmq.Context, capture: zmq.Socket) -> None:
        """Take the capture (opened, and watched, by the proxy), bind its
        rescue endpoint and open the spill."""
        self.ctx, self.capture = ctx, capture
        # Nothing connects here but the capture's recovery (see the module's doc).
        capture.bind(CAPTURE_RESCUE_ENDPOINT)
        self.spill = ctx.socket(zmq.PUSH)
        self.spill_reader = ctx.socket(zmq.PULL)
        for sock, option in ((self.spill, zmq.SNDHWM), (self.spill_reader, zmq.RCVHWM)):
            sock.setsockopt(option, self.config.capture_hwm)
            sock.setsockopt(zmq.LINGER, 0)
        self.spill.bind(CAPTURE_SPILL_ENDPOINT)
        self.spill_reader.connect(CAPTURE_SPILL_ENDPOINT)

    def next_run_capture(self) -> zmq.Socket:
        """The capture for the next run of the forwarding loop: straight to
        the writer if it is there and nothing is held for it, else the spill."""
        writer = self.writer()
        direct = not self.held and writer.handshaken and writer.gave_up is None
        self.loop_capture = self.capture if direct else self.spill
        if direct:  # the loop's thread owns the capture now: no longer polled here
            self.watch_room()
        return self.loop_capture

    def state(self) -> str:
        writer = self.writer()
        if writer.gave_up is not None or writer.failing:
            return CAPTURE_WRONG_PEER
        if self.forwarding() and self.loop_capture is self.capture:
            return CAPTURE_DIRECT
        return CAPTURE_DRAINING if writer.handshaken and self.held else CAPTURE_HOLDING

    def snapshot(self) -> dict[str, Any]:
        return {**self.writer().snapshot(), "state": self.state(), "held": len(self.held),
                "held_peak": self.held_peak, "spilled": self.spilled_total,
                "rescued": self.rescued_total}

    def tend(self, now: float) -> None:
        """Keep what is captured going to the writer, and live delivery going
        while no writer takes it (see the module's doc). Called once per pass;
        never waits long."""
        writer = self.writer()
        if writer.gave_up is not None and self.wrong_peer_seen is None:
            self.wrong_peer_seen = writer.gave_up
            log.warning("capture_wrong_peer", endpoint=self.config.capture_endpoint,
                        reason=writer.gave_up, wrong_peers=writer.wrong_peers,
                        action="holding what is captured; connecting the capture again")
        if self.forwarding() and self.down is None:
            why = self._why_change_course(writer, now)
            if why is not None:
                self._stop_loop(why, now)
        if self.loop_capture is self.spill:
            self.take_spilled()
        if self.forwarding():
            if self.loop_capture is self.capture:
                if self.down is not None:
                    self._rescue_blocked_loop(now)
                return
        else:
            self.end_of_loop()
        # From here the main thread owns the capture: the loop, if it runs,
        # sends into the spill.
        if writer.redial_due(now):  # of several endpoints, even while another serves
            writer.redial()
            self.wrong_peer_seen = None
            log.info("capture_redialed", endpoint=self.config.capture_endpoint,
                     redials=writer.redials, held=len(self.held))
        if writer.stale():
            log.warning("capture_superseded", dropped=writer.drop_stale(),
                        reason="a newer writer completed its handshake: the older one lost "
                               "the writer's lock (what was queued for it is sent again by "
                               "its publishers)")
        self.send_held(writer, now)
        if self.forwarding() or self.down is None or self.paused():
            return  # running, or stopped for something else (the memory guard resumes it)
        if self.held and self._writer_taking(writer, now):
            return  # the writer is taking the last of what is held: straight to it after
        self.down = None
        self.start_forwarding()

    def _writer_taking(self, writer: sockets.Connections, now: float) -> bool:
        """Whether a connected writer is taking what is held, with little of it
        left: the loop may wait (stopped) for it, then capture straight to it."""
        while self.takes and now - self.takes[0][0] >= CAPTURE_TAIL_WAIT_S:
            self.takes.popleft()
        taken = sum(count for _at, count in self.takes)
        # What is left is what the writer took in the last half second, or
        # less: it will be sent in about that time. A writer that takes
        # nothing (or a message now and then) leaves the loop running.
        return writer.handshaken and writer.gave_up is None and \
            len(self.held) <= min(self.config.capture_hwm, taken)

    def _why_change_course(self, writer: sockets.Connections, now: float) -> str | None:
        """Why the running loop must be stopped to capture elsewhere, if it must."""
        if self.loop_capture is self.capture:
            if writer.gave_up is not None:
                return f"a wrong peer at the capture endpoint: {writer.gave_up}"
            if not writer.handshaken:
                return "the writer is gone: holding what is captured"
            if writer.stale():
                return "a newer writer took over: dropping the older one's connection"
        elif not self.held and writer.handshaken and writer.gave_up is None \
                or self.held and self._writer_taking(writer, now):
            return "the writer is back: capturing straight to it again"
        return None

    def _stop_loop(self, why: str, now: float) -> None:
        self.down = why
        log.info("capture_course", action="stopping the forwarding loop for a moment",
                 reason=why, held=len(self.held))
        self.steering.settle(wait_ms=50)
        self.steering.send(STEER_TERMINATE, 0)
        self.stop_sent = now

    def _rescue_blocked_loop(self, now: float) -> None:
        """A loop stopped while capturing to the writer may be blocked in a
        capture send that no pipe will take (no writer, or a wrong peer): the
        rescue pipe does, so the loop finishes its burst and reads TERMINATE."""
        if self.rescue is None and now - self.stop_sent >= CAPTURE_RESCUE_AFTER_S:
            self.rescue = self.ctx.socket(zmq.PULL)
            self.rescue.connect(CAPTURE_RESCUE_ENDPOINT)
        self._take_rescued()

    def end_of_loop(self) -> None:
        """The loop has ended: what it sent into the rescue pipe or the spill
        is read to its end (a pipe delivers up to its end) and held."""
        if self.rescue is not None:
            open_capture = not self.capture.closed  # (closed by the loop at shutdown)
            if open_capture:  # unbound first, so that no send of ours goes there
                self.capture.unbind(CAPTURE_RESCUE_ENDPOINT)
            while self.rescue.poll(10):
                self._take_rescued()
            self.rescue.close(linger=0)
            self.rescue = None
            if open_capture:
                self.capture.bind(CAPTURE_RESCUE_ENDPOINT)
        if self.loop_capture is not None and self.loop_capture is self.spill:
            while self.spill_reader.poll(10):
                self.take_spilled(ending=True)
        self.loop_capture = None

    def send_held_until(self, deadline: float) -> None:
        """At shutdown: what is held goes into the capture's queue as it takes
        it, until `deadline` (the capture then lingers for what is left of it)."""
        while self.held and time.monotonic() < deadline and not self.capture.closed:
            try:
                self.capture.send_multipart(self.held[0], zmq.NOBLOCK)
            except zmq.Again:
                self.capture.poll(min(50, max(1, int((deadline - time.monotonic()) * 1000))),
                                  zmq.POLLOUT)
                continue
            self.held.popleft()

    def _take_rescued(self) -> None:
        while self.rescue is not None:
            try:
                self.held.append(self.rescue.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.rescued_total += 1
        self.held_peak = max(self.held_peak, len(self.held))

    def spilling(self) -> bool:
        """Whether the loop captures into the spill (which must be read)."""
        return self.spill is not None and self.loop_capture is self.spill

    def must_read_spill(self) -> bool:
        """Whether the spill is to be read now: the loop captures into it, and
        what is held is under its bound (or the loop is to end, which it must
        be read from to do)."""
        return self.spill is not None and self.loop_capture is self.spill and (
            len(self.held) < self.config.capture_hwm_writer_down or self.steering.loop_ending)

    def take_spilled(self, ending: bool = False) -> None:
        """Hold what the loop spilled, up to capture_hwm_writer_down messages;
        past that the loop waits in its send (live delivery with it), unless
        it is to end, which it must be read from to do."""
        bound = self.config.capture_hwm_writer_down
        for _ in range(CAPTURE_MOVES_PER_PASS):
            if len(self.held) >= bound and not (ending or self.steering.loop_ending):
                break
            try:
                self.held.append(self.spill_reader.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            self.spilled_total += 1
        self.held_peak = max(self.held_peak, len(self.held))

    def send_held(self, writer: sockets.Connections, now: float) -> None:
        """Send what is held to the writer, oldest first, as its queue takes
        it. Only to a writer that completed its handshake: what is queued for
        a wrong peer is lost with its connection."""
        if not (writer.handshaken and writer.gave_up is None):
            return
        sent = 0
        for _ in range(CAPTURE_MOVES_PER_PASS):
            if not self.held:
                break
            try:
                self.capture.send_multipart(self.held[0], zmq.NOBLOCK)
            except zmq.Again:
                break
            self.held.popleft()
            sent += 1
        if sent:
            self.held_taken_at = now
            self.takes.append((now, sent))

    def watch_room(self) -> None:
        """Wake the main loop when the capture has room while something is
        held for the writer and the main thread owns the capture, and when the
        spill has something while it may be read (not at the bound: a spill
        left unread would wake the loop at once, for ever)."""
        feeding = bool(self.held) and self.writer().handshaken and \
            self.loop_capture is not self.capture
        if feeding != self.feeding:
            if feeding:
                self.poller.register(self.capture, zmq.POLLOUT)
            else:
                self.poller.unregister(self.capture)
            self.feeding = feeding
        reading = self.loop_capture is self.spill and (
            len(self.held) < self.config.capture_hwm_writer_down or self.steering.loop_ending)
        if reading != self.reading_spill:
            if reading:
                self.poller.register(self.spill_reader, zmq.POLLIN)
            else:
                self.poller.unregister(self.spill_reader)
            self.reading_spill = reading

    def close(self) -> None:
        """The rescue pipe and the spill (the capture is closed by the proxy)."""
        for sock in (self.rescue, self.spill, self.spill_reader):
            if sock is not None:
                sock.close(linger=0)
