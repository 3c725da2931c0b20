"""bus-gateway: the bus for WebSocket clients (browsers, notebooks, anything
that speaks HTTP), with per-token permissions.

Listens on BUS_GATEWAY_LISTEN (HTTP: WebSocket, and the console at /)
Connects to the proxy's subscriber side and the writer's notifications
(gateway/live.py), the reader (replays, durable consumers:
gateway/streams.py), the writer's control endpoint and the proxy's publisher
side (producer sessions: gateway/producers.py), as a client with its own
CURVE key when CURVE is on.

It is built on the `websockets` package (asyncio): RFC 6455 framing, close
codes, ping/pong keep-alive, Origin checks, per-message size limits and TLS
are the library's; an HTTP route for the console's static files is its
process_request hook. aiohttp would bring a second HTTP stack for that one
route. The role runs the event loop in slices from the shared run loop
(bus/runner.py), which keeps signals, readiness and the watchdog as every
other process has them.

Each WebSocket request is declared once, in COMMANDS' table (bus/control's
Command: name, handler, who may run it, its arguments, its error codes),
which docs/protocol.md's table is checked against.
"""

from __future__ import annotations

import asyncio
import base64
import http
import inspect
import itertools
import mimetypes
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import websockets
import zmq
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request as HttpRequest, Response

from bus import control, protocol, security, sockets
from bus.build import build_info
from bus.config import BusConfig
from bus.http import HttpSide, Series
from bus.logging import RateLimitedLog, get_logger
from bus.runner import MemoryLimit, StartupError, StopSignal
from bus.tokens import TokenStore
from gateway import frames
from gateway.health import gateway_health
from gateway.clients import (CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_PROTOCOL_ERROR,
                             CLOSE_TRY_AGAIN_LATER, LIVE_STREAM, Client)
from gateway.frames import Encoded
from gateway.live import LiveFeed, LiveGroup
from gateway.overview import Overview
from gateway.producers import Decision, ProducerSession, Submitted
from gateway.streams import Durable, Replay, Stream

log = get_logger("gateway")

# A connection must finish its handshake, and present its token (header, or
# the first frame), within this long each.
AUTH_TIMEOUT_S = 5.0
# Until then its frames are at most this large (an auth request is a few
# hundred bytes): a connection without a token holds no large frame.
AUTH_FRAME_MAX_BYTES = 4096
# Connections not yet past their token at most (the rest get HTTP 503): a
# flood of them cannot fill BUS_GATEWAY_MAX_CONNECTIONS.
UNAUTHENTICATED_MAX = 128
# Threads that run requests to the reader and the writer for streams.
REQUEST_THREADS = 8
# Producer sessions one connection may hold.
PRODUCERS_PER_CONNECTION = 4
# WebSocket keep-alive: a ping this often, the connection closed if its pong
# takes longer than this (a browser answers pings itself).
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 20.0
# Frames websockets reads ahead of the handler (each up to max_size): with
# the one being read, two frames of the largest request a connection.
READ_AHEAD_FRAMES = 1
# The kernel's send buffer, as websockets' write limit: its send() waits
# past it, and what it holds counts against BUS_GATEWAY_SEND_BUFFER_BYTES.
WRITE_LIMIT_BYTES = 64 << 10
STREAM_ID_MAX = 2**31 - 1
# The gateway's producer ids: gw/TOKEN/NAME (gw/anonymous/NAME without tokens),
# apart from the ids of the bus's other publishers.
PRODUCER_PREFIX = "gw/"
# A producer session no publish used for this long is closed (its slot freed).
PRODUCER_IDLE_S = 60.0
# The payloads of one connection's publishes not yet decided, at most: what
# its producer sessions hold (and send again) for it.
UNACKED_BYTES = 16 << 20
# Streams (replays, consumers) in all: each holds a REQ socket to the reader
# (and one to the writer), of libzmq's MAX_SOCKETS (ZMQ_SOCKET_LIMIT_SETTINGS).
MAX_STREAMS_TOTAL = 512
ZMQ_MAX_SOCKETS = 4096
CONSUMER_MAX_CHARS = 128

# Why connections were refused or closed (stats "closed"); each counted.
CLOSE_REASONS = ("no_token", "bad_token", "bad_origin", "revoked", "token_changed",
                 "slow_consumer",
                 "too_many_connections",
                 "too_many_for_token", "memory", "protocol_error", "auth_timeout",
                 "going_away")

HTTP_SERIES = [
    Series("connections", "gauge", "WebSocket connections open",
           lambda s: s["connections"]["open"]),
    Series("connections_accepted", "counter", "WebSocket connections accepted",
           lambda s: s["connections"]["accepted"]),
    Series("connections_closed", "counter", "connections refused or closed, by reason",
           lambda s: s["connections"]["closed"], label="reason"),
    Series("live_received", "counter", "messages read from the proxy",
           lambda s: s["live"]["received"]),
    Series("messages_sent", "counter", "messages sent to WebSocket clients",
           lambda s: s["messages_sent"]),
    Series("published", "counter", "messages published for clients, by outcome",
           lambda s: s["published"], label="outcome"),
    Series("producer_sessions", "gauge", "producer sessions held",
           lambda s: s["producer_sessions"]),
    Series("requests", "counter", "WebSocket requests, by outcome",
           lambda s: s["requests"], label="outcome"),
]


