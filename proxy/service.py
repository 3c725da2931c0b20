"""bus-proxy: the live pub/sub hub.

Binds   SUB   pub_endpoint            publishers connect here
Binds   PUB   sub_endpoint            subscribers connect here
Connects PUSH capture_endpoint        every data message taken in, to the writer
Binds   ROUTER proxy_control_endpoint  `stats`, `ping`

An edge proxy (BUS_PROXY_UPSTREAM) has its SUB connected to another proxy's
sub_endpoint instead of bound for publishers, and no capture:
proxy/upstream.py takes the capture course's place (docs/protocol.md, "Edge
proxies").

Messages are forwarded by libzmq's own steerable proxy loop on a thread of its
own (it runs without the GIL); this process's Python loop only answers control
requests and watches for SIGTERM/SIGINT, which end the proxy with TERMINATE.
The publisher side is a SUB subscribed to the first bytes of storable topics
and the subscriber side a PUB (bus/sockets.py): the proxy takes in no reserved
`$` topic from anyone, and nothing flows from subscribers to publishers or to
the writer. The bus's own notifications come from the writer's notify endpoint.
On stop the proxy keeps forwarding until publishers have been quiet for
drain_idle_ms (at most 5 such periods), then its capture socket lingers for the
rest of shutdown_timeout_ms so that what is queued for the writer is still
delivered.

The capture queue to the writer is short (BUS_CAPTURE_HWM: fairness, see
bus/sockets.open_proxy_capture). While no writer has completed its handshake
on it (a restart, a crash, a wrong peer) the proxy holds what it captures
instead: the forwarding loop is stopped for a moment and run again with the
spill (CAPTURE_SPILL_ENDPOINT) as its capture, from which the main thread
copies each message into `held` (up to BUS_CAPTURE_HWM_WRITER_DOWN; then the
loop waits in its send). Once the writer is back, the main thread sends what
is held, oldest first, as the capture's queue takes it, and with little left
runs the loop with the capture straight to the writer again (or on the
spill again, if the writer stops taking: CAPTURE_TAIL_WAIT_S): the loop
captures to the writer only while nothing is held, so nothing overtakes it.
Steering replies are waited for reading the spill (Steering.wait_reply).
libzmq cannot shorten a queue that holds more than its new length (the
writer side of a pipe learns what was read only at the reader's low-water
marks, computed from the old length): so the queue is never lengthened.

The capture PUSH meets whatever listens at the capture endpoint. If that is
not the writer (a process that bound the port while the writer restarted: a
NULL listener, a CURVE server with another key), libzmq gives up on the
endpoint for good after the failed handshake, and the forwarding loop would
block in its next capture send for ever. The proxy watches the capture's
handshakes (bus/sockets.Connections): on such a failure it logs
`capture_wrong_peer`, counts it, stops the forwarding loop (a loop blocked in
a capture send is given a pipe to finish its burst into,
CAPTURE_RESCUE_ENDPOINT, and what it sent there is held), runs it again on the
spill, and connects the capture again (backing off to 1 s while the wrong peer
stays). What the dead connection had queued is lost; its publishers re-send it
(acknowledgements).

Counters come from libzmq's STATISTICS command; libzmq counts frames (message
parts), not messages, so they are reported as frames. Each run of the
forwarding loop has a steering pair of its own, and each reply is matched with
the command it answers (proxy/steering.py: Steering.open, Steering.answered).

Subscriptions are held to budgets, per subscriber connection and in all, from
the kernel's count of the bytes each connection sent (proxy/budget.py): a
connection over one is cut off, counted and logged.

libzmq bounds its queues in messages, never in bytes, and cannot limit the
frames of one message. The memory guard
(BUS_PROXY_MEMORY_LIMIT_BYTES) bounds the process in bytes instead. Over the
limit it pauses: the forwarding loop is ended (libzmq 4.3.5's PAUSE command
does not stop it) and nothing more is forwarded, while the capture queue
drains into the writer. While paused:
- memory that still grows by an eighth of the limit is someone streaming in:
  the publishers' connections are cut off, then (if it grows again) the
  subscribers', then the control endpoint's, in turn;
- memory not back within a second while the writer is connected is a slow
  subscriber's queue or held subscriptions: the subscribers are cut off
  (with the writer gone, the capture queue is what holds it: the pause lasts
  until the writer is back, as a full capture queue does);
- under 75% of the limit, or 10 s after its last action with the writer
  connected, forwarding resumes.
A cut-off shuts the side's connections down (bus/sockets.Connections): their
queues and subscriptions go, the socket keeps listening, and the peers
reconnect (subscribers subscribe again and lose what was queued for them;
publishers re-send what was not acknowledged). Redis's
client-output-buffer-limit and NATS's slow-consumer cut-off do the same per
client; libzmq's PUB cannot tell which subscriber is slow, so a whole side goes.

`Proxy` is the coordinator: the process's sockets, its own loop (control
requests, then each part stepped with the pass's `now`), `stats` and
shutdown. The parts, each of one job, are stepped with the
time (`now`) by that loop or by a test (tests/test_proxy_parts.py):

    proxy/forwarding.py ForwardingLoop: libzmq's loop on its thread, started,
                        stopped; the sides it forwards between
    proxy/steering.py   Steering: the steering pair of each run, its commands
                        and their replies matched, the counters
    proxy/capture.py    CaptureCourse: direct, holding, draining, wrong_peer;
                        what is held for the writer
    proxy/upstream.py   UpstreamCourse: an edge's, in its place
    proxy/memory.py     MemoryGuard: pause, cut-offs, resume
    proxy/budget.py     SubscriptionBudget: what subscribers may send
    proxy/stats.py      the `stats` answer and the /metrics series
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from bus import control, protocol, security, sockets
from bus.build import build_info
from bus.config import DRAIN_WINDOW_IDLES, BusConfig
from bus.http import HttpSide
from bus.logging import get_logger
from bus.runner import StopSignal, resident_bytes
from proxy.budget import SubscriptionBudget
from proxy.capture import CaptureCourse
from proxy.forwarding import ForwardingLoop
from proxy.health import forwarding_health, proxy_health
from proxy.memory import CONTROL, MEMORY_CHECK_S, PUBLISHERS, SUBSCRIBERS, WRITER, MemoryGuard
from proxy.stats import HTTP_SERIES, proxy_stats
from proxy.steering import STATISTICS_WAIT_MS, STEER_TERMINATE, Steering
from proxy.upstream import UpstreamCourse

log = get_logger("proxy")

# What each subscriber connection may hold beyond what SubscriptionBudget
# counted (its kernel receive buffer, its pipe of subscriptions the
# forwarding loop has not applied yet): what still reaches the trie after a
# cut-off.
SUBSCRIBER_RECEIVE_BUFFER_BYTES = 64 << 10
SUBSCRIBER_RECEIVE_HWM = 100


class Proxy:
    name = "proxy"
    # What /healthz answers from, and what the systemd watchdog is pinged by
    # (an edge whose upstream is away is not served by its own restart).
    health = staticmethod(proxy_health)
    watchdog_health = staticmethod(forwarding_health)

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.ctx: zmq.Context | None = None
        self.started = time.monotonic()
        self.dispatcher = control.Dispatcher(
            [control.Command("stats", self._stats_command, errors=(protocol.BUSY,),
                             roles=(security.PUBLISHERS, security.READERS))],
            log, config, domain="proxy_control")
        self.http: HttpSide | None = None
        self._subscriber_port = 0
        self.connections: dict[str, sockets.Connections] = {}
        self.subscriptions = SubscriptionBudget(config.proxy_subscription_bytes_per_connection,
                                                config.proxy_subscription_bytes)
        # The parts (see the module's doc), each holding the hooks it needs.
        self.steering = Steering(None, lambda: self.forwarding.running())
        # An edge proxy (BUS_PROXY_UPSTREAM) captures nothing: its publisher
        # side is the upstream proxy (proxy/upstream.py).
        self.edge = bool(config.upstream)
        hooks = (lambda: self.forwarding.running(), lambda: self.forwarding.start(),
                 lambda: self.guard.paused)
        self.course: CaptureCourse | UpstreamCourse = (
            UpstreamCourse(config.upstream, self.steering, lambda: self.connections[PUBLISHERS],
                           *hooks) if self.edge else
            CaptureCourse(config, self.steering, lambda: self.connections[WRITER], *hooks))
        self.steering.spill = self.course
        self.forwarding = ForwardingLoop(
            self.steering, self.course, self.connections,
            {PUBLISHERS: self._open_publisher_side, SUBSCRIBERS: self._open_subscriber_side},
            keeps_sockets=lambda: self.guard.paused or self.course.down is not None)
        self.guard = MemoryGuard(config, self.forwarding, self.course)

    def initialize(self, stop: StopSignal) -> None:
        cfg = self.config
        self.stop = stop
        self.ctx = self.steering.ctx = zmq.Context()
        self.auth = security.start_authenticator(self.ctx, cfg)
        # Watched from before they connect or bind (bus/sockets.Connections):
        # whether the writer is connected, and the control's peers (dropped by
        # the memory guard; the main thread owns that socket, so it can).
        # Each bound endpoint (publishers, subscribers, control) held to
        # BUS_MAX_CONNECTIONS (bus/sockets.Connections).
        self.max_connections = sockets.connection_cap(cfg, 3, log)
        self.forwarding.frontend = self._open_publisher_side()
        self.forwarding.backend = self._open_subscriber_side()
        if not self._subscriber_port:
            log.warning("subscription_budget_off", endpoint=cfg.sub_endpoint,
                        reason="subscription budgets need a TCP endpoint (the kernel's count "
                               "of bytes received on each connection)")
        self.capture: zmq.Socket | None = None
        if not self.edge:
            self.capture = self.forwarding.capture = sockets.open_proxy_capture(
                self.ctx, cfg, self._watch(WRITER, cfg.capture_endpoint))
            self.course.open(self.ctx, self.capture)
        self.control = sockets.open_proxy_control(self.ctx, cfg,
                                                  self._watch(CONTROL, cfg.proxy_control_endpoint))
        self.poller = self.course.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(stop.fileno(), zmq.POLLIN)
        self.forwarding.start()
        if cfg.proxy_http:
            self.http = HttpSide("proxy", cfg.proxy_http, HTTP_SERIES, proxy_health)
        log.info("started", **build_info(), **self.endpoints(),
                 control_endpoint=cfg.proxy_control_endpoint, capture_hwm=cfg.capture_hwm,
                 memory_limit_bytes=cfg.proxy_memory_limit_bytes,
                 config_source=cfg.source, config=cfg.public())

    def endpoints(self) -> dict[str, str]:
        """What this proxy binds and connects to (`stats` endpoints, its log)."""
        cfg = self.config
        if self.edge:
            return {"upstream": cfg.upstream, "sub": cfg.sub_endpoint}
        return {"pub": cfg.pub_endpoint, "sub": cfg.sub_endpoint, "capture": cfg.capture_endpoint}

    def _watch(self, side: str, endpoint: str) -> Callable[[zmq.Socket], None]:
        """An on_open hook: the side's connections, watched from before it binds
        or connects (a side opened again replaces the watch of the one
        closed). The sides that connect: the capture, and an edge's upstream."""
        def attach(sock: zmq.Socket) -> None:
            previous = self.connections.pop(side, None)
            if previous is not None:
                previous.close()
            self.connections[side] = sockets.Connections(
                sock, endpoint, connected=side == WRITER or self.edge and side == PUBLISHERS,
                max_connections=self.max_connections, log=log, name=side)
        return attach

    def _open_publisher_side(self) -> zmq.Socket:
        """The frontend: publishers' SUB, or an edge's SUB to its upstream
        (watched under the same name: what the memory guard cuts off and
        opens again is the side data comes in from)."""
        if self.edge:
            return sockets.open_edge_upstream(self.ctx, self.config,
                                              self._watch(PUBLISHERS, self.config.upstream))
        return sockets.open_proxy_frontend(self.ctx, self.config,
                                           self._watch(PUBLISHERS, self.config.pub_endpoint))

    def _open_subscriber_side(self) -> zmq.Socket:
        """The backend, and before it binds, what each subscriber connection
        may hold beyond what SubscriptionBudget counted, and its connections
        watched; the TCP port it is bound to (0: not TCP), read before the
        forwarding loop's thread uses the socket."""
        def before_bind(sock: zmq.Socket) -> None:
            sock.setsockopt(zmq.RCVBUF, SUBSCRIBER_RECEIVE_BUFFER_BYTES)
            sock.setsockopt(zmq.RCVHWM, SUBSCRIBER_RECEIVE_HWM)
            self._watch(SUBSCRIBERS, self.config.sub_endpoint)(sock)
        backend = sockets.open_proxy_backend(self.ctx, self.config, before_bind)
        endpoint = backend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._subscriber_port = \
            int(endpoint.rsplit(":", 1)[1]) if endpoint.startswith("tcp://") else 0
        return backend

    def loop(self, now: float | None = None) -> None:
        events = dict(self.poller.poll(int(MEMORY_CHECK_S * 1000)))
        if self.forwarding.ended():
            raise RuntimeError(f"proxy loop ended: {self.forwarding.error!r}")
        if self.stop.fileno() in events:
            self.stop.clear_wakeup()
        if self.control in events:
            self.dispatcher.serve(self.control)
        now = time.monotonic() if now is None else now
        for connections in self.connections.values():
            connections.update()
        self.guard.step(now)
        if self._subscriber_port and SUBSCRIBERS in self.connections:
            self.subscriptions.check(self.connections[SUBSCRIBERS], now)
        self.course.tend(now)
        self.course.watch_room()

    def _stats_command(self, _request: control.Request) -> dict[str, Any]:
        stats = self.read_stats()
        if stats["forwarding"] == "blocked":
            raise control.CommandFailed(
                protocol.BUSY, f"the forwarding loop did not answer within {STATISTICS_WAIT_MS} "
                "ms: it is busy or blocked (a full capture queue while the writer is down?); "
                "retry")
        return stats

    def counters(self, wait_ms: int = STATISTICS_WAIT_MS) -> dict[str, int] | None:
        return self.steering.counters(wait_ms)

    def status_line(self) -> str:
        counters = self.counters(wait_ms=100) or self.steering.counted
        line = (f"forwarded {counters['frontend_frames_in']:,} frames in, "
                f"{counters['backend_frames_out']:,} out; {resident_bytes() >> 20} MB")
        if self.guard.paused:
            line += "; paused: over its memory limit"
        return line

    def read_stats(self, wait_ms: int = STATISTICS_WAIT_MS) -> dict[str, Any]:
        """The proxy's stats (proxy/stats.py); `forwarding` says "running",
        "paused", "reconnecting" or "blocked" (the loop did not answer within
        `wait_ms`): blocked, the frame counters are those of the loops before
        the current one."""
        counters = self.counters(wait_ms)
        return proxy_stats(self, counters, time.monotonic())

    def snapshot(self) -> dict[str, Any]:
        return self.read_stats(wait_ms=500)

    # --- stopping -------------------------------------------------------------

    def drain_before_exit(self, deadline: float) -> None:
        """Keep forwarding until publishers have been quiet for drain_idle_ms:
        messages they already sent are in the proxy's queues, and closing now
        would drop them. At most DRAIN_WINDOW_IDLES x drain_idle_ms (1 s by
        default): under steady load publishers are never quiet, and what they
        send after the proxy is gone is theirs to re-send (acknowledgements).
        A loop blocked on a full capture queue cannot drain: skipped."""
        idle = self.config.drain_idle_ms / 1000.0
        deadline = min(deadline, time.monotonic() + DRAIN_WINDOW_IDLES * idle)
        seen, quiet_since = None, time.monotonic()
        while seen is None or time.monotonic() < deadline:
            counters = self.counters()
            if counters is None:
                log.warning("drain_skipped", reason="the forwarding loop is blocked (a full "
                                                    "capture queue while the writer is down?)")
                return
            if counters["frontend_frames_in"] != seen:
                seen, quiet_since = counters["frontend_frames_in"], time.monotonic()
            elif time.monotonic() - quiet_since >= idle:
                return
            if self.course.spilling():  # read, or the loop waits
                self.course.spill_reader.poll(int(min(0.05, idle) * 1000))
                self.course.take_spilled()
            else:
                time.sleep(min(0.05, idle))
        log.warning("drain_cut_short", forwarded_frames=seen,
                    drain_window_ms=int(DRAIN_WINDOW_IDLES * self.config.drain_idle_ms))

    def shutdown(self) -> None:
        if self.ctx is None:
            return
        deadline = time.monotonic() + self.config.shutdown_timeout_ms / 1000.0
        loop, course = self.forwarding, self.course
        thread = loop.thread
        if loop.running():
            if not self.edge:  # an edge's messages in flight are lost with its subscribers'
                self.drain_before_exit(deadline)
            join_s = 1.0
            loop.capture_linger_ms = max(0, int((deadline - time.monotonic() - join_s) * 1000))
            # The loop's thread closes its sockets.
            self.guard.paused_at = course.down = None
            self.steering.send(STEER_TERMINATE, 0)
            # Blocked in a capture send to the writer, the loop never reads
            # TERMINATE: the context's termination below ends it (ETERM).
            # Sending into the spill, it is read from until it ends.
            ends = time.monotonic() + join_s
            while thread.is_alive() and time.monotonic() < ends:
                if course.spilling():
                    course.take_spilled(ending=True)
                thread.join(0.01)
            if not thread.is_alive():  # it may have ended for a pause just before
                loop.close_sockets(capture_too=False)
        else:  # never started, paused by the memory guard or stopped for the capture
            loop.capture_linger_ms = max(0, int((deadline - time.monotonic()) * 1000))
            loop.close_sockets(capture_too=False)
        if not loop.running() and getattr(self, "capture", None) is not None:
            # The capture is this thread's (and was opened: a start that
            # failed before it has nothing to send).
            course.end_of_loop()
            course.send_held_until(deadline)
            self.capture.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
        if course.held:
            log.warning("capture_held_lost", messages=len(course.held),
                        reason="the writer did not take them before the shutdown deadline; "
                               "publishers with acknowledgements send theirs again")
        for connections in self.connections.values():
            connections.close()
        if getattr(self, "control", None) is not None:
            self.control.close(linger=0)
        self.steering.close()
        course.close()
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        self.ctx.term()
        self.ctx = None
