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
from collections.abc import Iterable, Iterator
from typing import Any

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
    """Publishes data messages through the proxy.

    `connect()` (or entering the context manager) blocks until the proxy has
    subscribed, or raises BusTimeout. `publish()` blocks while the queue to the
    proxy is full (backpressure) up to `send_timeout` seconds, then raises.
    `close()` waits up to `linger_ms` for queued messages to leave.
    """

    def __init__(self, config: BusConfig | None = None, *, endpoint: str | None = None,
                 producer_id: str | None = None, context: zmq.Context | None = None,
                 connect_timeout: float | None = None, send_timeout: float | None = None,
                 linger_ms: int = 5000) -> None:
        config = config or load_config()
        if endpoint:
            config = with_overrides(config, pub_endpoint=endpoint)
        self.config = config
        self.producer_id = producer_id or default_producer_id()
        self.connect_timeout = (config.request_timeout_ms / 1000.0
                                if connect_timeout is None else connect_timeout)
        self.send_timeout = send_timeout
        self.linger_ms = linger_ms
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._seq = itertools.count(1)
        self.last_seq = 0
        self._topics: dict[str, bytes] = {}  # validated topic -> frame
        self._meta = protocol.MetaEncoder(self.producer_id)

    def connect(self) -> Publisher:
        if self._sock is not None:
            return self
        sock = sockets.open_publisher(self._ctx, self.config, self.linger_ms)
        if self.send_timeout is not None:
            sock.setsockopt(zmq.SNDTIMEO, int(self.send_timeout * 1000))
        self._sock = sock
        deadline = time.monotonic() + self.connect_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                self.close(linger_ms=0)
                raise BusTimeout(f"proxy at {self.config.pub_endpoint} did not subscribe "
                                 f"within {self.connect_timeout:g}s (is bus-proxy running?)")
            frame = sock.recv()
            if frame[:1] == b"\x01":
                return self

    def publish(self, topic: str, payload: bytes | str, *, content_type: str | None = None,
                headers: dict[str, str] | None = None) -> int:
        """Send one message; returns its sequence number.

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
        seq = next(self._seq)
        meta = self._meta.encode(seq, content_type=content_type, headers=headers)
        send = self._sock.send
        try:
            # Three sends, not send_multipart: a third of the CPU per message here.
            # libzmq checks the high-water mark on the first part only, so a
            # message is never left half-sent.
            send(topic_frame, zmq.SNDMORE)
            send(payload, zmq.SNDMORE)
            send(meta)
        except zmq.Again:
            raise BusTimeout(f"publish blocked for {self.send_timeout}s: the proxy is not "
                             "reading (queue full)") from None
        self.last_seq = seq
        return seq

    def close(self, linger_ms: int | None = None) -> None:
        if self._sock is not None:
            self._sock.close(linger=self.linger_ms if linger_ms is None else linger_ms)
            self._sock = None
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
