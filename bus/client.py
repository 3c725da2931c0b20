"""Client library: Publisher, Subscriber and ControlClient.

Publisher connects an XPUB to the proxy's XSUB and waits for the proxy's
upstream subscription before its first message, so the first message published
right after connecting is not dropped (ZeroMQ's slow joiner). Each message
carries meta with the producer id, a sequence starting at 1, and the publish
time. Subscriber is a SUB on the proxy's XPUB. ControlClient speaks the
request/reply control protocol with a timeout, closing and reopening its REQ
socket after a timeout (the ZeroMQ Guide's Lazy Pirate).
"""

from __future__ import annotations

import itertools
import os
import socket as _socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack
import zmq

from bus import protocol, sockets
from bus.config import BusConfig, load_config, with_overrides
from bus.protocol import Message

__all__ = ["BusError", "BusTimeout", "ControlClient", "Message", "Publisher", "Subscriber"]


class BusError(Exception):
    """The bus answered with an error, or could not be reached."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class BusTimeout(BusError):
    """No answer within the timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "timeout")


def default_producer_id() -> str:
    return f"{_socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Publisher:
    """Publishes data messages through the proxy, and learns what was stored.

    `connect()` (or entering the context manager) blocks until the proxy has
    subscribed to this publisher and to its acknowledgement topic, or raises
    BusTimeout. `publish()` blocks while the queue to the proxy is full
    (backpressure) up to `send_timeout` seconds, then raises.

    Every message is kept until the writer acknowledges it (`$bus.ack.<producer>`
    carries the highest sequence up to which everything is stored). `flush()`
    waits for that, re-sending what is still unacknowledged when
    acknowledgements stop for `resend_after` seconds (then 2x, 4x, ... up to
    30 s), with the same sequence numbers: the writer stores each (producer,
    seq) once. `publish(..., wait=True)` is publish + flush. At most
    `max_unacked` messages are kept: past that, `publish` waits for
    acknowledgements first (up to `send_timeout`, like a full socket).
    `close()` does not wait for acknowledgements; it waits up to `linger_ms`
    for queued messages to leave.
    """

    def __init__(self, config: BusConfig | None = None, *, endpoint: str | None = None,
                 producer_id: str | None = None, context: zmq.Context | None = None,
                 connect_timeout: float | None = None, send_timeout: float | None = None,
                 linger_ms: int = 5000, resend_after: float = 1.0,
                 max_unacked: int = 100_000) -> None:
        config = config or load_config()
        if endpoint:
            config = with_overrides(config, pub_endpoint=endpoint)
        self.config = config
        self.producer_id = producer_id or default_producer_id()
        self.connect_timeout = (config.request_timeout_ms / 1000.0
                                if connect_timeout is None else connect_timeout)
        self.send_timeout = send_timeout
        self.linger_ms = linger_ms
        self.resend_after = resend_after
        self.max_unacked = max_unacked
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._acks: zmq.Socket | None = None
        self._seq = itertools.count(1)
        self.last_seq = 0
        self.acked_seq = 0      # every message up to this one is stored
        self.resent = 0
        # (seq, frames) in seq order, oldest first: acknowledgements pop from the left.
        self._unacked: deque[tuple[int, tuple[bytes, bytes, bytes]]] = deque()
        self._topics: dict[str, bytes] = {}  # validated topic -> frame
        self._meta = protocol.MetaEncoder(self.producer_id)
        self._ack_topic = protocol.ack_topic(self.producer_id)

    def connect(self) -> Publisher:
        if self._sock is not None:
            return self
        sock = sockets.open_publisher(self._ctx, self.config, self.linger_ms)
        if self.send_timeout is not None:
            sock.setsockopt(zmq.SNDTIMEO, int(self.send_timeout * 1000))
        self._sock = sock
        self._acks = sockets.open_subscriber(self._ctx, self.config, [self._ack_topic])
        # The proxy passes every subscription on to every publisher: seeing our own
        # acknowledgement subscription arrive means acknowledgements will reach us.
        proxy_ready, acks_ready = b"\x01", b"\x01" + self._ack_topic
        waiting_for = {proxy_ready, acks_ready}
        deadline = time.monotonic() + self.connect_timeout
        while waiting_for:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                self.close(linger_ms=0)
                if proxy_ready in waiting_for:
                    raise BusTimeout(f"proxy at {self.config.pub_endpoint} did not subscribe "
                                     f"within {self.connect_timeout:g}s (is bus-proxy running?)")
                raise BusTimeout(f"the proxy at {self.config.pub_endpoint} answered, but this "
                                 "publisher's acknowledgement subscription through "
                                 f"{self.config.sub_endpoint} did not reach it within "
                                 f"{self.connect_timeout:g}s (is BUS_SUB_ENDPOINT the same "
                                 "proxy's?)")
            waiting_for.discard(sock.recv())
        return self

    def publish(self, topic: str, payload: bytes | str, *, content_type: str | None = None,
                headers: dict[str, str] | None = None, wait: bool = False,
                timeout: float | None = None) -> int:
        """Send one message; returns its sequence number.

        wait=True returns only once the writer has committed it (see flush).
        Raises protocol.ProtocolError (a ValueError) for a topic the writer
        would not store, before anything is sent.
        """
        if self._sock is None:
            self.connect()
        topic_frame = self._topics.get(topic)
        if topic_frame is None:
            topic_frame = protocol.encode_topic(topic, self.config.max_topic_bytes)
            if len(self._topics) >= 1024:  # bounded: publishers with endless topics
                self._topics.clear()
            self._topics[topic] = topic_frame
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
            content_type = content_type or protocol.CONTENT_TEXT
        if len(topic_frame) + len(payload) > self.config.max_message_bytes:
            raise protocol.ProtocolError(protocol.MESSAGE_TOO_LARGE,
                                         f"payload of {len(payload)} bytes")
        if len(self._unacked) >= self.max_unacked:  # backpressure, like a full socket
            self._wait_acked(self.max_unacked // 2, self.send_timeout)
        seq = next(self._seq)
        frames = (topic_frame, payload, self._meta.encode(seq, content_type=content_type,
                                                          headers=headers))
        self._send(frames)
        self._unacked.append((seq, frames))
        self.last_seq = seq
        if wait:
            self.flush(timeout)
        elif seq & 0xFF == 0:
            self._read_acks(0)  # now and then, so the unacknowledged set stays small
        return seq

    def _send(self, frames: tuple[bytes, bytes, bytes]) -> None:
        send = self._sock.send
        try:
            # Three sends, not send_multipart: a third of the CPU per message here.
            # libzmq checks the high-water mark on the first part only, so a
            # message is never left half-sent.
            send(frames[0], zmq.SNDMORE)
            send(frames[1], zmq.SNDMORE)
            send(frames[2])
        except zmq.Again:
            raise BusTimeout(f"publish blocked for {self.send_timeout}s: the proxy is not "
                             "reading (queue full)") from None

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def flush(self, timeout: float | None = None) -> None:
        """Return once every message published so far is committed, re-sending
        the unacknowledged ones when acknowledgements stop (see _wait_acked).
        Raises BusTimeout after `timeout` seconds (default BUS_REQUEST_TIMEOUT_MS);
        nothing is dropped then, a later flush() continues."""
        self._wait_acked(0, self.config.request_timeout_ms / 1000.0 if timeout is None
                         else timeout)

    def _wait_acked(self, at_most: int, timeout: float | None) -> None:
        """Read acknowledgements until at most `at_most` messages are unacknowledged,
        re-sending them when none arrive: after `resend_after` seconds, then
        doubling up to 30 s while there is still no progress, so that a writer
        that is down is not buried under copies. timeout None: no limit."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        interval = self.resend_after
        resend_at = started + interval
        while len(self._unacked) > at_most:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise BusTimeout(f"{len(self._unacked)} messages not acknowledged within "
                                 f"{timeout:g}s (is bus-writer running?)")
            if now >= resend_at:
                for _seq, frames in list(self._unacked):
                    self._send(frames)
                self.resent += len(self._unacked)
                interval = min(interval * 2, 30.0)
                resend_at = now + interval
            before = len(self._unacked)
            self._read_acks(min(resend_at, deadline or resend_at) - now)
            if len(self._unacked) < before:  # progress: start the re-send clock again
                interval = self.resend_after
                resend_at = time.monotonic() + interval

    def _read_acks(self, wait: float) -> None:
        """Apply the acknowledgements that arrive within `wait` seconds."""
        acks = self._acks
        if acks is None or not acks.poll(max(0, int(wait * 1000))):
            return
        while True:
            try:
                frames = acks.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[0] != self._ack_topic:
                continue  # another producer whose id starts with ours (prefix match)
            try:
                ack = msgpack.unpackb(frames[1])
                acked = int(ack["contiguous_seq"])
            except Exception:
                continue  # not an acknowledgement we understand
            if acked > self.acked_seq:
                self.acked_seq = acked
        unacked = self._unacked
        while unacked and unacked[0][0] <= self.acked_seq:
            unacked.popleft()
        # Subscription notices pile up on the XPUB when nobody reads them.
        while self._sock.poll(0):
            self._sock.recv()

    def close(self, linger_ms: int | None = None) -> None:
        if self._sock is not None:
            self._sock.close(linger=self.linger_ms if linger_ms is None else linger_ms)
            self._sock = None
        if self._acks is not None:
            self._acks.close(linger=0)
            self._acks = None
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> Publisher:
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Subscriber:
    """Receives data messages whose topic starts with one of `prefixes`.

    Topics starting with "$" (the bus's own) are delivered only to a prefix
    that itself starts with "$". Malformed messages are skipped and counted in
    `invalid`.
    """

    def __init__(self, prefixes: Iterable[str] = ("",), config: BusConfig | None = None, *,
                 endpoint: str | None = None, context: zmq.Context | None = None) -> None:
        config = config or load_config()
        if endpoint:
            config = with_overrides(config, sub_endpoint=endpoint)
        self.config = config
        self.prefixes = list(prefixes) or [""]
        self._wants_reserved = any(p.startswith(protocol.RESERVED_PREFIX) for p in self.prefixes)
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock = sockets.open_subscriber(self._ctx, config,
                                             [p.encode("utf-8") for p in self.prefixes])
        self.invalid = 0

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, or None if none arrives within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1):
                    return None
            frames = self._sock.recv_multipart()
            try:
                msg = protocol.parse_message(frames)
            except protocol.ProtocolError:
                self.invalid += 1
                continue
            if protocol.is_reserved(msg.topic) and not self._wants_reserved:
                continue
            return msg

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.receive()
            if msg is not None:
                yield msg

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ControlClient:
    """Request/reply with a bus process's control endpoint.

    `request()` returns the reply's result, raises BusError(code) on an error
    reply and BusTimeout when no reply came after `retries` + 1 attempts.
    """

    def __init__(self, endpoint: str, timeout_ms: int = 3000, retries: int = 0,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.retries = retries
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)

    def request(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        request_id = f"{os.getpid()}-{next(self._ids)}"
        raw = protocol.encode_request(request_id, cmd, args)
        for _attempt in range(self.retries + 1):
            if self._sock is None:
                self._sock = sockets.open_request(self._ctx, self.endpoint)
            self._sock.send(raw)
            if self._sock.poll(self.timeout_ms):
                reply = protocol.decode_reply(self._sock.recv())
                if reply.get("id") != request_id:
                    raise BusError(f"reply id {reply.get('id')!r} does not match {request_id!r}",
                                   "bad_reply")
                if reply["ok"]:
                    return reply.get("result")
                error = reply.get("error") or {}
                raise BusError(f"{cmd}: {error.get('reason', 'error')}", error.get("code", "error"))
            # A REQ socket without its reply is stuck; only a new socket can send again.
            self._sock.close(linger=0)
            self._sock = None
        raise BusTimeout(f"no reply to {cmd!r} from {self.endpoint} within "
                         f"{self.timeout_ms} ms (is the process running?)")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
