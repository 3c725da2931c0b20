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

Counters come from libzmq's STATISTICS command; libzmq counts frames (message
parts), not messages, so they are reported as frames.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import zmq

from bus import protocol, security, sockets
from bus.config import DRAIN_WINDOW_IDLES, BusConfig
from bus.logging import RateLimitedLog, get_logger
from bus.runner import StopSignal

log = get_logger("proxy")

# How long `stats` waits for the forwarding loop's counters. The loop is busy
# or blocked (e.g. the capture queue is full while the writer is down) when it
# does not answer in time: `stats` then answers `busy`.
STATISTICS_WAIT_MS = 2000

_STAT_NAMES = (
    "frontend_frames_in", "frontend_bytes_in", "frontend_frames_out", "frontend_bytes_out",
    "backend_frames_in", "backend_bytes_in", "backend_frames_out", "backend_bytes_out",
)


class Proxy:
    name = "proxy"

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.ctx: zmq.Context | None = None
        self._thread: threading.Thread | None = None
        self._proxy_error: BaseException | None = None
        self._statistics_pending = False  # a STATISTICS the loop has not answered yet
        self._capture_linger_ms = 0       # set by shutdown, used by the loop's thread
        self._bad_requests = 0
        self._internal_errors = 0
        self._started = time.monotonic()
        self._rejects = RateLimitedLog(log)

    def initialize(self, stop: StopSignal) -> None:
        cfg = self.config
        self.stop = stop
        self.ctx = zmq.Context()
        self.auth = security.start_authenticator(self.ctx, cfg)
        self.frontend = sockets.open_proxy_frontend(self.ctx, cfg)
        self.backend = sockets.open_proxy_backend(self.ctx, cfg)
        self.capture = sockets.open_proxy_capture(self.ctx, cfg)
        self.control = sockets.open_proxy_control(self.ctx, cfg)
        self.steer = self.ctx.socket(zmq.PAIR)
        self.steer.bind(sockets.PROXY_STEERING_ENDPOINT)
        steered = self.ctx.socket(zmq.PAIR)
        steered.connect(sockets.PROXY_STEERING_ENDPOINT)
        self._steered = steered
        self._thread = threading.Thread(target=self._run_proxy, name="zmq-proxy", daemon=True)
        self._thread.start()
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(stop.fileno(), zmq.POLLIN)
        log.info("started", pub_endpoint=cfg.pub_endpoint, sub_endpoint=cfg.sub_endpoint,
                 capture_endpoint=cfg.capture_endpoint,
                 control_endpoint=cfg.proxy_control_endpoint, capture_hwm=cfg.capture_hwm,
                 config_source=cfg.source, config=cfg.public())

    def _run_proxy(self) -> None:
        """The forwarding loop's thread. Its sockets are closed here, where they
        are used: at shutdown the loop may be blocked in a capture send (writer
        down, queue full) and only the context's termination (ETERM) frees it."""
        try:
            zmq.proxy_steerable(self.frontend, self.backend, self.capture, self._steered)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                self._proxy_error = exc
        except BaseException as exc:  # reported by the main loop, which exits non-zero
            self._proxy_error = exc
        finally:
            for sock in (self.frontend, self.backend, self._steered):
                sock.close(linger=0)
            # Queued captures still reach the writer within the shutdown deadline.
            self.capture.close(linger=self._capture_linger_ms)

    def loop(self, now: float | None = None) -> None:
        events = dict(self.poller.poll(1000))
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError(f"proxy loop ended: {self._proxy_error!r}")
        if self.stop.fileno() in events:
            self.stop.clear_wakeup()
        if self.control in events:
            self.handle_control(self.control.recv_multipart())

    def handle_control(self, frames: list[bytes]) -> None:
        request_id: Any = None
        try:
            request_id, cmd, _args = protocol.decode_request(frames)
            if cmd == "stats":
                stats = self.read_stats()
                reply = protocol.encode_reply_error(
                    request_id, protocol.BUSY,
                    f"the forwarding loop did not answer within {STATISTICS_WAIT_MS} ms: it is "
                    "busy or blocked (a full capture queue while the writer is down?); retry"
                ) if stats is None else protocol.encode_reply_ok(request_id, stats)
            elif cmd == "ping":
                reply = protocol.encode_reply_ok(request_id, "pong")
            else:
                reply = protocol.encode_reply_error(request_id, "unknown_command",
                                                    f"no command {cmd!r}")
        except protocol.ProtocolError as exc:
            self._bad_requests += 1
            request_id = getattr(exc, "request_id", request_id)
            self._rejects.warning(exc.reason, "bad_control_request", detail=exc.detail)
            reply = protocol.encode_reply_error(request_id, exc.reason, str(exc))
        except Exception as exc:  # a bug must cost one request, not the proxy
            self._internal_errors += 1
            self._rejects.error(protocol.INTERNAL_ERROR, "control_request_failed",
                                exc_info=True)
            reply = protocol.internal_error_reply(request_id, exc)
        self.control.send(reply)

    def counters(self, wait_ms: int = STATISTICS_WAIT_MS) -> dict[str, int] | None:
        """libzmq's frame and byte counters of the running proxy loop, or None
        if it does not answer within `wait_ms`. The unanswered command's reply
        comes later, and is read and dropped before the next command is sent."""
        if self._statistics_pending:
            if not self.steer.poll(0):
                return None
            self.steer.recv_multipart()
            self._statistics_pending = False
        self.steer.send(b"STATISTICS")
        if not self.steer.poll(wait_ms):
            self._statistics_pending = True
            return None
        values = [struct.unpack("=Q", part)[0] for part in self.steer.recv_multipart()]
        return dict(zip(_STAT_NAMES, values))

    def read_stats(self) -> dict[str, Any] | None:
        stats: dict[str, Any] | None = self.counters()
        if stats is None:
            return None
        stats.update(uptime_seconds=round(time.monotonic() - self._started, 3),
                     bad_control_requests=self._bad_requests,
                     internal_errors=self._internal_errors,
                     security=security.snapshot(self.config),
                     capture_hwm=self.config.capture_hwm,
                     endpoints={"pub": self.config.pub_endpoint, "sub": self.config.sub_endpoint,
                                "capture": self.config.capture_endpoint})
        return stats

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
            time.sleep(min(0.05, idle))
        log.warning("drain_cut_short", forwarded_frames=seen,
                    drain_window_ms=int(DRAIN_WINDOW_IDLES * self.config.drain_idle_ms))

    def shutdown(self) -> None:
        if self.ctx is None:
            return
        deadline = time.monotonic() + self.config.shutdown_timeout_ms / 1000.0
        thread = self._thread
        if thread is not None and thread.is_alive():
            self.drain_before_exit(deadline)
            join_s = 1.0
            self._capture_linger_ms = max(0, int((deadline - time.monotonic() - join_s) * 1000))
            self.steer.send(b"TERMINATE")
            # Blocked in a capture send, the loop never reads TERMINATE: the
            # context's termination below ends it (ETERM).
            thread.join(join_s)
        elif thread is None:  # never started: its sockets are closed here
            for name in ("frontend", "backend", "_steered", "capture"):
                sock = getattr(self, name, None)
                if sock is not None:
                    sock.close(linger=0)
        for name in ("control", "steer"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
        self.ctx.term()
        self.ctx = None
