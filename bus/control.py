"""One control surface for every process: the REQ envelope, a command
table, errors with codes, and the counters each process reports
(docs/protocol.md, "Control requests").

A process declares each of its commands once, as a `Command` (name, handler,
arguments, who may run it, the error codes it answers, whether it takes a
request id and replays its reply, whether it runs in one transaction), builds
one `Dispatcher` over that table, polls its control ROUTER socket and has
`serve` hand each request's frames to `handle`, which always returns exactly one reply frame: a
request of the wrong shape, a command the client's key may not run, a handler
that refuses (`CommandFailed`, the one error type of every command) and a bug
in a handler (`internal_error`, logged with its traceback) are all answered,
counted and never cost the process. docs/protocol.md's command tables are
checked against these tables (tests/test_docs.py).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from bus import protocol, security
from bus.build import build_info
from bus.config import SETTINGS, BusConfig, role_fields
from bus.logging import RateLimitedLog
from bus.runner import CannotGoOn

# Frames before a request's empty delimiter: a REQ's envelope is its routing
# id alone (the ROUTER adds it), and each ROUTER-DEALER broker on the way
# adds one more.
MAX_ENVELOPE_FRAMES = 16


@dataclass(frozen=True, slots=True)
class Request:
    id: Any
    cmd: str
    args: dict[str, Any]
    user: str | None = None  # the CURVE key that sent it; None with CURVE off


class CommandFailed(Exception):
    """A command that was understood but not done: answered with `code` (a
    bus/protocol.py constant). `bad_input` counts it with the bad requests (the
    client's fault): by default, a `bad_request` is."""

    def __init__(self, code: str, reason: str, *, bad_input: bool | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.bad_input = code == protocol.BAD_REQUEST if bad_input is None else bad_input


Handler = Callable[[Request], Any]
# A command that runs in one transaction is handed its arguments and the time
# the transaction started (ns since the epoch), by its process's TransactionRunner.
TransactionHandler = Callable[[dict[str, Any], int], Any]


@dataclass(frozen=True)
class Command:
    """One control command, declared once: the process's table is what the
    Dispatcher runs, what bus/security.authorize reads who may run it from,
    and what tests/test_docs.py checks docs/protocol.md against.

    `roles`: the key lists (security.PUBLISHERS, security.READERS) whose keys
    may run it besides the admins', who may run every command (with CURVE;
    a process that admits keys by endpoint, `domain`, lets in each key its
    endpoint lets in). `args`: the names of its arguments, as documented.
    `errors`: the codes its handler answers besides those of every command
    (bad_request for a malformed request, unknown_command, forbidden,
    internal_error; the writer's quota_exceeded). `request_id`: None, it takes
    none; False, optional; True, required; with one, its reply is stored with
    its change and a retry with the same id gets that reply. `transaction`:
    it runs in one database transaction, committed before the reply (its
    handler is then a TransactionHandler, run by the process's runner)."""

    name: str
    handler: Handler | TransactionHandler
    roles: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    request_id: bool | None = None
    transaction: bool = False

    def __post_init__(self) -> None:
        if self.request_id is not None and not self.transaction:
            raise ValueError(f"{self.name}: a reply is stored with its change, in the "
                             "command's transaction: request_id needs transaction=True")

    @property
    def codes(self) -> frozenset[str]:
        """The codes this command may answer beside those of every command."""
        implied = set()
        if self.args or self.request_id is not None:
            implied.add(protocol.BAD_REQUEST)
        if self.request_id is not None:
            implied.add(protocol.REQUEST_ID_REUSED)
        if self.transaction:
            implied.add(protocol.UNAVAILABLE)
        return frozenset({*self.errors, *implied})


# A TransactionRunner runs a `transaction` command: (command, request) -> result.
TransactionRunner = Callable[[Command, Request], Any]


@dataclass(frozen=True)
class CommandTable:
    """A process's commands (`ping` is every process's), and the runner of
    those that run in one transaction (the writer's: writer/commands.py)."""

    commands: tuple[Command, ...]
    transactions: TransactionRunner | None = None

    def __post_init__(self) -> None:
        names = [command.name for command in self.commands]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"commands declared twice: {', '.join(duplicates)}")
        if self.transactions is None and any(c.transaction for c in self.commands):
            raise ValueError("a command runs in a transaction: the table needs a runner")

    def __iter__(self) -> Iterator[Command]:
        return iter(self.commands)

    def get(self, name: str) -> Command | None:
        return next((command for command in self.commands if command.name == name), None)


def ping(roles: Iterable[str], process: str, started_ns: int) -> Command:
    """`ping`: "pong", or with `about`, which process this is and what it is
    built from (bus/build.py): an old process answers "pong" to both."""
    def answer(request: Request) -> Any:
        if request.args.get("about") is not True:
            return "pong"
        return {"pong": True, "process": process, "pid": os.getpid(),
                "started_ns": started_ns, **build_info()}
    return Command("ping", answer, roles=tuple(roles), args=("about",))


def running_config(roles: Iterable[str], process: str, config: BusConfig | None) -> Command:
    """`config`: the settings this process runs with, each with where it came
    from (`bus-cli config --running`); secrets as "***" (BusConfig.public)."""
    fields = set(role_fields(process))

    def answer(_request: Request) -> dict[str, Any]:
        if config is None:  # a dispatcher made without settings (tests)
            return {"process": process, "source": "", "settings": {}}
        public = config.public()
        return {"process": process, "source": config.source,
                "settings": {s.env: {"value": public[s.env],
                                     "from": config.origins.get(s.field, "default")}
                             for s in SETTINGS if s.field in fields}}
    return Command("config", answer, roles=tuple(roles))


# The process behind each control endpoint, by its ZAP domain (the writer's
# authorizes per command and names none).
PROCESS_OF_DOMAIN = {None: "writer", "read": "reader", "proxy_control": "proxy",
                     "anchor_control": "anchor"}


# --- argument checks: each refusal a bad_request, the client's fault ---------

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def check_int(args: dict[str, Any], key: str, low: int, high: int, default: Any = ...) -> int:
    """args[key], an integer in low..high (not a bool); `default` if absent and given."""
    value = args.get(key, default)
    if value is ...:
        raise CommandFailed(protocol.BAD_REQUEST, f"missing '{key}'")
    if type(value) is not int or not low <= value <= high:
        raise CommandFailed(protocol.BAD_REQUEST, f"'{key}' must be an integer in {low}..{high}")
    return value


def check_str(args: dict[str, Any], key: str, required: bool = True,
              max_len: int = 128) -> str | None:
    """args[key], a printable string of 1-max_len characters (None if absent
    and not required)."""
    value = args.get(key)
    if value is None and not required:
        return None
    if not (isinstance(value, str) and 0 < len(value) <= max_len and value.isprintable()):
        raise CommandFailed(protocol.BAD_REQUEST,
                            f"'{key}' must be a printable string of 1-{max_len} chars")
    return value


def check_txid(value: Any, key: str = "txid") -> str:
    """A txid or block hash as bitcoind prints it: 64 lowercase hex characters."""
    if not (isinstance(value, str) and _HEX64.match(value)):
        raise CommandFailed(protocol.BAD_REQUEST, f"'{key}' must be 64 lowercase hex characters")
    return value


def check_hash32(value: Any, what: str = "hash") -> bytes:
    """A SHA-256: 32 bytes."""
    if not (isinstance(value, bytes) and len(value) == 32):
        raise CommandFailed(protocol.BAD_REQUEST, f"'{what}' must be 32 bytes (a SHA-256)")
    return value


@dataclass
class ControlCounters:
    requests: int = 0
    bad_requests: int = 0
    forbidden: int = 0
    internal_errors: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # by code
    # Messages without a REQ envelope (no empty delimiter frame): answered
    # bad_request to their routing id, counted apart from bad_requests.
    unenveloped: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "bad_requests": self.bad_requests,
                "forbidden": self.forbidden, "internal_errors": self.internal_errors,
                "failed": dict(self.failed), "unenveloped": self.unenveloped}


