"""bus-proxy: the live pub/sub hub.

Binds   SUB   pub_endpoint            publishers connect here
Binds   PUB   sub_endpoint            subscribers connect here
Connects PUSH capture_endpoint        every data message taken in, to the writer
Binds   REP   proxy_control_endpoint  `stats`, `ping`

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
Steering replies are waited for reading the spill (_wait_reply).
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
the command it answers (_open_steering, _answered).

Subscriptions are held to budgets, per subscriber connection and in all, from
the kernel's count of the bytes each connection sent (SubscriptionBudget): a
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
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Callable
import threading
import time
from typing import Any

import zmq

from bus import control, protocol, security, sockets
from bus.config import DRAIN_WINDOW_IDLES, BusConfig
from bus.http import HttpSide, Series, connection_series, control_series
from bus.logging import RateLimitedLog, get_logger
from bus.runner import StopSignal, release_free_memory, resident_bytes
from proxy.health import proxy_health

log = get_logger("proxy")

# How long `stats` waits for the forwarding loop's counters. The loop is busy
# or blocked (e.g. the capture queue is full while the writer is down) when it
# does not answer in time: `stats` then answers `busy`.
STATISTICS_WAIT_MS = 2000
# How long a reply the loop still owes is waited for before a new question.
OWED_REPLY_WAIT_MS = 100

# The memory guard: how often it reads RSS (what arrives between two reads is
# the most the limit can be overshot by), the fraction of the limit under which
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
# A forwarding loop that has not ended this long after TERMINATE is blocked
# in a capture send: it is given the rescue pipe to finish into.
CAPTURE_RESCUE_AFTER_S = 0.1
CAPTURE_RESCUE_ENDPOINT = "inproc://bus-proxy-capture-rescue"
# While no writer is there, the forwarding loop captures into this pipe (the
# spill) and the main thread holds what arrives, for the writer once it is
# back (see the module's doc).
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
# Subscription budgets (see SubscriptionBudget): how often the bytes each
# subscriber connection sent are read, and what libzmq may hold of a connection
# beyond what was counted (its kernel receive buffer, its pipe of subscriptions
# the forwarding loop has not applied yet): what still reaches the trie after a
# cut-off.
SUBSCRIPTION_CHECK_S = 0.05
SUBSCRIBER_RECEIVE_BUFFER_BYTES = 64 << 10
SUBSCRIBER_RECEIVE_HWM = 100
# struct tcp_info (linux/tcp.h): tcpi_bytes_received, a __u64 at this offset
# (RFC 4898's ThruOctetsReceived, Linux 4.1 and later).
TCPI_BYTES_RECEIVED_OFFSET = 128
SUBSCRIBERS, PUBLISHERS, CONTROL, WRITER = "subscribers", "publishers", "control", "writer"
CUTOFF_COUNTERS = {PUBLISHERS: "publisher_cutoffs", SUBSCRIBERS: "subscriber_cutoffs",
                   CONTROL: "control_cutoffs"}

# What the proxy's /metrics shows (bus/http.py), read from its `stats`.
HTTP_SERIES = [
    Series("frames_in", "counter", "frames taken in from publishers (libzmq counts frames)",
           lambda s: s["frontend_frames_in"]),
    Series("bytes_in", "counter", "bytes taken in from publishers",
           lambda s: s["frontend_bytes_in"]),
    Series("frames_out", "counter", "frames sent to subscribers",
           lambda s: s["backend_frames_out"]),
    Series("bytes_out", "counter", "bytes sent to subscribers", lambda s: s["backend_bytes_out"]),
    Series("memory_limit_bytes", "gauge", "BUS_PROXY_MEMORY_LIMIT_BYTES (0: off)",
           lambda s: s["memory"]["limit_bytes"]),
    Series("paused", "gauge", "1 while forwarding is paused over the memory limit",
           lambda s: int(s["memory"]["paused"])),
    Series("memory_pauses", "counter", "pauses over the memory limit",
           lambda s: s["memory"]["pauses"]),
    Series("subscriber_cutoffs", "counter", "subscriber sides cut off over the memory limit",
           lambda s: s["memory"]["subscriber_cutoffs"]),
    Series("publisher_cutoffs", "counter", "publisher sides cut off over the memory limit",
           lambda s: s["memory"]["publisher_cutoffs"]),
    Series("forwarding_blocked", "gauge", "1 while the forwarding loop does not answer (a full "
           "capture queue?)", lambda s: int(s["forwarding"] == "blocked")),
    Series("steering_unanswered_seconds", "gauge", "how long the forwarding loop has owed a "
           "reply to a steering command (0: none owed)",
           lambda s: s["steering"]["unanswered_s"]),
    Series("capture_wrong_peers", "counter", "capture handshakes that failed: something other "
           "than the writer at the capture endpoint", lambda s: s["capture"]["wrong_peers"]),
    Series("capture_held", "gauge", "messages held for a writer that is not connected (sent "
           "to it, in order, once it is back)", lambda s: s["capture"]["held"]),
    Series("capture_redials", "counter", "capture endpoint connected again after libzmq gave up "
           "on a wrong peer", lambda s: s["capture"]["redials"]),
    Series("subscription_cutoffs", "counter", "subscriber connections cut off over a "
           "subscription budget", lambda s: sum(s["subscriptions"]["refused"].values())),
    Series("subscription_bytes", "gauge", "bytes the subscriber connections sent (their "
           "subscriptions)", lambda s: s["subscriptions"]["sent_bytes"]),
    *control_series(),
    *connection_series(),
]


_STAT_NAMES = (
    "frontend_frames_in", "frontend_bytes_in", "frontend_frames_out", "frontend_bytes_out",
    "backend_frames_in", "backend_bytes_in", "backend_frames_out", "backend_bytes_out",
)


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


# libzmq's steering commands (zmq_proxy_steerable(3)), and the shape of each
# one's reply: STATISTICS eight 64-bit counters, the others one empty frame.
STEER_STATISTICS, STEER_TERMINATE = b"STATISTICS", b"TERMINATE"


def _answers(command: bytes, reply: list[bytes]) -> bool:
    if command == STEER_STATISTICS:
        return len(reply) == len(_STAT_NAMES) and all(len(part) == 8 for part in reply)
    return reply == [b""]


class Proxy:
    name = "proxy"
    # What /healthz answers from, and what the systemd watchdog is pinged by.
    health = staticmethod(proxy_health)

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.ctx: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._proxy_error: BaseException | None = None
        # The steering pair of the current run of the forwarding loop (a new
        # pair for each run: see _open_steering), the commands sent on it that
        # the loop has not answered yet, in order, and the last reply read.
        self.steer: zmq.Socket | None = None
        self._steered: zmq.Socket | None = None
        self._steering_runs = 0
        self._awaiting: deque[tuple[bytes, float]] = deque()  # (command, sent at)
        self._last_reply: list[bytes] | None = None
        self._steering_lost = False
        self.steering_desyncs = 0
        self._capture_linger_ms = 0       # set by shutdown, used by the loop's thread
        self._started = time.monotonic()
        self.dispatcher = control.Dispatcher(
            [control.Command("stats", self._stats_command, errors=(protocol.BUSY,),
                             roles=(security.PUBLISHERS, security.READERS))],
            log, config, domain="proxy_control")
        self.http: HttpSide | None = None
        self._subscriber_port = 0
        self.subscriptions = SubscriptionBudget(config.proxy_subscription_bytes_per_connection,
                                                config.proxy_subscription_bytes)
        # libzmq's counters start from zero with each run of its loop: what the
        # loops before the current one counted (the current run's base), and
        # the current run's last STATISTICS reply (read late or not).
        self._counted = dict.fromkeys(_STAT_NAMES, 0)
        self._run_base = dict(self._counted)
        self._run_statistics: list[bytes] | None = None
        # The memory guard's state: when forwarding was paused (None: running),
        # when it last acted, RSS after that, when to read RSS next, and what it
        # did so far.
        self._paused_at: float | None = None
        self._last_action = 0.0
        self._memory_mark = 0
        self._memory_low = 0
        self._next_memory_check = 0.0
        self._rss = 0
        self.memory_actions = {"pauses": 0, "subscriber_cutoffs": 0, "publisher_cutoffs": 0,
                               "control_cutoffs": 0, "resume_retries": 0}
        self._resume_log = RateLimitedLog(log)
        # The capture's recovery from a wrong peer: why the forwarding loop was
        # stopped for it (None: it was not), when TERMINATE was sent, the
        # rescue pipe of a loop blocked in a capture send, and the messages the
        # loop sent into it, to be sent again first.
        self._capture_down: str | None = None
        self._capture_stop_sent = 0.0
        self._rescue: zmq.Socket | None = None
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
        # The capture the running (or last) forwarding loop was given, and
        # whether TERMINATE was sent to it (it must then be read from, to end).
        self._loop_capture: zmq.Socket | None = None
        self._loop_ending = False
        self.spill: zmq.Socket | None = None   # opened by initialize
        self._held_taken_at = 0.0  # when the writer last took a held message
        # (when, how many) the writer took of what is held, over the last
        # CAPTURE_TAIL_WAIT_S: how fast it takes the tail.
        self._takes: deque[tuple[float, int]] = deque()
        self._spill_reader: zmq.Socket | None = None
        self._wrong_peer_seen: str | None = None
        self._feeding = False  # self.capture registered for POLLOUT

    def initialize(self, stop: StopSignal) -> None:
        cfg = self.config
        self.stop = stop
        self.ctx = zmq.Context()
        self.auth = security.start_authenticator(self.ctx, cfg)
        # Watched from before they connect or bind (bus/sockets.Connections):
        # whether the writer is connected, and the control's peers (dropped by
        # the memory guard; the main thread owns that socket, so it can).
        self.connections: dict[str, sockets.Connections] = {}
        # Each bound endpoint (publishers, subscribers, control) held to
        # BUS_MAX_CONNECTIONS (bus/sockets.Connections).
        self.max_connections = sockets.connection_cap(cfg, 3, log)
        watch = self._watch
        self.frontend = sockets.open_proxy_frontend(self.ctx, cfg,
                                                    watch(PUBLISHERS, cfg.pub_endpoint))
        self.backend = sockets.open_proxy_backend(self.ctx, cfg, self._open_subscriber_side)
        self._subscriber_port = self._bound_tcp_port(self.backend)
        if not self._subscriber_port:
            log.warning("subscription_budget_off", endpoint=cfg.sub_endpoint,
                        reason="subscription budgets need a TCP endpoint (the kernel's count "
                               "of bytes received on each connection)")
        self.capture = sockets.open_proxy_capture(self.ctx, cfg,
                                                  watch(WRITER, cfg.capture_endpoint))
        # Nothing connects here but the capture's recovery (see the module's doc).
        self.capture.bind(CAPTURE_RESCUE_ENDPOINT)
        self.spill = self.ctx.socket(zmq.PUSH)
        self._spill_reader = self.ctx.socket(zmq.PULL)
        for sock, option in ((self.spill, zmq.SNDHWM), (self._spill_reader, zmq.RCVHWM)):
            sock.setsockopt(option, cfg.capture_hwm)
            sock.setsockopt(zmq.LINGER, 0)
        self.spill.bind(CAPTURE_SPILL_ENDPOINT)
        self._spill_reader.connect(CAPTURE_SPILL_ENDPOINT)
        self.control = sockets.open_proxy_control(self.ctx, cfg,
                                                  watch(CONTROL, cfg.proxy_control_endpoint))
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(stop.fileno(), zmq.POLLIN)
        self._reading_spill = False  # self._spill_reader registered for POLLIN
        self._start_forwarding()
        if cfg.proxy_http:
            self.http = HttpSide("proxy", cfg.proxy_http, HTTP_SERIES, proxy_health)
        log.info("started", pub_endpoint=cfg.pub_endpoint, sub_endpoint=cfg.sub_endpoint,
                 capture_endpoint=cfg.capture_endpoint,
                 control_endpoint=cfg.proxy_control_endpoint, capture_hwm=cfg.capture_hwm,
                 memory_limit_bytes=cfg.proxy_memory_limit_bytes,
                 config_source=cfg.source, config=cfg.public())

    def _watch(self, side: str, endpoint: str) -> Callable[[zmq.Socket], None]:
        """An on_open hook: the side's connections, watched from before it binds
        (a side opened again replaces the watch of the one closed)."""
        def attach(sock: zmq.Socket) -> None:
            previous = self.connections.pop(side, None)
            if previous is not None:
                previous.close()
            self.connections[side] = sockets.Connections(
                sock, endpoint, connected=side == WRITER,
                max_connections=self.max_connections, log=log, name=side)
        return attach

    def _open_subscriber_side(self, sock: zmq.Socket) -> None:
        """Before the backend binds: what each subscriber connection may hold
        beyond what SubscriptionBudget counted, and its connections watched."""
        sock.setsockopt(zmq.RCVBUF, SUBSCRIBER_RECEIVE_BUFFER_BYTES)
        sock.setsockopt(zmq.RCVHWM, SUBSCRIBER_RECEIVE_HWM)
        self._watch(SUBSCRIBERS, self.config.sub_endpoint)(sock)

    @staticmethod
    def _bound_tcp_port(sock: zmq.Socket) -> int:
        """The TCP port `sock` is bound to (0: not TCP). Read once, before the
        forwarding loop's thread uses the socket."""
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return int(endpoint.rsplit(":", 1)[1]) if endpoint.startswith("tcp://") else 0

    def guard_subscriptions(self, now: float) -> None:
        """Hold subscriber connections to their budgets (SubscriptionBudget)."""
        if self._subscriber_port and SUBSCRIBERS in self.connections:
            self.subscriptions.check(self.connections[SUBSCRIBERS], now)

    def _start_forwarding(self) -> None:
        """Run the forwarding loop, capturing straight to the writer if it is
        there and nothing is held for it, else into the spill."""
        if self._loop_capture is not None:  # what the run before left in its pipes
            self._end_of_loop()
        self._open_steering()
        writer = self.connections[WRITER]
        direct = not self.held and writer.handshaken and writer.gave_up is None
        self._loop_capture = self.capture if direct else self.spill
        if direct:  # the loop's thread owns the capture now: no longer polled here
            self._watch_capture_room()
        self._thread = threading.Thread(target=self._run_proxy,
                                        args=(self._steered, self._loop_capture),
                                        name="zmq-proxy", daemon=True)
        self._thread.start()

    def _open_steering(self) -> None:
        """A new steering pair, on an endpoint of its own, for each run of the
        forwarding loop: what the loop before it owed (late replies of a busy
        loop, commands a blocked one never read) stays on the old pair, which
        is closed, and can never be read as an answer to this run's commands
        (issue 22 reported a stale TERMINATE reply read as STATISTICS:
        struct.error, and the proxy's exit). Called while no loop runs: the
        old pair is this thread's. What the old pair owes is read first: the
        last STATISTICS of the run that ended (answered late, after its
        waiter gave up) counts its frames, so that the counters never go
        backwards (a reset to Prometheus)."""
        if self.steer is not None:
            self._answered(0)
            if self._run_statistics is not None:
                self._counted = self._counts_of(self._run_statistics)
        self._run_base = dict(self._counted)
        self._run_statistics = None
        for sock in (self.steer, self._steered):
            if sock is not None:
                sock.close(linger=0)
        self._steering_runs += 1
        endpoint = f"{sockets.PROXY_STEERING_ENDPOINT}-{self._steering_runs}"
        self.steer = self.ctx.socket(zmq.PAIR)
        self.steer.bind(endpoint)
        self._steered = self.ctx.socket(zmq.PAIR)
        self._steered.connect(endpoint)
        self._awaiting.clear()
        self._last_reply = None
        self._steering_lost = False
        self._loop_ending = False

    def _run_proxy(self, steered: zmq.Socket, capture: zmq.Socket) -> None:
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
                self._proxy_error = exc
        except BaseException as exc:  # reported by the main loop, which exits non-zero
            self._proxy_error = exc
        finally:
            if (self._paused_at is None and self._capture_down is None) \
                    or self._proxy_error is not None:
                self._close_forwarding_sockets(capture_too=capture is self.capture)

    def _close_forwarding_sockets(self, capture_too: bool = True) -> None:
        for name in ("frontend", "backend", "_steered"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if capture_too and getattr(self, "capture", None) is not None:
            # Queued captures still reach the writer within the shutdown deadline.
            self.capture.close(linger=self._capture_linger_ms)

    def _forwarding(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def loop(self, now: float | None = None) -> None:
        events = dict(self.poller.poll(int(MEMORY_CHECK_S * 1000)))
        if self._thread is not None and not self._forwarding() and (
                (self._paused_at is None and self._capture_down is None)
                or self._proxy_error is not None):
            raise RuntimeError(f"proxy loop ended: {self._proxy_error!r}")
        if self.stop.fileno() in events:
            self.stop.clear_wakeup()
        if self.control in events:
            self.dispatcher.serve(self.control)
        now = time.monotonic() if now is None else now
        self.guard_memory(now)
        self.guard_subscriptions(now)
        self.tend_capture(now)
        self._watch_capture_room()

    def _stats_command(self, _request: control.Request) -> dict[str, Any]:
        stats = self.read_stats()
        if stats["forwarding"] == "blocked":
            raise control.CommandFailed(
                protocol.BUSY, f"the forwarding loop did not answer within {STATISTICS_WAIT_MS} "
                "ms: it is busy or blocked (a full capture queue while the writer is down?); "
                "retry")
        return stats

    def _steer(self, command: bytes, wait_ms: int) -> list[bytes] | None:
        """Send one steering command and return its reply, or None if the loop
        does not answer within `wait_ms` (busy, or blocked in a capture send):
        the command stays queued for it, and its reply is matched later."""
        self.steer.send(command)
        self._awaiting.append((command, time.monotonic()))
        self._loop_ending |= command == STEER_TERMINATE
        return self._last_reply if self._answered(wait_ms) else None

    def _answered(self, wait_ms: int) -> bool:
        """Read the replies the loop owes, each matched with its command
        (libzmq answers every command once, in order: STATISTICS with 8 frames
        of 8 bytes, the others with one empty frame); whether all came within
        `wait_ms`. A reply that does not fit its command means the pair is out
        of step: it is counted and logged, and no reply is trusted until the
        next run of the loop, on a new pair (counters() answers busy)."""
        if self._steering_lost:
            return False
        deadline = time.monotonic() + wait_ms / 1000
        while self._awaiting:
            if not self._wait_reply(deadline):
                return False
            reply = self.steer.recv_multipart()
            command, _ = self._awaiting.popleft()
            if not _answers(command, reply):
                self.steering_desyncs += 1
                self._steering_lost = True
                self._awaiting.clear()
                log.error("steering_desynchronised", command=command.decode(),
                          reply_frames=len(reply), reply_bytes=sum(map(len, reply)),
                          action="no reply trusted until the forwarding loop runs again")
                return False
            self._last_reply = reply
            if command == STEER_STATISTICS:
                self._run_statistics = reply
        return True

    def _wait_reply(self, deadline: float) -> bool:
        """Wait for the loop's next steering reply until `deadline`. A loop
        capturing into the spill may be waiting in its spill send: the spill
        is read meanwhile (up to the held bound, where the loop is blocked
        indeed), or the wait itself would stall live delivery and read as
        "blocked"."""
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            spilling = self.spill is not None and self._loop_capture is self.spill and (
                len(self.held) < self.config.capture_hwm_writer_down or self._loop_ending)
            if not spilling:
                return bool(self.steer.poll(remaining))
            if self.steer.poll(0):
                return True
            if remaining == 0:
                return False
            self._take_spilled()
            zmq.select([self.steer, self._spill_reader], [], [], min(remaining, 10) / 1000)

    def _counts_of(self, reply: list[bytes]) -> dict[str, int]:
        """The counters since the proxy started, from a STATISTICS reply of
        the current run (libzmq's count from the run's start)."""
        return {name: self._run_base[name] + struct.unpack("=Q", part)[0]
                for name, part in zip(_STAT_NAMES, reply)}

    def counters(self, wait_ms: int = STATISTICS_WAIT_MS) -> dict[str, int] | None:
        """libzmq's frame and byte counters since the proxy started, or None if
        the running loop does not answer within `wait_ms`."""
        if not self._forwarding():
            return dict(self._counted)
        # A reply still owed (a question that timed out before) is waited for
        # first, briefly: without it the loop is busy, and no more questions
        # pile up behind. (Not waited for at all, it read as "blocked" while
        # the loop was only slow under a flood: /healthz 503.)
        if not self._answered(min(wait_ms, OWED_REPLY_WAIT_MS)):
            return None
        reply = self._steer(STEER_STATISTICS, wait_ms)
        if reply is None:
            return None
        return self._counts_of(reply)

    def status_line(self) -> str:
        counters = self.counters(wait_ms=100) or self._counted
        line = (f"forwarded {counters['frontend_frames_in']:,} frames in, "
                f"{counters['backend_frames_out']:,} out; {resident_bytes() >> 20} MB")
        if self._paused_at is not None:
            line += "; paused: over its memory limit"
        return line

    def read_stats(self, wait_ms: int = STATISTICS_WAIT_MS) -> dict[str, Any]:
        """The proxy's stats; `forwarding` says "running", "paused" (over its
        memory limit) or "blocked" (the loop did not answer within `wait_ms`:
        a full capture queue while the writer is down?). Blocked, the frame
        counters are those of the loops before the current one."""
        counters = self.counters(wait_ms)
        forwarding = ("blocked" if counters is None else
                      "reconnecting" if self._capture_down is not None else
                      "paused" if self._paused_at is not None else "running")
        return {**(counters or self._counted), "forwarding": forwarding,
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "control": self.dispatcher.counters.snapshot(),
                "security": security.snapshot(self.config),
                "capture_hwm": self.config.capture_hwm,
                "capture_hwm_writer_down": self.config.capture_hwm_writer_down,
                "subscriptions": self.subscriptions.snapshot(),
                "steering": {"runs": self._steering_runs, "desyncs": self.steering_desyncs,
                             "unanswered_s": self.unanswered_s()},
                "capture": {**self.connections[WRITER].snapshot(),
                            "state": self.capture_state(), "held": len(self.held),
                            "held_peak": self.held_peak, "spilled": self.spilled_total,
                            "rescued": self.rescued_total},
                "connections": {side: self.connections[side].counts()
                                for side in (PUBLISHERS, SUBSCRIBERS, CONTROL)
                                if side in self.connections},
                "memory": {"rss_bytes": resident_bytes(),
                           "limit_bytes": self.config.proxy_memory_limit_bytes,
                           "paused": self._paused_at is not None, **self.memory_actions},
                "endpoints": {"pub": self.config.pub_endpoint, "sub": self.config.sub_endpoint,
                              "capture": self.config.capture_endpoint}}

    def snapshot(self) -> dict[str, Any]:
        return self.read_stats(wait_ms=500)

    def unanswered_s(self) -> float:
        """How long the loop has owed a steering reply (0.0: none owed)."""
        if not self._awaiting:
            return 0.0
        return round(time.monotonic() - self._awaiting[0][1], 3)

    # --- the memory guard -----------------------------------------------------

    def guard_memory(self, now: float) -> None:
        """Keep RSS under BUS_PROXY_MEMORY_LIMIT_BYTES (see the module's doc)."""
        for connections in self.connections.values():
            connections.update()
        limit = self.config.proxy_memory_limit_bytes
        if not limit or now < self._next_memory_check:
            return
        self._next_memory_check = now + MEMORY_CHECK_S
        self._rss = resident_bytes()
        if self._paused_at is None:
            if self._rss <= limit:
                return
            release_free_memory()
            self._rss = resident_bytes()
            if self._rss <= limit:
                return
            self._pause(now, limit)
            return
        if self._forwarding():  # a blocked loop has not taken the pause yet
            return
        if self._rss >= limit * MEMORY_RESUME_FRACTION:
            release_free_memory()
            self._rss = resident_bytes()
        writer_connected = bool(self.connections[WRITER].fds)
        if self.held and now - self._held_taken_at < CAPTURE_TAIL_WAIT_S:
            # What is held is going to the writer: that is what brings memory
            # back, not a cut-off, and memory in transit to the capture is no
            # one streaming in (the clocks and the mark below start again once
            # it is sent, or once the writer stops taking it).
            self._last_action, self._memory_mark = now, self._rss
        if self._rss < self._memory_low - limit * PROGRESS_FRACTION:
            # Memory is coming back: something drains. Not the slow
            # subscriber's queue a cut-off is for (that one does not move).
            self._last_action, self._memory_low = now, self._rss
        if self._rss < limit * MEMORY_RESUME_FRACTION:
            self._resume(now, limit, "memory_back_under_limit")
        elif self._rss > self._memory_mark + limit * CUTOFF_GROWTH_FRACTION:
            # Still growing with nothing forwarded: someone is streaming in, on
            # one side or the other (or an endless request on the control).
            self._cut_off(PUBLISHERS if self.frontend is not None else
                          SUBSCRIBERS if self.backend is not None else CONTROL, now, limit)
        elif (writer_connected and self.backend is not None and not self.held
              and now - self._last_action >= SUBSCRIBER_CUTOFF_AFTER_S):
            # The capture queue drains into a connected writer; what does not
            # drain is a slow subscriber's queue, or held subscriptions. (What
            # the proxy holds for the writer is no subscriber's: while there
            # is some, the subscribers stay.)
            self._cut_off(SUBSCRIBERS, now, limit)
        elif writer_connected and now - self._last_action >= PAUSE_GIVE_UP_S:
            # What holds the memory is no queue of this process that drains:
            # forwarding goes on (and pauses again if memory grows).
            self._resume(now, limit, "memory_still_over_limit")

    def _pause(self, now: float, limit: int) -> None:
        """End the forwarding loop, keeping its sockets and their queues. A
        loop blocked in a capture send takes the TERMINATE once it is free."""
        self._paused_at = self._last_action = now
        self._memory_mark = self._memory_low = self._rss
        self.memory_actions["pauses"] += 1
        log.warning("memory_limit_reached", action="paused forwarding", rss_bytes=self._rss,
                    limit_bytes=limit, writer_connected=bool(self.connections[WRITER].fds))
        counted = self.counters(wait_ms=200)
        if counted is not None:
            self._counted = counted
        self._steer(STEER_TERMINATE, 200)
        if self._thread is not None:
            self._thread.join(0.2)

    def _cut_off(self, side: str, now: float, limit: int) -> None:
        """Close one side's socket while forwarding is paused: its connections,
        queues and subscriptions go with it, and its peers stay out (they retry)
        until forwarding resumes, so that publishers re-sending do not fill the
        proxy again. The control endpoint's connections are dropped instead
        (bus/sockets.Connections): it must go on answering."""
        self.memory_actions[CUTOFF_COUNTERS[side]] += 1
        log.warning("memory_limit_reached", action=f"cut off {side}", rss_bytes=self._rss,
                    limit_bytes=limit)
        if side == CONTROL:
            self.connections[CONTROL].drop_all()
        else:
            name = "backend" if side == SUBSCRIBERS else "frontend"
            # Its monitor stopped first (bus/sockets.Connections.unwatch): a
            # socket closed after its monitor's reader blocked libzmq's reaper
            # for good, and no socket closed after it released its port or
            # its connections (they kept reading while nothing was forwarded).
            self.connections.pop(side).unwatch()
            getattr(self, name).close(linger=0)
            setattr(self, name, None)
        self._last_action = now
        release_free_memory()
        self._rss = self._memory_mark = self._memory_low = resident_bytes()

    def _resume(self, now: float, limit: int, event: str) -> None:
        """Open again the sides that were cut off, and forward. A side that
        cannot be opened yet stays closed, and forwarding paused, until the
        next memory check tries again: its port still held by the socket just
        closed (libzmq closes in the background), taken meanwhile by another
        process (only without socket activation: the units' listening sockets
        stay open here), or no descriptor free. Never an exit, never a wait
        that holds the main loop."""
        for name, opener, on_open in (
                ("frontend", sockets.open_proxy_frontend,
                 self._watch(PUBLISHERS, self.config.pub_endpoint)),
                ("backend", sockets.open_proxy_backend, self._open_subscriber_side)):
            if getattr(self, name) is None:
                try:
                    setattr(self, name, opener(self.ctx, self.config, on_open))
                except (sockets.EndpointInUse, zmq.ZMQError, OSError) as exc:
                    self.memory_actions["resume_retries"] += 1
                    self._resume_log.warning(name, "resume_postponed", side=name,
                                             error=str(exc), action="stays paused; tried "
                                             "again at the next memory check")
                    return
                if name == "backend":
                    self._subscriber_port = self._bound_tcp_port(self.backend)
        (log.info if event == "memory_back_under_limit" else log.warning)(
            event, action="resumed forwarding", rss_bytes=self._rss, limit_bytes=limit,
            paused_ms=round((now - (self._paused_at or now)) * 1000))
        self._paused_at = None
        if self._capture_down is None:  # else tend_capture starts it
            self._start_forwarding()

    # --- the capture's course: the writer, held, a wrong peer ------------------

    def capture_state(self) -> str:
        writer = self.connections[WRITER]
        if writer.gave_up is not None or writer.failing:
            return CAPTURE_WRONG_PEER
        if self._forwarding() and self._loop_capture is self.capture:
            return CAPTURE_DIRECT
        return CAPTURE_DRAINING if writer.handshaken and self.held else CAPTURE_HOLDING

    def tend_capture(self, now: float) -> None:
        """Keep what is captured going to the writer, and live delivery going
        while no writer takes it (see the module's doc). Called once per pass;
        never waits long."""
        writer = self.connections[WRITER]
        if writer.gave_up is not None and self._wrong_peer_seen is None:
            self._wrong_peer_seen = writer.gave_up
            log.warning("capture_wrong_peer", endpoint=self.config.capture_endpoint,
                        reason=writer.gave_up, wrong_peers=writer.wrong_peers,
                        action="holding what is captured; connecting the capture again")
        if self._forwarding() and self._capture_down is None:
            why = self._why_change_course(writer, now)
            if why is not None:
                self._stop_loop_for_capture(why, now)
        if self._loop_capture is self.spill:
            self._take_spilled()
        if self._forwarding():
            if self._loop_capture is self.capture:
                if self._capture_down is not None:
                    self._rescue_blocked_loop(now)
                return
        else:
            self._end_of_loop()
        # From here the main thread owns the capture: the loop, if it runs,
        # sends into the spill.
        if writer.gave_up is not None and writer.redial_due(now):
            writer.redial()
            self._wrong_peer_seen = None
            log.info("capture_redialed", endpoint=self.config.capture_endpoint,
                     redials=writer.redials, held=len(self.held))
        self._send_held(writer, now)
        if self._forwarding() or self._capture_down is None or self._paused_at is not None:
            return  # running, or stopped for something else (the memory guard resumes it)
        if self.held and self._writer_taking(writer, now):
            return  # the writer is taking the last of what is held: straight to it after
        self._capture_down = None
        self._start_forwarding()

    def _writer_taking(self, writer: sockets.Connections, now: float) -> bool:
        """Whether a connected writer is taking what is held, with little of it
        left: the loop may wait (stopped) for it, then capture straight to it."""
        while self._takes and now - self._takes[0][0] >= CAPTURE_TAIL_WAIT_S:
            self._takes.popleft()
        taken = sum(count for _at, count in self._takes)
        # What is left is what the writer took in the last half second, or
        # less: it will be sent in about that time. A writer that takes
        # nothing (or a message now and then) leaves the loop running.
        return writer.handshaken and writer.gave_up is None and \
            len(self.held) <= min(self.config.capture_hwm, taken)

    def _why_change_course(self, writer: sockets.Connections, now: float) -> str | None:
        """Why the running loop must be stopped to capture elsewhere, if it must."""
        if self._loop_capture is self.capture:
            if writer.gave_up is not None:
                return f"a wrong peer at the capture endpoint: {writer.gave_up}"
            if not writer.handshaken:
                return "the writer is gone: holding what is captured"
        elif not self.held and writer.handshaken and writer.gave_up is None \
                or self.held and self._writer_taking(writer, now):
            return "the writer is back: capturing straight to it again"
        return None

    def _stop_loop_for_capture(self, why: str, now: float) -> None:
        self._capture_down = why
        log.info("capture_course", action="stopping the forwarding loop for a moment",
                 reason=why, held=len(self.held))
        counted = self.counters(wait_ms=50)
        if counted is not None:
            self._counted = counted
        self._steer(STEER_TERMINATE, 0)
        self._capture_stop_sent = now

    def _rescue_blocked_loop(self, now: float) -> None:
        """A loop stopped while capturing to the writer may be blocked in a
        capture send that no pipe will take (no writer, or a wrong peer): the
        rescue pipe does, so the loop finishes its burst and reads TERMINATE."""
        if self._rescue is None and now - self._capture_stop_sent >= CAPTURE_RESCUE_AFTER_S:
            self._rescue = self.ctx.socket(zmq.PULL)
            self._rescue.connect(CAPTURE_RESCUE_ENDPOINT)
        self._take_rescued()

    def _end_of_loop(self) -> None:
        """The loop has ended: what it sent into the rescue pipe or the spill
        is read to its end (a pipe delivers up to its end) and held."""
        if self._rescue is not None:
            open_capture = not self.capture.closed  # (closed by the loop at shutdown)
            if open_capture:  # unbound first, so that no send of ours goes there
                self.capture.unbind(CAPTURE_RESCUE_ENDPOINT)
            while self._rescue.poll(10):
                self._take_rescued()
            self._rescue.close(linger=0)
            self._rescue = None
            if open_capture:
                self.capture.bind(CAPTURE_RESCUE_ENDPOINT)
        if self._loop_capture is not None and self._loop_capture is self.spill:
            while self._spill_reader.poll(10):
                self._take_spilled(ending=True)
        self._loop_capture = None

    def _send_held_until(self, deadline: float) -> None:
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
        while self._rescue is not None:
            try:
                self.held.append(self._rescue.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self.rescued_total += 1
        self.held_peak = max(self.held_peak, len(self.held))

    def _take_spilled(self, ending: bool = False) -> None:
        """Hold what the loop spilled, up to capture_hwm_writer_down messages;
        past that the loop waits in its send (live delivery with it), unless
        it is to end, which it must be read from to do."""
        bound = self.config.capture_hwm_writer_down
        for _ in range(CAPTURE_MOVES_PER_PASS):
            if len(self.held) >= bound and not (ending or self._loop_ending):
                break
            try:
                self.held.append(self._spill_reader.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            self.spilled_total += 1
        self.held_peak = max(self.held_peak, len(self.held))

    def _send_held(self, writer: sockets.Connections, now: float) -> None:
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
            self._held_taken_at = now
            self._takes.append((now, sent))

    def _watch_capture_room(self) -> None:
        """Wake the main loop when the capture has room while something is
        held for the writer and the main thread owns the capture, and when the
        spill has something while it may be read (not at the bound: a spill
        left unread would wake the loop at once, for ever)."""
        feeding = bool(self.held) and self.connections[WRITER].handshaken and \
            self._loop_capture is not self.capture
        if feeding != self._feeding:
            if feeding:
                self.poller.register(self.capture, zmq.POLLOUT)
            else:
                self.poller.unregister(self.capture)
            self._feeding = feeding
        reading = self._loop_capture is self.spill and (
            len(self.held) < self.config.capture_hwm_writer_down or self._loop_ending)
        if reading != self._reading_spill:
            if reading:
                self.poller.register(self._spill_reader, zmq.POLLIN)
            else:
                self.poller.unregister(self._spill_reader)
            self._reading_spill = reading

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
            if self._loop_capture is self.spill:  # read, or the loop waits in its send
                self._spill_reader.poll(int(min(0.05, idle) * 1000))
                self._take_spilled()
            else:
                time.sleep(min(0.05, idle))
        log.warning("drain_cut_short", forwarded_frames=seen,
                    drain_window_ms=int(DRAIN_WINDOW_IDLES * self.config.drain_idle_ms))

    def shutdown(self) -> None:
        if self.ctx is None:
            return
        deadline = time.monotonic() + self.config.shutdown_timeout_ms / 1000.0
        thread = self._thread
        if self._forwarding():
            self.drain_before_exit(deadline)
            join_s = 1.0
            self._capture_linger_ms = max(0, int((deadline - time.monotonic() - join_s) * 1000))
            self._paused_at = self._capture_down = None  # the loop's thread closes its sockets
            self._steer(STEER_TERMINATE, 0)
            # Blocked in a capture send to the writer, the loop never reads
            # TERMINATE: the context's termination below ends it (ETERM).
            # Sending into the spill, it is read from until it ends.
            ends = time.monotonic() + join_s
            while thread.is_alive() and time.monotonic() < ends:
                if self._loop_capture is self.spill:
                    self._take_spilled(ending=True)
                thread.join(0.01)
            if not thread.is_alive():  # it may have ended for a pause just before
                self._close_forwarding_sockets(capture_too=False)
        else:  # never started, paused by the memory guard or stopped for the capture
            self._capture_linger_ms = max(0, int((deadline - time.monotonic()) * 1000))
            self._close_forwarding_sockets(capture_too=False)
        if not self._forwarding() and getattr(self, "capture", None) is not None:
            # The capture is this thread's (and was opened: a start that
            # failed before it has nothing to send).
            self._end_of_loop()
            self._send_held_until(deadline)
            self.capture.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
        if self.held:
            log.warning("capture_held_lost", messages=len(self.held),
                        reason="the writer did not take them before the shutdown deadline; "
                               "publishers with acknowledgements send theirs again")
        for connections in getattr(self, "connections", {}).values():
            connections.close()
        for name in ("control", "steer", "_rescue", "spill", "_spill_reader"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        self.ctx.term()
        self.ctx = None
