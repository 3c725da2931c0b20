"""ControlClient: request/reply with a bus process's control endpoint, with a
timeout, closing and reopening its REQ socket after one (the ZeroMQ Guide's
Lazy Pirate), and connecting it again when libzmq gave up on a wrong peer at
the endpoint (bus/sockets.PeerWatch)."""

from __future__ import annotations

import itertools
import os
from typing import Any

import zmq

from bus import protocol, security, sockets
from bus.client.errors import BusError, BusTimeout


class ControlClient:
    """Request/reply with a bus process's control endpoint.

    `request()` returns the reply's result, raises BusError(code) on an error
    reply and BusTimeout when no reply came after `retries` + 1 attempts.
    """

    def __init__(self, endpoint: str, timeout_ms: int = 3000, retries: int = 0,
                 context: zmq.Context | None = None,
                 curve: security.ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.timeout_ms = timeout_ms
        self.retries = retries
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._pending: tuple[str, str] | None = None
        self._watch = sockets.PeerWatch(endpoint)

    def request(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        for attempt in range(self.retries + 1):
            try:
                self.send(cmd, args)
                return self.result()
            except BusTimeout:
                if attempt == self.retries:
                    raise
        raise AssertionError("unreachable")

    def send(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        """Send a request without waiting: `result()` collects the reply, so a
        caller can work while the other process answers (one request at a time)."""
        request_id = f"{os.getpid()}-{next(self._ids)}"
        if self._pending is not None and self._sock is not None:
            self._sock.close(linger=0)  # an uncollected reply: drop it with its socket
            self._sock = None
        self._send(protocol.encode_request(request_id, cmd, args))
        self._pending = (request_id, cmd)

    def _send(self, request: bytes) -> None:
        """On a socket whose endpoint libzmq has not given up on: a REQ whose
        only connection failed its handshake (a wrong peer at the endpoint)
        has no live pipe, and its send would block for ever or go nowhere; a
        new socket connects again, and has a pipe from its connect on."""
        if self._sock is not None:
            if not self._watch.gave_up():
                try:
                    self._sock.send(request, zmq.NOBLOCK)
                    return
                except zmq.Again:
                    pass
            self._sock.close(linger=0)
        self._sock = sockets.open_request(self._ctx, self.endpoint, self.curve,
                                          self._watch.attach)
        # Connected to several (the writers of a standby pair), a request
        # waits for a connection that is made (sockets.connect): for
        # timeout_ms at most, as for its reply.
        if not self._sock.poll(self.timeout_ms, zmq.POLLOUT):
            self._sock.close(linger=0)
            self._sock = None
            raise BusTimeout(f"none of {self.endpoint} answered within {self.timeout_ms} ms "
                             "(is a writer running there?)")
        self._sock.send(request)

    def result(self) -> Any:
        """The reply to the request sent last; BusTimeout after timeout_ms."""
        request_id, cmd = self._pending
        self._pending = None
        if not self._sock.poll(self.timeout_ms):
            # A REQ socket without its reply is stuck; only a new socket can send again.
            self._sock.close(linger=0)
            self._sock = None
            raise BusTimeout(f"no reply to {cmd!r} from {self.endpoint} within "
                             f"{self.timeout_ms} ms (is the process running?"
                             + (" With CURVE: is this key in a list that endpoint lets in?"
                                if self.curve is not None else "") + ")")
        try:  # whoever bound the endpoint wrote it: a BusError, whatever it holds
            reply = protocol.decode_reply(self._sock.recv())
        except protocol.ProtocolError as exc:
            raise BusError(f"{cmd}: {exc.detail} from {self.endpoint}", "bad_reply") from None
        if reply.get("id") != request_id:
            raise BusError(f"reply id {reply.get('id')!r} does not match {request_id!r}",
                           "bad_reply")
        if reply["ok"]:
            return reply.get("result")
        error = reply.get("error")
        error = error if isinstance(error, dict) else {}
        code = error.get("code")
        raise BusError(f"{cmd}: {error.get('reason', 'error')}",
                       code if isinstance(code, str) else "error")

    @property
    def waiting(self) -> bool:
        """A request was sent and its reply not yet collected."""
        return self._pending is not None

    def close(self) -> None:
        self._watch.close()
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