# Frames of one control message read in one call of Dispatcher.serve.
FRAMES_PER_PASS = 20_000


@dataclass
class _PartialRequest:
    """What serve keeps of a control message while it reads it: its routing
    ids (the first MAX_ENVELOPE_FRAMES), its first two request frames, counts."""

    envelope: list[bytes]
    more: bool
    request: list[zmq.Frame] = field(default_factory=list)
    delimited: bool = False
    envelope_frames: int = 1
    request_frames: int = 0


class Dispatcher:
    """Decode, authorize, run, answer. `authorized`: a CURVE key may run a
    command if it is in one of the command's `roles` or in admins/ (the
    writer's: security.authorize); the other processes name their endpoint's
    ZAP `domain` instead, and a request from a key no longer in any of its
    lists (revoked while connected) is refused. `admit` may refuse a request
    before it runs (the writer's quotas: raise CommandFailed), and
    `admit_bytes(user, size)` one before it is even decoded (a large
    request's decoding is what costs: raise CommandFailed). `retryable`:
    errors that a retry may get past (a database that is busy or
    reconnecting), answered UNAVAILABLE rather than as a bug. Every process
    answers `ping` and `config`, run by whoever may reach its endpoint."""

    def __init__(self, commands: CommandTable | Iterable[Command], log: Any,
                 config: BusConfig | None = None, authorized: bool = False,
                 retryable: tuple[type[Exception], ...] = (), domain: str | None = None,
                 admit: Handler | None = None,
                 admit_bytes: Callable[[str | None, int], None] | None = None) -> None:
        table = commands if isinstance(commands, CommandTable) else CommandTable(tuple(commands))
        everyone = [role for role in security.DOMAIN_ROLES.get(domain or "control", ())
                    if role != security.ADMINS]
        process = PROCESS_OF_DOMAIN.get(domain, domain or "writer")
        builtins = [ping(everyone, process, time.time_ns()),
                    running_config(everyone, process, config)]
        table = CommandTable((*(c for c in builtins if table.get(c.name) is None),
                              *table.commands), table.transactions)
        if domain is not None:
            for command in table:  # a command cannot let in a key its endpoint does not
                if not set(command.roles) <= set(everyone):
                    raise ValueError(f"{command.name}: roles {command.roles} beyond the "
                                     f"{domain!r} endpoint's {everyone}")
        self.table = table
        self.commands: dict[str, Command] = {command.name: command for command in table}
        self.config = config
        self.authorized = authorized
        self.retryable = retryable
        self.domain = domain
        self.admit = admit
        self.admit_bytes = admit_bytes
        self.counters = ControlCounters()
        self._log = RateLimitedLog(log)
        self._partial: _PartialRequest | None = None  # a message read in part (serve)

    def serve(self, sock: zmq.Socket) -> None:
        """Answer the request waiting on a control endpoint's ROUTER socket
        (bus/sockets.open_reply), if one is, without waiting.

        A request comes as a REQ sends it: routing ids, an empty delimiter
        frame, the request. A ROUTER and not a REP: a message without the
        delimiter (as a DEALER may send) made a REP readable, then libzmq
        dropped it, and a blocking recv waited for the next well-formed
        request with the process's whole loop (the writer's capture, every
        process's SIGTERM); and when its sender had gone already, libzmq's
        REP routed the reply to the next valid request nowhere
        (router_t::rollback). Such a message is answered bad_request after
        its routing id, which a DEALER reads, and counted in `unenveloped`,
        as is an envelope of more than MAX_ENVELOPE_FRAMES.

        Frames are read one at a time and only the first few kept, so that a
        message of millions of frames costs a read each, no memory and no
        copy (a list of them took the writer 1.76 GB and 0.33 s of CPU a
        100,000 frames; tests/test_hostile.py). At most FRAMES_PER_PASS a
        call: the rest of such a message is read at the next ones (the socket
        stays readable), so that the process's loop goes on meanwhile (its
        capture, its database session's heartbeat: 3,000,000 frames held the
        writer's loop 4 s, its session timed out)."""
        partial = self._partial
        if partial is None:
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            partial = self._partial = _PartialRequest([frame.bytes], frame.more)
        budget = FRAMES_PER_PASS
        while partial.more:  # libzmq delivers a message whole: the rest is here
            if budget == 0:
                return  # the rest at the next call
            budget -= 1
            frame = sock.recv(copy=False)
            partial.more = frame.more
            if partial.delimited:
                partial.request_frames += 1
                if partial.request_frames <= 2:
                    partial.request.append(frame)
            elif len(frame) == 0:
                partial.delimited = True
            else:
                partial.envelope_frames += 1
                if partial.envelope_frames <= MAX_ENVELOPE_FRAMES:
                    partial.envelope.append(frame.bytes)
        self._partial = None
        envelope, envelope_frames = partial.envelope, partial.envelope_frames
        if not partial.delimited or envelope_frames > MAX_ENVELOPE_FRAMES:
            self.counters.unenveloped += 1
            self._log.warning("unenveloped", "bad_control_request",
                              detail=f"{envelope_frames - 1} frame(s) before any empty delimiter "
                                     "frame" if not partial.delimited else
                                     f"an envelope of {envelope_frames} frames")
            sock.send_multipart([envelope[0], protocol.encode_reply_error(
                None, protocol.BAD_REQUEST, "a request's envelope is an empty delimiter "
                f"frame after at most {MAX_ENVELOPE_FRAMES - 1} routing ids, then comes the "
                "request (what a REQ socket sends)")])
            return
        # The request's frame carries the client's CURVE key (security.user_id).
        reply = self.handle([frame.bytes for frame in partial.request],
                            security.user_id(partial.request), partial.request_frames)
        sock.send_multipart([*envelope, b"", reply])

    def handle(self, frames: list[bytes], user: str | None = None,
               count: int | None = None) -> bytes:
        """The reply to a request's frames (`count` of them, when only the
        first are given)."""
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
            request_id, cmd, args = protocol.decode_request(frames, count)
            command = self.commands.get(cmd)
            if command is None:
                raise protocol.RequestError(request_id, protocol.UNKNOWN_COMMAND,
                                            f"no command {cmd!r}; this process has "
                                            f"{', '.join(sorted(self.commands))}")
            if self.config is not None:
                refusal = security.authorize(self.config, user, cmd, command.roles) \
                    if self.authorized else \
                    security.admitted(self.config, self.domain, user) if self.domain else None
                if refusal is not None:
                    raise protocol.RequestError(request_id, protocol.FORBIDDEN, refusal)
            request = Request(request_id, cmd, args, user)
            if self.admit is not None:
                self.admit(request)
            if command.transaction:
                assert self.table.transactions is not None  # CommandTable checks it
                result = self.table.transactions(command, request)
            else:
                result = command.handler(request)  # type: ignore[call-arg]
            return protocol.encode_reply_ok(request_id, result)
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
        except CannotGoOn:
            raise  # the process stops (bus/runner.py), not one request
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
