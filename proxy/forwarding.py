"""The proxy's forwarding loop: libzmq's steerable proxy (zmq.proxy_steerable)
on a thread of its own, between the publishers' side (`frontend`) and the
subscribers' (`backend`), capturing into what the capture's course chooses
for each run (proxy/capture.py). Ended by the memory guard or the capture's
course, its sockets stay open for the next run, and the sides the guard cut
off are opened again here (`open_side`); ended at shutdown or by an error,
the loop's thread closes them."""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq

from bus import sockets
from proxy.capture import CaptureCourse
from proxy.memory import CONTROL, SIDE_SOCKETS
from proxy.steering import STEER_TERMINATE, Steering


class ForwardingLoop:
    """`openers`: for each side the guard may cut off (publishers,
    subscribers), what opens its socket again (bound, and watched in
    `connections`); `keeps_sockets()`: whether the loop was ended by a part
    (the memory guard, the capture's course) that runs it again."""

    def __init__(self, steering: Steering, course: CaptureCourse,
                 connections: dict[str, sockets.Connections],
                 openers: dict[str, Callable[[], zmq.Socket]],
                 keeps_sockets: Callable[[], bool]) -> None:
        self.steering = steering
        self.course = course
        self.connections = connections
        self.openers = openers
        self.keeps_sockets = keeps_sockets
        self.frontend: zmq.Socket | None = None
        self.backend: zmq.Socket | None = None
        self.capture: zmq.Socket | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.capture_linger_ms = 0   # set by shutdown, used by the loop's thread

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def ended(self) -> bool:
        """Whether the loop ended on its own (an error), not for a part."""
        return self.thread is not None and not self.running() and (
            not self.keeps_sockets() or self.error is not None)

    def start(self) -> None:
        """Run the forwarding loop, capturing straight to the writer if it is
        there and nothing is held for it, else into the spill."""
        if self.course.loop_capture is not None:  # what the run before left in its pipes
            self.course.end_of_loop()
        steered = self.steering.open()
        capture = self.course.next_run_capture()
        self.thread = threading.Thread(target=self._run, args=(steered, capture),
                                       name="zmq-proxy", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """For a pause: the loop's counters kept, TERMINATE sent; a loop
        blocked in a capture send takes it once it is free."""
        self.steering.settle(wait_ms=200)
        self.steering.send(STEER_TERMINATE, 200)
        if self.thread is not None:
            self.thread.join(0.2)

    def resume(self) -> None:
        if self.course.down is None:  # else the capture's course starts it
            self.start()

    def _run(self, steered: zmq.Socket, capture: zmq.Socket) -> None:
        """The forwarding loop's thread. At shutdown its sockets are closed
        here, where they are used: the loop may be blocked in a capture send
        (a writer connected but not reading, queue full) and only the
        context's termination (ETERM) frees it; the spill stays the main
        thread's, which reads what is left in it. When the memory guard or
        the capture's course ends the loop, the main thread takes the sockets
        over until it starts the loop again."""
        try:
            zmq.proxy_steerable(self.frontend, self.backend, capture, steered)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                self.error = exc
        except BaseException as exc:  # reported by the main loop, which exits non-zero
            self.error = exc
        finally:
            if not self.keeps_sockets() or self.error is not None:
                self.close_sockets(capture_too=capture is self.capture)

    def close_sockets(self, capture_too: bool = True) -> None:
        for sock in (self.frontend, self.backend, self.steering.steered):
            if sock is not None:
                sock.close(linger=0)
        if capture_too and self.capture is not None:
            # Queued captures still reach the writer within the shutdown deadline.
            self.capture.close(linger=self.capture_linger_ms)

    # --- the sides the memory guard closes and opens (proxy/memory.py) -------

    def close_side(self, side: str) -> None:
        if side == CONTROL:
            self.connections[CONTROL].drop_all()
            return
        # Its monitor stopped first (bus/sockets.Connections.unwatch): a socket
        # closed after its monitor's reader blocked libzmq's reaper for good,
        # and no socket closed after it released its port or its connections
        # (they kept reading while nothing was forwarded).
        self.connections.pop(side).unwatch()
        getattr(self, SIDE_SOCKETS[side]).close(linger=0)
        setattr(self, SIDE_SOCKETS[side], None)

    def open_side(self, side: str) -> None:
        setattr(self, SIDE_SOCKETS[side], self.openers[side]())