class Failed(Exception):
    """A request refused: answered with `code` (a bus/protocol.py constant)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _int_arg(args: dict[str, Any], key: str, low: int = 0, high: int = 2**63 - 1,
             required: bool = False) -> int | None:
    value = args.get(key)
    if value is None and not required:
        return None
    if type(value) is not int or not low <= value <= high:
        raise Failed(protocol.BAD_REQUEST, f"'{key}' must be an integer from {low} to {high}")
    return value


class Gateway:
    name = "gateway"
    health = staticmethod(gateway_health)

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.tokens = TokenStore("")  # read in initialize (a StartupError is said there)
        self.clients: set[Client] = set()
        self.producer_sessions: dict[str, ProducerSession] = {}
        self.session_owners: dict[str, Client] = {}
        self.groups: dict[tuple[frozenset[str], bool], LiveGroup] = {}
        self.numbers = itertools.count(1)
        self.accepted = 0
        self.closed = {reason: 0 for reason in CLOSE_REASONS}
        self.requests = {"ok": 0, "refused": 0, "bad": 0}
        self.published = {"stored": 0, "refused": 0}
        self.messages_sent_closed = 0  # of connections gone
        self._started = time.monotonic()
        self._rejects = RateLimitedLog(log)
        # Each WebSocket request, once: who may run it (a token's lists),
        # its arguments and the codes it answers.
        reads, publishes = (security.READERS,), (security.PUBLISHERS,)
        self.commands = control.CommandTable((
            control.Command("subscribe", self._subscribe, roles=reads, args=("prefixes",)),
            control.Command("unsubscribe", self._unsubscribe, roles=reads, args=("prefixes",)),
            control.Command("replay", self._replay, roles=reads,
                            args=("stream", "prefixes", "after_id", "since_ns")),
            control.Command("consume", self._consume, roles=reads,
                            args=("stream", "consumer", "prefixes", "after_id", "since_ns")),
            control.Command("ack", self._ack, roles=reads, args=("stream", "last_id"),
                            errors=(protocol.NOT_FOUND,)),
            control.Command("close", self._close_stream, roles=reads, args=("stream",),
                            errors=(protocol.NOT_FOUND,)),
            control.Command("publish", self._publish, roles=publishes,
                            args=("topic", "payload", "encoding", "content_type", "headers",
                                  "producer"),
                            errors=(protocol.BUSY, protocol.UNAVAILABLE, protocol.PRODUCER_FENCED,
                                    protocol.RESERVED_TOPIC)),
            control.Command("stats", lambda client, args: self.snapshot(),
                            roles=(security.ADMINS,)),
            control.Command("console", self._console, roles=(security.ADMINS,)),
            control.Command("ping", lambda client, args: "pong", roles=(*reads, *publishes)),
            # The first request's, with tokens (_authenticate); later, or
            # without tokens, it says who the connection is.
            control.Command("auth", self._whoami, roles=(*reads, *publishes), args=("token",)),
        ))
        self.http: HttpSide | None = None
        self.stopping = False

    # --- the run loop's side ---------------------------------------------------

    def initialize(self, stop: StopSignal) -> None:
        cfg = self.config
        self.stop = stop
        self.tokens = TokenStore(cfg.gateway_tokens_dir)
        self.aio = asyncio.new_event_loop()
        asyncio.set_event_loop(self.aio)
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, ZMQ_MAX_SOCKETS)
        self.executor = ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="request")
        self.memory = MemoryLimit(cfg.gateway_memory_limit_bytes, interval_s=0.5)
        self.origins = self._origins()
        # Its connections, and as many again in their handshake (10 s at most):
        # the open-file limit raised to fit, or the cap lowered (and said).
        self.max_connections = sockets.connection_cap(cfg, 1, log, cfg.gateway_max_connections)
        self._woken = asyncio.Event()
        self.aio.add_reader(stop.fileno(), self._wake)
        self.feed = LiveFeed(self.ctx, cfg, self.aio)
        self.overview = Overview(cfg, self.ctx, self.executor)
        host, _, port = cfg.gateway_listen.rpartition(":")
        # Socket activation (bus-gateway.socket): systemd holds the port while
        # the gateway restarts, so nothing else can take it meanwhile.
        inherited = sockets.inherited_listener("gateway", f"tcp://{cfg.gateway_listen}")
        where: dict[str, Any] = {"host": host.strip("[]"), "port": int(port)} \
            if inherited is None else {"sock": socket.socket(fileno=inherited)}
        try:
            self.server = self.aio.run_until_complete(self._listen(
                **where, ssl=self._tls(),
                process_request=self._http_request,
                max_size=AUTH_FRAME_MAX_BYTES, max_queue=READ_AHEAD_FRAMES,
                write_limit=WRITE_LIMIT_BYTES, ping_interval=PING_INTERVAL_S,
                ping_timeout=PING_TIMEOUT_S, close_timeout=2, open_timeout=AUTH_TIMEOUT_S,
                compression=None,
                server_header=None, logger=None))
        except OSError as exc:
            raise StartupError(f"cannot listen on {cfg.gateway_listen}: "
                               f"{exc.strerror or exc}") from None
        sock = next(iter(self.server.sockets))
        self.address = "%s:%d" % sock.getsockname()[:2]
        if cfg.gateway_http:
            self.http = HttpSide("gateway", cfg.gateway_http, HTTP_SERIES, gateway_health)
        log.info("started", **build_info(), listen=self.address,
                 tokens=cfg.gateway_tokens_dir or None, tls=bool(cfg.gateway_tls_cert),
                 config_source=cfg.source, config=cfg.public())
        self._tokens_read()
        if not self.tokens.required:
            log.warning("no_tokens", action="every connection may do everything (read, "
                        "publish, the console): set BUS_GATEWAY_TOKENS_DIR (bus-cli tokens "
                        "generate)")

    async def _listen(self, **options: Any) -> Any:
        return await serve(self._serve, **options)

    def _tokens_read(self) -> None:
        """Say what the token directory holds, and each file it could not
        take (unreadable by the gateway's user, not a token file): otherwise
        an operator sees only "bad token"."""
        if not self.tokens.required:
            return
        log.info("tokens_read", tokens=len(self.tokens.by_hash),
                 directory=self.config.gateway_tokens_dir)
        for name, problem in sorted(self.tokens.problems.items())[:20]:
            log.warning("token_file_not_taken", file=name, problem=problem)

    def _tls(self) -> ssl.SSLContext | None:
        cfg = self.config
        if not cfg.gateway_tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cfg.gateway_tls_cert, cfg.gateway_tls_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"BUS_GATEWAY_TLS_CERT / BUS_GATEWAY_TLS_KEY: {exc}") from None
        return context

    def _origins(self) -> list[str | None] | None:
        """The Origin values let in: the configured ones and the gateway's own
        (its console); None (no header: not a browser) always."""
        listed = [o for o in self.config.gateway_origins.split(",") if o]
        if "*" in listed:
            return None
        scheme = "https" if self.config.gateway_tls_cert else "http"
        host, _, port = self.config.gateway_listen.rpartition(":")
        hosts = {host, "localhost", "127.0.0.1", "[::1]"} if host in (
            "127.0.0.1", "localhost", "::1", "[::1]") else {host}
        return [*listed, *(f"{scheme}://{h}:{port}" for h in sorted(hosts)), None]

    def _max_frame_bytes(self) -> int:
        """The largest request: a publish of the largest message, its payload
        base64 in JSON (4/3), with room for the rest of the request."""
        return self.config.max_message_bytes * 4 // 3 + (64 << 10)

    def _wake(self) -> None:
        self.stop.clear_wakeup()
        self._woken.set()

    def loop(self, now: float | None = None) -> None:
        self.aio.run_until_complete(self._turn())

    async def _turn(self) -> None:
        """Serve for up to half a second (until a signal), then the
        housekeeping: tokens read again, wrong peers redialed, memory."""
        try:
            await asyncio.wait_for(self._woken.wait(), 0.5)
        except TimeoutError:
            pass
        self._woken.clear()
        self.tend(time.monotonic())

    def tend(self, now: float) -> None:
        revoked = self.tokens.check(now)
        if revoked is not None:
            self._tokens_read()
            for client in list(self.clients):
                if client.token_hash is None or not self.tokens.required:
                    continue
                if client.token_hash in revoked:
                    client.cut(CLOSE_POLICY, "revoked", "the token was revoked")
                elif self.tokens.current(client.token_hash) != client.token:
                    # Its rights changed: what it opened under the old ones goes with it.
                    client.cut(CLOSE_POLICY, "token changed", "the token's rights changed: "
                               "connect again")
        self.feed.check_peers(now)
        if self.memory.exceeded(now):
            self._shed_memory()
        for key, session in list(self.producer_sessions.items()):
            if session.pending == 0 and session.is_alive() and \
                    now - session.used_at > PRODUCER_IDLE_S:
                session.stop()
            if not session.is_alive() and session.pending == 0:
                del self.producer_sessions[key]
                owner = self.session_owners.pop(key, None)
                if owner is not None and owner.producers.get(session.producer_id) is session:
                    del owner.producers[session.producer_id]

    def _shed_memory(self) -> None:
        """Over the memory limit: close the connections that hold most,
        until what they held is an eighth of the limit."""
        to_free = self.config.gateway_memory_limit_bytes // 8
        for client in sorted(self.clients, key=Client.held, reverse=True):
            if to_free <= 0 or client.held() == 0:
                break
            to_free -= client.held()
            client.cut(CLOSE_TRY_AGAIN_LATER, "memory",
                       f"the gateway is over its memory limit ({self.memory.rss} bytes)")

    def status_line(self) -> str:
        return (f"{len(self.clients):,} connections, {self.feed.received:,} live messages, "
                f"{self.published['stored']:,} published")

    # --- HTTP (not WebSocket) requests -------------------------------------------

    def _http_request(self, connection: ServerConnection,
                      request: HttpRequest) -> Response | None:
        """The console's files at / (not a WebSocket upgrade); for upgrades
        the Origin check (403) and the connection cap (503)."""
        if "upgrade" not in request.headers.get("Connection", "").lower():
            return self._static(connection, request.path)
        # The Origin check (websockets' own, done here to be counted and said).
        origins = request.headers.get_all("Origin")
        if len(origins) > 1 or self.origins is not None and (origins[0] if origins else None) \
                not in self.origins:
            self.closed["bad_origin"] += 1
            self._rejects.warning("bad_origin", "origin_refused",
                                  origin=", ".join(origins)[:200],
                                  action="a page of another site: BUS_GATEWAY_ORIGINS lists "
                                         "the ones let in")
            return connection.respond(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        waiting = sum(1 for c in self.clients if c.token_name is None)
        if len(self.clients) >= self.max_connections or waiting >= UNAUTHENTICATED_MAX:
            self.closed["too_many_connections"] += 1
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      "too many connections\n")
        return None

    def _static(self, connection: ServerConnection, path: str) -> Response:
        name = path.split("?", 1)[0].lstrip("/") or "index.html"
        if name in CONSOLE_FILES:
            return self._body(connection.respond(http.HTTPStatus.OK, ""), CONSOLE_FILES[name],
                              name)
        if name == "console.json":  # what the page asks first: whether to ask for a token
            response = connection.respond(http.HTTPStatus.OK, "")
            return self._body(response, b'{"tokens": %s}' % (
                b"true" if self.tokens.required else b"false"), "console.json")
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    @staticmethod
    def _body(response: Response, body: bytes, name: str) -> Response:
        response.body = body
        headers = Headers(response.headers)
        del headers["Content-Type"], headers["Content-Length"]
        headers["Content-Type"] = mimetypes.guess_type(name)[0] or "application/octet-stream"
        headers["Content-Length"] = str(len(body))
        # Nothing leaves the machine: the page loads nothing from elsewhere.
        headers["Content-Security-Policy"] = ("default-src 'self'; connect-src 'self' ws: wss:;"
                                              " img-src 'self' data:; frame-ancestors 'none'")
        headers["X-Content-Type-Options"] = "nosniff"
        headers["Cache-Control"] = "no-cache"
        response.headers = headers
        return response

    # --- a WebSocket connection ---------------------------------------------------

    async def _serve(self, ws: ServerConnection) -> None:
        client = Client(ws, next(self.numbers), self.config.gateway_send_buffer_bytes,
                        self._cut)
        self.clients.add(client)
        self.accepted += 1
        sender = asyncio.get_running_loop().create_task(client.send_loop())
        try:
            if not await self._authenticate(client):
                return
            ws.protocol.max_message_size = self._max_frame_bytes()  # past its token: a publish's
            async for data in ws:
                if client.closing is not None:
                    break
                await self._request(client, data)
        except websockets.ConnectionClosed:
            pass
        except Exception:  # a bug: this connection ends (1011), the gateway goes on
            log.exception("connection_failed", peer=client.peer, token=client.token_name)
        finally:
            if client.close_task is not None:  # closed with its code before the handler ends
                try:
                    await client.close_task
                except Exception:  # the peer gone meanwhile: what it held is forgotten below
                    pass
            await self._forget(client)
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, websockets.ConnectionClosed):
                pass

    async def _authenticate(self, client: Client) -> bool:
        """The token of the Authorization header (Bearer), or of the first
        frame ({"op": "auth", "token": ...}); the kind of the first frame is
        the connection's. False when the connection is to be closed."""
        ws = client.ws
        header = ws.request.headers.get("Authorization", "") if ws.request else ""
        secret = header[7:].strip() if header[:7].lower() == "bearer " else None
        request: dict[str, Any] | None = None
        if secret is None and self.tokens.required:
            try:
                first = await asyncio.wait_for(ws.recv(), AUTH_TIMEOUT_S)
            except TimeoutError:
                self._refuse(client, "auth_timeout", "no token within "
                             f"{AUTH_TIMEOUT_S:g} s")
                return False
            client.binary = isinstance(first, bytes)
            try:
                request = frames.parse_request(first)
            except frames.BadFrame as exc:
                self._refuse(client, "protocol_error", str(exc))
                return False
            if request["op"] != "auth":
                self._refuse(client, "no_token", "the first request must be "
                             "{\"op\": \"auth\", \"token\": ...} (or an Authorization header)")
                return False
            secret = request.get("token")
        found = self.tokens.lookup(secret)
        if found is None:
            self._refuse(client, "bad_token", "not a token of this gateway")
            return False
        client.token_hash, client.token = found
        client.token_name = client.token.name
        if not self._token_has_room(client, client.token):
            return False
        if request is not None:  # the first frame's auth is answered as any request
            client.reply(request.get("id"), self._whoami(client, {"_token": client.token}))
        return True

    def _token_has_room(self, client: Client, token: Any) -> bool:
        if not self.tokens.required:  # one anonymous identity: BUS_GATEWAY_MAX_CONNECTIONS alone
            return True
        cap = token.max_connections or self.config.gateway_max_connections_per_token
        if sum(1 for c in self.clients if c.token_hash == client.token_hash) > cap:
            self._refuse(client, "too_many_for_token", f"token {token.name!r} has {cap} "
                         "connections open")
            return False
        return True

    def _refuse(self, client: Client, reason: str, detail: str) -> None:
        code = CLOSE_PROTOCOL_ERROR if reason == "protocol_error" else CLOSE_POLICY
        self._rejects.warning(reason, "connection_refused", peer=client.peer, detail=detail)
        client.cut(code, reason.replace("_", " "), detail)

    def _cut(self, client: Client, reason: str, detail: str) -> None:
        key = reason.replace(" ", "_")
        if key in self.closed:
            self.closed[key] += 1
        if key not in ("no_token", "bad_token", "auth_timeout", "protocol_error", "going_away"):
            self._rejects.warning(key, "connection_closed", peer=client.peer, detail=detail,
                                  token=client.token_name)

    async def _forget(self, client: Client) -> None:
        self.clients.discard(client)
        self.messages_sent_closed += client.sent_messages
        client.live.clear()
        self._regroup(client)
        for stream in list(client.streams.values()):
            await self._end_stream(stream)
        client.streams.clear()
        for session in client.producers.values():
            session.stop()
        client.producers.clear()

    async def _request(self, client: Client, data: str | bytes) -> None:
        client.received += 1
        if client.binary is None:
            client.binary = isinstance(data, bytes)
        try:
            request = frames.parse_request(data)
        except frames.BadFrame as exc:
            self.requests["bad"] += 1
            client.reply(exc.request_id, error=(protocol.BAD_REQUEST, str(exc)))
            return
        request_id, op = request.get("id"), request["op"]
        command = self.commands.get(op)
        token = self.tokens.current(client.token_hash or "")
        try:
            if token is None:  # revoked since (tend closes the connection)
                raise Failed(protocol.FORBIDDEN, "the token was revoked")
            if self.stopping:
                raise Failed(protocol.UNAVAILABLE, "the gateway is stopping")
            if command is None:
                raise Failed(protocol.UNKNOWN_COMMAND, f"no op {op!r} (ops: "
                             f"{', '.join(c.name for c in self.commands)})")
            unknown = set(request) - {"op", "id", *command.args}
            if unknown:
                raise Failed(protocol.BAD_REQUEST, f"{op} takes no {', '.join(sorted(unknown))}"
                             f" (its arguments: {', '.join(command.args) or 'none'})")
            if not token.in_lists(command.roles):
                raise Failed(protocol.FORBIDDEN, f"token {token.name!r} may not run {op!r} "
                             f"(its lists: {', '.join(token.lists)}; {op!r} is for "
                             f"{', '.join((*command.roles, security.ADMINS))})")
            result = command.handler(client, {**request, "_token": token, "_id": request_id})
            if inspect.isawaitable(result):
                result = await result
        except Failed as exc:
            self.requests["bad" if exc.code == protocol.BAD_REQUEST else "refused"] += 1
            client.reply(request_id, error=(exc.code, exc.reason))
            return
        except Exception as exc:  # a bug: answered, logged, the connection goes on
            log.exception("request_failed", op=op)
            self.requests["refused"] += 1
            client.reply(request_id, error=(protocol.INTERNAL_ERROR, type(exc).__name__))
            return
        self.requests["ok"] += 1
        if result is not DEFERRED:
            client.reply(request_id, result)

    # --- the ops ------------------------------------------------------------------

    async def _console(self, client: Client, args: dict[str, Any]) -> Any:
        """What the console page shows, in one answer (gateway/overview.py)."""
        return {"at_ns": time.time_ns(), "processes": await self.overview.read(time.monotonic()),
                "topics": dict(self.feed.topics), "gateway": self.snapshot()}

    def _whoami(self, client: Client, args: dict[str, Any]) -> Any:
        token = args["_token"]
        secret = args.get("token")
        if secret is not None and self.tokens.required:
            found = self.tokens.lookup(secret)
            if found is None or found[0] != client.token_hash:
                raise Failed(protocol.BAD_REQUEST, f"this connection is {token.name!r}'s: one "
                             "token a connection (open another for another token)")
        return {"token": token.name, "lists": list(token.lists)}

    def _prefixes(self, client: Client, args: dict[str, Any]) -> list[str]:
        """The request's readable prefixes: a list of 1-64 strings, each within
        the token's `read` prefixes."""
        prefixes = args.get("prefixes")
        if not (isinstance(prefixes, list) and 0 < len(prefixes) <= 64
                and all(isinstance(p, str) and "\x00" not in p and len(p) <= 1024
                        for p in prefixes)):
            raise Failed(protocol.BAD_REQUEST, "'prefixes' must be a list of 1-64 topic "
                         "prefixes (strings, no NUL, at most 1024 characters)")
        token = args["_token"]
        for prefix in prefixes:
            if not token.may_read(prefix):
                raise Failed(protocol.FORBIDDEN, f"token {token.name!r} may not read "
                             f"{prefix!r} (its prefixes: {', '.join(map(repr, token.read))})")
        return list(dict.fromkeys(prefixes))

    def _room_for(self, client: Client, adding: int) -> None:
        """The connection's prefixes, live and in its streams, stay within
        BUS_GATEWAY_MAX_PREFIXES with `adding` more."""
        held = len(client.live) + sum(len(s.prefixes) for s in client.streams.values())
        if held + adding > self.config.gateway_max_prefixes:
            raise Failed(protocol.BAD_REQUEST, f"a connection subscribes to at most "
                         f"{self.config.gateway_max_prefixes} prefixes (BUS_GATEWAY_MAX_PREFIXES)")

    def _subscribe(self, client: Client, args: dict[str, Any]) -> Any:
        prefixes = [p for p in self._prefixes(client, args) if p not in client.live]
        self._room_for(client, len(prefixes))
        client.live.update(prefixes)
        self._regroup(client)
        # The request's own prefixes, and how many it has: a reply no larger than its request.
        return {"stream": LIVE_STREAM, "prefixes": args["prefixes"], "count": len(client.live)}

    def _unsubscribe(self, client: Client, args: dict[str, Any]) -> Any:
        client.live.difference_update(self._prefixes(client, args))
        self._regroup(client)
        return {"stream": LIVE_STREAM, "prefixes": args["prefixes"], "count": len(client.live)}

    def _regroup(self, client: Client) -> None:
        """Move the connection to the live group of its prefixes now (and its
        kind of frames), leaving the old one, which goes once empty."""
        key = (frozenset(client.live), bool(client.binary))
        old = client.group
        if old is not None and old.key == key:
            return
        if old is not None:
            old.members.discard(client)
            if not old.members:
                for prefix in old.key[0]:
                    self.feed.index.remove(prefix, old)
                del self.groups[old.key]
        client.group = None
        if not client.live:
            return
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = LiveGroup(key, self.aio)
            for prefix in key[0]:
                self.feed.index.add(prefix, group)
        group.members.add(client)
        client.group = group

    def _new_stream_id(self, client: Client, args: dict[str, Any]) -> int:
        stream_id = _int_arg(args, "stream", 1, STREAM_ID_MAX, required=True)
        if stream_id in client.streams:
            raise Failed(protocol.BAD_REQUEST, f"stream {stream_id} is open: close it first "
                         "or use another id")
        if len(client.streams) >= self.config.gateway_max_streams:
            raise Failed(protocol.BAD_REQUEST, f"a connection runs at most "
                         f"{self.config.gateway_max_streams} streams (BUS_GATEWAY_MAX_STREAMS)")
        if sum(len(c.streams) for c in self.clients) >= MAX_STREAMS_TOTAL:
            raise Failed(protocol.BUSY, f"the gateway runs {MAX_STREAMS_TOTAL} streams: "
                         "try again later")
        return stream_id  # type: ignore[return-value]

    def _start_from(self, args: dict[str, Any]) -> tuple[int | None, int | None]:
        after_id, since_ns = _int_arg(args, "after_id"), _int_arg(args, "since_ns")
        if after_id is not None and since_ns is not None:
            raise Failed(protocol.BAD_REQUEST, "give 'after_id' or 'since_ns', not both")
        return after_id, since_ns

    def _commits(self) -> tuple[int, asyncio.Event]:
        return self.feed.last_commit_id, self.feed.commits

    def _stream_parts(self, client: Client, stream_id: int, prefixes: list[str]) -> tuple:
        return (stream_id, prefixes, client, self.config, self.ctx, self.executor,
                self._commits)

    def _replay(self, client: Client, args: dict[str, Any]) -> Any:
        stream_id = self._new_stream_id(client, args)
        prefixes = self._prefixes(client, args)
        self._room_for(client, len(prefixes))
        after_id, since_ns = self._start_from(args)
        stream = Replay(*self._stream_parts(client, stream_id, prefixes), after_id=after_id,
                        since_ns=since_ns)
        client.streams[stream_id] = stream
        for prefix in prefixes:  # held from now on: the seam meets what is stored
            self.feed.index.add(prefix, stream)
        stream.start()
        return {"stream": stream_id, "prefixes": prefixes}

    def _consume(self, client: Client, args: dict[str, Any]) -> Any:
        stream_id = self._new_stream_id(client, args)
        prefixes = self._prefixes(client, args)
        self._room_for(client, len(prefixes))
        name = args.get("consumer")
        if not (isinstance(name, str) and 0 < len(name) <= CONSUMER_MAX_CHARS
                and name.isprintable()):
            raise Failed(protocol.BAD_REQUEST, f"'consumer' must be a name of 1-"
                         f"{CONSUMER_MAX_CHARS} printable characters")
        after_id, since_ns = self._start_from(args)
        # A token's consumers are its own: one token cannot move another's position.
        token = args["_token"]
        stream = Durable(*self._stream_parts(client, stream_id, prefixes),
                         name=name if not self.tokens.required else
                         f"{PRODUCER_PREFIX}{token.name}/{name}",
                         after_id=after_id, since_ns=since_ns)
        client.streams[stream_id] = stream
        stream.start()
        return {"stream": stream_id, "consumer": stream.name, "prefixes": prefixes}

    def _stream(self, client: Client, args: dict[str, Any]) -> Stream:
        stream_id = _int_arg(args, "stream", 1, STREAM_ID_MAX, required=True)
        stream = client.streams.get(stream_id)  # type: ignore[arg-type]
        if stream is None:
            raise Failed(protocol.NOT_FOUND, f"no stream {stream_id} on this connection")
        return stream

    async def _ack(self, client: Client, args: dict[str, Any]) -> Any:
        stream = self._stream(client, args)
        last_id = _int_arg(args, "last_id", 0, required=True)
        if not isinstance(stream, Durable):
            raise Failed(protocol.BAD_REQUEST, f"stream {stream.id} is a {stream.kind}: "
                         "only a durable consumer (consume) takes acks")
        if last_id > stream.last_delivered_id:  # type: ignore[operator]
            raise Failed(protocol.BAD_REQUEST, f"last_id {last_id} is past the last message "
                         f"this stream delivered ({stream.last_delivered_id})")
        await stream.ack(last_id)  # type: ignore[arg-type]
        return {"stream": stream.id, "acked_id": stream.position.acked_id}

    async def _close_stream(self, client: Client, args: dict[str, Any]) -> Any:
        stream = self._stream(client, args)
        del client.streams[stream.id]
        await self._end_stream(stream)
        return {"stream": stream.id, "delivered": stream.delivered}

    async def _end_stream(self, stream: Stream) -> None:
        for prefix in stream.prefixes:
            self.feed.index.remove(prefix, stream)
        await stream.close()

    def _publish(self, client: Client, args: dict[str, Any]) -> Any:
        token = args["_token"]
        topic = args.get("topic")
        if not isinstance(topic, str) or not topic:
            raise Failed(protocol.BAD_REQUEST, "'topic' must be a non-empty string")
        if protocol.is_reserved(topic):
            raise Failed(protocol.RESERVED_TOPIC, "'$' topics are the bus's own")
        if not token.may_publish(topic):
            raise Failed(protocol.FORBIDDEN, f"token {token.name!r} may not publish to "
                         f"{topic!r} (its prefixes: {', '.join(map(repr, token.publish))})")
        payload, content_type = self._payload(args)
        headers = args.get("headers")
        if headers is not None and not (isinstance(headers, dict) and len(headers) <= 64 and all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            raise Failed(protocol.BAD_REQUEST, "'headers' must map strings to strings (at "
                         "most 64)")
        if client.unacked >= self.config.gateway_max_unacked or \
                client.unacked_bytes + len(payload) > UNACKED_BYTES:
            raise Failed(protocol.BUSY, f"{client.unacked} publishes ({client.unacked_bytes} "
                         "bytes) wait for the writer (BUS_GATEWAY_MAX_UNACKED, and "
                         f"{UNACKED_BYTES >> 20} MiB): wait for their replies")
        session = self._producer(client, args)
        request_id = args["_id"]
        if not session.submit(Submitted((client, request_id, len(payload)), topic, payload,
                                        content_type, headers)):
            raise Failed(protocol.UNAVAILABLE if session.error else protocol.BUSY,
                         session.error or "the producer session is full")
        client.unacked += 1
        client.unacked_bytes += len(payload)
        return DEFERRED

    def _payload(self, args: dict[str, Any]) -> tuple[bytes, str | None]:
        payload, encoding = args.get("payload"), args.get("encoding")
        content_type = args.get("content_type")
        if content_type is not None and not (isinstance(content_type, str)
                                             and len(content_type) <= 256):
            raise Failed(protocol.BAD_REQUEST, "'content_type' must be a string")
        if isinstance(payload, bytes) and encoding is None:
            return payload, content_type
        if not isinstance(payload, str):
            raise Failed(protocol.BAD_REQUEST, "'payload' must be a string (or bytes in msgpack)")
        if encoding == "base64":
            try:
                return base64.b64decode(payload, validate=True), content_type
            except ValueError:
                raise Failed(protocol.BAD_REQUEST, "'payload' is not base64") from None
        if encoding not in (None, "utf-8"):
            raise Failed(protocol.BAD_REQUEST, "'encoding' must be utf-8 or base64")
        try:
            data = payload.encode("utf-8")
        except UnicodeEncodeError:
            raise Failed(protocol.BAD_REQUEST, "'payload' is not valid UTF-8 text (a lone "
                         "surrogate)") from None
        return data, content_type or protocol.CONTENT_TEXT

    def _producer(self, client: Client, args: dict[str, Any]) -> ProducerSession:
        """The connection's session for the request's producer id (its own by
        default), opened on first use. A client-named id is the token's:
        TOKEN/NAME, so one token cannot fence another's producer."""
        token, name = args["_token"], args.get("producer")
        if name is None:  # the connection's own: nobody else can name it
            name = client.own_producer
        if not (isinstance(name, str) and name and len(name) <= 64 and name.isprintable()):
            raise Failed(protocol.BAD_REQUEST, "'producer' must be a name of 1-64 printable "
                         "characters")
        producer_id = f"{PRODUCER_PREFIX}{token.name}/{name}"
        session = client.producers.get(producer_id)
        if session is not None and session.is_alive():
            return session
        # One connection a producer id: another opening it would fence the first.
        if any(producer_id in other.producers and other.producers[producer_id].is_alive()
               for other in self.clients if other is not client):
            raise Failed(protocol.BUSY, f"producer {name!r} is another connection's: name "
                         "another, or close that one first")
        if len(client.producers) >= PRODUCERS_PER_CONNECTION and session is None:
            raise Failed(protocol.BUSY, f"a connection holds at most {PRODUCERS_PER_CONNECTION}"
                         " producer sessions")
        live = sum(1 for s in self.producer_sessions.values() if s.is_alive())
        if live >= self.config.gateway_max_producers:
            raise Failed(protocol.BUSY, f"the gateway holds {live} producer sessions "
                         "(BUS_GATEWAY_MAX_PRODUCERS)")
        loop = self.aio
        session = ProducerSession(self.config, producer_id, self.ctx,
                                  lambda decided: loop.call_soon_threadsafe(self._decided,
                                                                            decided),
                                  self.config.gateway_max_unacked)
        client.producers[producer_id] = session
        self.producer_sessions[f"{producer_id}#{client.number}"] = session
        self.session_owners[f"{producer_id}#{client.number}"] = client
        session.start()
        return session

    def _decided(self, decided: list[Decision]) -> None:
        for (client, request_id, size), seq, error in decided:
            client.unacked -= 1
            client.unacked_bytes -= size
            if error is None:
                self.published["stored"] += 1
                client.reply(request_id, {"seq": seq})
            else:
                self.published["refused"] += 1
                client.reply(request_id, error=error)

    # --- stats and shutdown -----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {"connections": {"open": len(self.clients), "accepted": self.accepted,
                                "closed": dict(self.closed)},
                "live": {"received": self.feed.received, "invalid": self.feed.invalid,
                         "unencodable": Encoded.unencodable, "delivery_failures": self.feed.failed,
                         "matched": self.feed.delivered, "prefixes": len(self.feed.index.sinks),
                         "groups": len(self.groups),
                         "last_commit_id": self.feed.last_commit_id,
                         "gave_up": self.feed.gave_up()},
                "messages_sent": self.messages_sent_closed + sum(c.sent_messages
                                                                 for c in self.clients),
                "buffered_bytes": sum(c.buffered() for c in self.clients),
                "published": dict(self.published),
                "producer_sessions": sum(1 for s in self.producer_sessions.values()
                                         if s.is_alive()),
                "requests": dict(self.requests),
                "tokens": {"dir": self.config.gateway_tokens_dir or None,
                           "count": len(self.tokens.by_hash), "problems": self.tokens.problems},
                "memory": {"rss": self.memory.rss, "limit": self.memory.limit},
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "listen": getattr(self, "address", None), "build": build_info()}

    def shutdown(self) -> None:
        aio = getattr(self, "aio", None)
        if aio is None:
            return
        if getattr(self, "server", None) is not None:
            aio.run_until_complete(self._close(self.config.shutdown_timeout_ms / 1000))
        for session in self.producer_sessions.values():
            session.stop()
        for session in self.producer_sessions.values():
            session.join(timeout=2)
        if getattr(self, "feed", None) is not None:
            self.feed.close()
        if getattr(self, "overview", None) is not None:
            self.overview.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        aio.remove_reader(self.stop.fileno())
        aio.close()
        self.ctx.term()

    async def _close(self, timeout_s: float) -> None:
        """Stop: no new connection; the publishes in flight answered (stored or
        refused) for up to half of `timeout_s`; then every connection closed
        with 1001, "going away"."""
        self.stopping = True
        self.server.close(close_connections=False)
        deadline = time.monotonic() + timeout_s / 2
        while any(c.unacked for c in self.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for client in list(self.clients):  # the answers already queued go first
            client.cut(CLOSE_GOING_AWAY, "going away", "the gateway stops", keep_outbox=True)
        try:
            await asyncio.wait_for(self.server.wait_closed(), max(0.1, timeout_s / 2))
        except TimeoutError:
            pass


# The console's files, read once: a request names one of them or gets 404
# (no path of the request ever reaches the file system).
CONSOLE_FILES = {entry.name: entry.read_bytes()
                 for entry in (resources.files("gateway") / "console").iterdir()
                 if entry.is_file()}

# A handler's answer that comes later (a publish's, once the writer decided).
DEFERRED = object()
