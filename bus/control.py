"""One control surface for every process: the REQ/REP envelope, a command
table, errors with codes, and the counters each process reports
(docs/protocol.md, "Control requests").

A process builds one `Dispatcher` with its commands (name -> handler), polls
its REP socket and hands each request's frames to `handle`, which always
returns exactly one reply frame: a request of the wrong shape, a command the
client's key may not run, a handler that refuses (`CommandFailed`) and a bug in
a handler (`internal_error`, logged with its traceback) are all answered,
counted and never cost the process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from bus import protocol, security
from bus.config import BusConfig
from bus.logging import RateLimitedLog


@dataclass(frozen=True, slots=True)
class Request:
    id: Any
    cmd: str
    args: dict[str, Any]
    user: str | None = None  # the CURVE key that sent it; None with CURVE off


class CommandFailed(Exception):
    """A command that was understood but not done: answered with `code`.
    `bad_input` counts it with the bad requests (the client's fault)."""

    def __init__(self, code: str, reason: str, *, bad_input: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.bad_input = bad_input


Handler = Callable[[Request], Any]


@dataclass
class ControlCounters:
    requests: int = 0
    bad_requests: int = 0
    forbidden: int = 0
    internal_errors: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # by code

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "bad_requests": self.bad_requests,
                "forbidden": self.forbidden, "internal_errors": self.internal_errors,
                "failed": dict(self.failed)}


class Dispatcher:
    """Decode, authorize, run, answer. `authorized` limits which commands a
    CURVE key may run (the writer's: security.authorize); the other
    processes name their endpoint's ZAP `domain` instead, and a request from
    a key no longer in any of its lists (revoked while connected) is
    refused. `admit` may refuse a request before it runs (the writer's
    quotas: raise CommandFailed), and `admit_bytes(user, size)` one before it
    is even decoded (a large request's decoding is what costs: raise
    CommandFailed). `retryable`: errors that a retry may get
    past (a database that is busy or reconnecting), answered UNAVAILABLE
    rather than as a bug."""

    def __init__(self, commands: dict[str, Handler], log: Any, config: BusConfig | None = None,
                 authorized: bool = False,
                 retryable: tuple[type[Exception], ...] = (), domain: str | None = None,
                 admit: Handler | None = None,
                 admit_bytes: Callable[[str | None, int], None] | None = None) -> None:
        self.commands: dict[str, Handler] = {"ping": lambda _request: "pong", **commands}
        self.config = config
        self.authorized = authorized
        self.retryable = retryable
        self.domain = domain
        self.admit = admit
        self.admit_bytes = admit_bytes
        self.counters = ControlCounters()
        self._log = RateLimitedLog(log)

    def serve(self, sock: zmq.Socket) -> None:
        """Answer the one request waiting on a REP socket."""
        frames = sock.recv_multipart(copy=False)
        sock.send(self.handle([frame.bytes for frame in frames], security.user_id(frames)))

    def handle(self, frames: list[bytes], user: str | None = None) -> bytes:
        counters = self.counters
        counters.requests += 1
        request_id: Any = None
        try:
            if self.admit_bytes is not None:
                try:
                    self.admit_bytes(user, sum(len(frame) for frame in frames))
                except CommandFailed:
                    request_id = protocol.request_id_of(frames)
                    raise
            request_id, cmd, args = protocol.decode_request(frames)
            handler = self.commands.get(cmd)
            if handler is None:
                raise protocol.RequestError(request_id, protocol.UNKNOWN_COMMAND,
                                            f"no command {cmd!r}; this process has "
                                            f"{', '.join(sorted(self.commands))}")
            if self.config is not None:
                refusal = security.authorize(self.config, user, cmd) if self.authorized else \
                    security.admitted(self.config, self.domain, user) if self.domain else None
                if refusal is not None:
                    raise protocol.RequestError(request_id, protocol.FORBIDDEN, refusal)
            request = Request(request_id, cmd, args, user)
            if self.admit is not None:
                self.admit(request)
            return protocol.encode_reply_ok(request_id, handler(request))
        except protocol.ProtocolError as exc:
            request_id = getattr(exc, "request_id", request_id)
            if exc.reason == protocol.FORBIDDEN:
                counters.forbidden += 1
                self._log.warning(protocol.FORBIDDEN, "command_forbidden", detail=exc.detail,
                                  client_key=user)
            else:
                counters.bad_requests += 1
                self._log.warning(exc.reason, "bad_control_request", detail=exc.detail)
            return protocol.encode_reply_error(request_id, exc.reason, str(exc))
        except CommandFailed as exc:
            if exc.code == protocol.FORBIDDEN:
                counters.forbidden += 1
                self._log.warning(protocol.FORBIDDEN, "command_forbidden", detail=exc.reason,
                                  client_key=user)
            elif exc.bad_input:
                counters.bad_requests += 1
                self._log.warning(exc.code, "bad_control_request", detail=exc.reason)
            else:
                counters.failed[exc.code] = counters.failed.get(exc.code, 0) + 1
            return protocol.encode_reply_error(request_id, exc.code, exc.reason)
        except Exception as exc:  # a bug must cost one request, not the process
            if isinstance(exc, self.retryable):
                counters.failed[protocol.UNAVAILABLE] = \
                    counters.failed.get(protocol.UNAVAILABLE, 0) + 1
                self._log.warning(protocol.UNAVAILABLE, "control_request_unavailable",
                                  error=str(exc), error_type=type(exc).__name__)
                return protocol.encode_reply_error(request_id, protocol.UNAVAILABLE,
                                                   f"{type(exc).__name__}: {exc}; retry")
            counters.internal_errors += 1
            self._log.error(protocol.INTERNAL_ERROR, "control_request_failed", exc_info=True)
            return protocol.internal_error_reply(request_id, exc)
