"""Socket setup for every role: types, binds/connects, high-water marks, timeouts.

Each function opens one socket of the architecture from the config, so the
options of a socket are read in one place:

    publishers  XPUB --connect--> pub_endpoint      (proxy SUB, bound)
    subscribers SUB  --connect--> sub_endpoint      (proxy PUB, bound)
    proxy       PUSH --connect--> capture_endpoint  (writer PULL, bound)
    edge proxy  SUB  --connect--> upstream          (another proxy's sub_endpoint;
                                                     its own sub_endpoint a PUB)
    clients     SUB  --connect--> notify_endpoint   (writer XPUB, bound: $bus.* notifications)
    clients     REQ  --connect--> control_endpoint  (writer ROUTER, bound)
    clients     REQ  --connect--> proxy_control_endpoint (proxy ROUTER, bound)
    clients     REQ  --connect--> read_endpoint     (reader ROUTER, bound)
    clients     REQ  --connect--> anchor_control_endpoint (anchor worker ROUTER, bound)
"""

from __future__ import annotations

import ctypes
import itertools
import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from bus import protocol, security
from bus.config import BusConfig, endpoints_of
from bus.logging import RateLimitedLog
from bus.runner import (MemoryLimit, Misconfigured, StartupError, inherited_sockets,
                        release_free_memory, resident_bytes)

# Inside the proxy process: the steerable proxy's control pipe.
PROXY_STEERING_ENDPOINT = "inproc://bus-proxy-steering"
# A subscription on the wire: "\x01" + prefix, or with ZMTP 3.1 peers (libzmq
# 4.3.5 and later) the SUBSCRIBE command, "\x09SUBSCRIBE" + prefix.
SUBSCRIPTION_OVERHEAD_BYTES = 10
# libzmq applies MAXMSGSIZE to every frame of a connection, the handshake's
# included: CURVE's INITIATE command (a few hundred bytes) must fit, and so must
# the encryption of each frame that follows.
MIN_FRAME_LIMIT_BYTES = 1024
# Largest frame a peer may send to the writer's notify endpoint: a subscription
# to "$bus.nack." + the longest producer id (128 chars of up to 4 UTF-8 bytes).
NOTIFY_MAX_FRAME_BYTES = max(MIN_FRAME_LIMIT_BYTES, SUBSCRIPTION_OVERHEAD_BYTES
                             + len(protocol.NACK_TOPIC_PREFIX) + 4 * protocol.MAX_PRODUCER_CHARS)
# Largest control request frame a control endpoint reads; a peer sending more is
# disconnected before it costs memory. The writer's take a utxo_upsert of 5,000
# outputs (about 1.5 MB); the reader's and the proxy's are small (64 history
# prefixes are about 17 KB). Decoded, msgpack's worst case is about 17 times
# its size once protocol.decode_request has bounded the containers.
MAX_REQUEST_BYTES = 4 << 20
MAX_SMALL_REQUEST_BYTES = 64 << 10
# What the writer's capture socket may queue, in bytes of the largest messages
# stored (see capture_receive_hwm).
CAPTURE_RECEIVE_BYTES = 64 << 20


# Replies a control endpoint queues for one connection before it drops the
# next: a REQ waits for each of its replies, so one is all it ever has
# queued. libzmq's default (1,000) let a client that sends `history` and never
# reads queue 1,000 pages of up to 4 MiB: the reader reached 1.9 GB against its
# 128 MiB limit before its memory guard cut every connection.
CONTROL_REPLIES_QUEUED = 4
# libc's srand (seed_routing_ids): libzmq takes its routing ids from rand().
_SRAND = getattr(ctypes.CDLL(None), "srand", None)
if _SRAND is not None:
    _SRAND.argtypes = [ctypes.c_uint]
    _SRAND.restype = None


class EndpointInUse(StartupError):
    """Another process already serves this endpoint."""


def bind(sock: zmq.Socket, endpoint: str, name: str | None = None,
         max_segment: int | None = None) -> None:
    """Bind, refusing an endpoint another process serves.

    `name`: the endpoint's socket-activation name (FileDescriptorName= of its
    `.socket` unit: pub, sub, control, notify, proxy_control, read,
    anchor_control, capture). When systemd passed a listening socket of that
    name (bus/runner.inherited_sockets), libzmq takes it over (ZMQ_USE_FD)
    instead of binding one of its own: the port stays bound by systemd while
    the process restarts, and nothing else can take it in that window. libzmq
    closes the fd it is given when the socket closes, so it gets a duplicate,
    and the process can bind the same socket again (the proxy's memory guard).

    tcp fails by itself (EADDRINUSE). For ipc, libzmq silently unlinks the
    other process's socket file and takes the path over, so a second writer or
    proxy would steal the first one's traffic: check for a listener first.

    `max_segment`: over tcp, the largest segment the peers may send
    (TCP_MAXSEG on the listening socket, which its connections inherit and
    announce), for a receive buffer too small to hold loopback's 64 KiB
    segments (open_writer_capture). libzmq has no option for it: the
    listening socket is made here and handed over as an inherited one is.

    Of a list (bus.config.endpoints_of: the writers of a standby pair), the
    first: this process's own; the others are the other writers'.
    """
    endpoint = endpoints_of(endpoint)[0]
    try:
        inherited = inherited_sockets().get(name) if name else None
        if inherited is not None:
            _check_inherited(inherited, endpoint, name)
            listener = os.dup(inherited)
            if max_segment and endpoint.startswith("tcp://"):
                _limit_segments(listener, max_segment)
            sock.setsockopt(zmq.USE_FD, listener)
            sock.bind(endpoint)
            return
        if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
            directory = os.path.dirname(endpoint[len("ipc://"):]) or "."
            if not os.path.isdir(directory):
                raise StartupError(f"{endpoint}: no directory {directory} (create it, writable "
                                   "by the bus's user alone, e.g. mode 0700)")
            if _unix_listener_at(endpoint[len("ipc://"):]):
                raise EndpointInUse(f"{endpoint} is in use by another process")
        try:
            if max_segment and endpoint.startswith("tcp://"):
                sock.setsockopt(zmq.USE_FD, _tcp_listener(sock, endpoint, max_segment))
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EADDRINUSE:
                raise EndpointInUse(f"{endpoint} is in use by another process") from None
            # Not an address of this host (EADDRNOTAVAIL), a path it may not
            # create (EACCES), ...: one line at start, not a crash.
            raise StartupError(f"{endpoint}: cannot bind: {zmq.strerror(exc.errno)}") from None
    except BaseException:
        # Nobody else holds the socket yet: left open, it would keep the
        # context from terminating, and the process from exiting.
        sock.close(linger=0)
        raise


def _limit_segments(fd: int, max_segment: int) -> None:
    with socket.socket(fileno=os.dup(fd)) as listener:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, max_segment)


def _tcp_listener(sock: zmq.Socket, endpoint: str, max_segment: int) -> int:
    """A listening socket where libzmq would bind tcp://HOST:PORT for `sock`,
    as libzmq makes one (SO_REUSEADDR, its ZMQ_BACKLOG), whose connections
    take segments of at most `max_segment` bytes; its fd. Failures are
    libzmq's errors (bind() words them)."""
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    # libzmq's own resolver says where HOST is (*, an address, a name, an
    # interface name; IPv4 unless ZMQ_IPV6): the proxy connects with it, and a
    # listener it would refuse (an IPv6 address) is one the proxy never reaches.
    probe = sock.context.socket(zmq.PULL)
    try:
        probe.setsockopt(zmq.LINGER, 0)
        probe.setsockopt(zmq.IPV6, sock.getsockopt(zmq.IPV6))
        probe.bind(f"tcp://{host}:0")  # a port of the kernel's choosing, at once let go
        address = probe.getsockopt(zmq.LAST_ENDPOINT).decode()[len("tcp://"):].rpartition(":")[0]
    finally:
        probe.close()
    family = socket.AF_INET6 if address.startswith("[") else socket.AF_INET
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise zmq.ZMQError(exc.errno) from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, max_segment)
        listener.bind((address.strip("[]"), int(port)))
        listener.listen(sock.getsockopt(zmq.BACKLOG))
    except OSError as exc:
        listener.close()
        raise zmq.ZMQError(exc.errno) from None
    return listener.detach()


def inherited_listener(name: str, endpoint: str) -> int | None:
    """The listening socket systemd passed as `name` (socket activation) for
    a server that is not libzmq's (the gateway's HTTP), checked to listen at
    `endpoint` (tcp://HOST:PORT); None when systemd passed none."""
    fd = inherited_sockets().get(name)
    if fd is not None:
        _check_inherited(fd, endpoint, name)
    return fd


def _check_inherited(fd: int, endpoint: str, name: str) -> None:
    """A socket systemd passed as `name` must listen where the config says
    the endpoint is: otherwise clients would look for the bus elsewhere."""
    with socket.socket(fileno=os.dup(fd)) as listener:
        local = listener.getsockname()
        listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        family = listener.family
    if family == socket.AF_UNIX:
        path = local.decode(errors="replace") if isinstance(local, bytes) else local
        where = f"ipc://{path}"
        matches = endpoint == where
    else:
        host, port = local[0], local[1]
        where = f"tcp://{'[' + host + ']' if family == socket.AF_INET6 else host}:{port}"
        wanted_host, _, wanted_port = endpoint[len("tcp://"):].rpartition(":")
        wanted_host = wanted_host.strip("[]")
        matches = endpoint.startswith("tcp://") and wanted_port == str(port) and (
            wanted_host in (host, "*", "localhost") or
            (wanted_host == "0.0.0.0" and host == "0.0.0.0"))
    if not listening:
        raise Misconfigured(f"the socket systemd passed as {name!r} ({where}) is not listening "
                           "(ListenStream= in its .socket unit)")
    if not matches:
        raise Misconfigured(f"the socket systemd passed as {name!r} listens on {where}, but "
                           f"the endpoint is {endpoint}: make the .socket unit's ListenStream= "
                           "and the bus.toml endpoint agree")


# Handshake failures after which libzmq 4.3 gives up on a connecting socket's
# endpoint for good (it never connects there again): the peer spoke another
# security mechanism (a NULL listener where a CURVE server should be), broke
# the protocol, or refused this socket's key. A bus process restarting leaves
# its port free for about RestartSec; whatever bound it meanwhile would end
# every client that met it. HANDSHAKE_FAILED_NO_DETAIL (the peer closed during
# the handshake: a CURVE server with another key) is retried by libzmq itself.
GIVES_UP_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
HANDSHAKE_EVENTS = GIVES_UP_EVENTS | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL \
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
# How soon an endpoint libzmq gave up on is connected again, doubling while
# the wrong peer stays (libzmq's own RECONNECT_IVL and RECONNECT_IVL_MAX).
REDIAL_MIN_S = 0.1
REDIAL_MAX_S = 1.0
# How long after a connecting socket's disconnect libzmq may take to say it
# retries (it says so at once: CONNECT_RETRIED) before it is taken as given up.
NOT_RETRIED_S = 0.5


def describe_handshake_failure(event: int, value: int) -> str:
    """What a HANDSHAKE_FAILED_* monitor event says of the peer."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the peer refused this socket's key (ZAP status {value})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return ("the peer speaks another security mechanism (a NULL listener where a "
                    "CURVE server was expected, or the reverse)")
        return f"the peer broke the ZeroMQ handshake (protocol error {value:#x})"
    return f"the peer closed the connection during the handshake (errno {value})"


# Open files a process needs besides its peers' connections: stdio, its
# sockets' mailboxes and monitors, libzmq's I/O thread and reaper, the ZAP
# handler, the database (file, WAL and -shm, or a PostgreSQL connection), the
# HTTP side, /proc/self/statm (measured: 19 to 36, with CURVE and HTTP on).
OWN_DESCRIPTORS = 64
# The monitor's queue of events. libzmq sends each event with a blocking
# zmq_msg_send (socket_base_t::monitor_event): with the queue full, the thread
# that emits it (the I/O thread) waits until update() reads. Two events a
# connection, a burst of thousands.
MONITOR_QUEUE_EVENTS = 100_000
# Events one update() reads at most: the loop must turn whatever arrives.
MONITOR_EVENTS_PER_UPDATE = 20_000
# How often a count above the cap is checked against the descriptors it names
# (a DISCONNECTED lost all the same would hold a place for ever).
RECOUNT_INTERVAL_S = 1.0


def descriptors_needed(max_connections: int, endpoints: int) -> int:
    """The open files a process with `endpoints` capped endpoints needs: each
    endpoint's cap twice (its connections, and as many accepted over the cap
    before the loop's next pass cuts them), and its own (OWN_DESCRIPTORS)."""
    return 2 * endpoints * max_connections + OWN_DESCRIPTORS


def connection_cap(cfg: BusConfig, endpoints: int, log: Any,
                   max_connections: int | None = None) -> int:
    """BUS_MAX_CONNECTIONS as this process's open-file limit (RLIMIT_NOFILE)
    allows, what Redis does with maxclients: the soft limit is raised as far
    as the hard one allows to what the cap needs (descriptors_needed); still
    short, the cap is lowered to fit, and a warning says so. systemd's units
    set the limit (LimitNOFILE=, deploy/systemd). A soft limit over 1,024 is
    safe here: nothing in these processes waits with select(2), which cannot
    take higher descriptors (libzmq uses epoll and poll, socketserver its
    PollSelector, psycopg's wait_c poll). `max_connections`: another cap
    than BUS_MAX_CONNECTIONS (the gateway's)."""
    max_connections = cfg.max_connections if max_connections is None else max_connections
    wanted = descriptors_needed(max_connections, endpoints)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_connections
    cap = (soft - OWN_DESCRIPTORS) // (2 * endpoints)
    if cap < 1:
        raise Misconfigured(f"the open-file limit ({soft}, hard {hard}) leaves no room for a "
                            f"connection: at least {descriptors_needed(1, endpoints)} needed "
                            "(LimitNOFILE= in the unit, ulimit -n)")
    log.warning("max_connections_lowered", max_connections=cap,
                wanted=max_connections, open_file_limit=soft, hard_limit=hard,
                needed=wanted, reason="the open-file limit is too low for BUS_MAX_CONNECTIONS "
                "on every endpoint: raise LimitNOFILE= (or ulimit -n) to the needed value")
    return cap


class Connections:
    """The peers connected to a bound socket, from its monitor (libzmq's
    ACCEPTED and DISCONNECTED events carry each connection's file
    descriptor). `drop_all()` shuts those connections down: libzmq then drops
    each peer's pipe, with what it queued and the subscriptions it held, while
    the socket goes on listening, so that no other process can take the
    endpoint meanwhile (closing and binding again left that window open). The
    peers reconnect by themselves.

    `max_connections` caps the connections of a bound socket. libzmq accepts
    every connection and has no option to refuse one (systemd's
    MaxConnections= is for Accept=yes sockets only, and here libzmq accepts):
    `update()` counts them from the events and shuts the newest above the cap
    down at once, before it costs more than its descriptor. libzmq reads EOF on
    it, emits DISCONNECTED and closes it itself. Each one is counted
    (`refused`) and logged at most every 5 s. (Accepts that fail, EMFILE with
    the table full, are not watched: libzmq retries a failed accept at once,
    in a loop, and an event each would flood the monitor.)

    For a connecting socket (`connected=True`) it also watches the handshakes:
    after a failure libzmq gives up on (GIVES_UP_EVENTS), `gave_up` says why,
    and `redial()` connects the endpoint again (disconnect + connect: the
    socket, its options and subscriptions stay; the dead connection's queue is
    gone). The socket's owner calls `redial()` once `redial_due(now)`: the
    wrong peer may still be there, so redials back off from REDIAL_MIN_S to
    REDIAL_MAX_S until a handshake succeeds.

    The monitor is attached before the socket binds or connects (no event
    missed; the `on_open` hook of the open_* functions) and before another
    thread uses it (the proxy's forwarding loop): libzmq sockets are not
    thread-safe. After that, nothing here touches the socket itself: only its
    monitor and the connections' descriptors, so a thread that does not own
    the socket may read the events and cut connections (but `unwatch()`, for
    the owner about to close it). `update()` reads the events; a role calls it
    once per pass."""

    def __init__(self, sock: zmq.Socket, endpoint: str, connected: bool = False,
                 max_connections: int = 0, log: Any = None, name: str = "") -> None:
        """`connected`: the socket connects (its CONNECTED events are counted
        instead): whether its peer is there, not for dropping. `max_connections`
        (0: none): the cap of a bound socket; `log` and `name` say so when it
        cuts a connection."""
        self.endpoint = endpoint
        # A connecting socket may connect to several (the writers of a
        # standby pair: bus.config.endpoints_of); one of them serves.
        self.endpoints = connect_endpoints(endpoint) if connected else [endpoint]
        self.name = name or endpoint
        # Open connections by descriptor, oldest first (a dict keeps the order).
        self.fds: dict[int, None] = {}
        self.connected = connected
        self.max_connections = 0 if connected else max_connections
        self.refused = 0                  # connections cut above the cap
        self._log = RateLimitedLog(log) if log is not None else None
        self._next_recount = 0.0
        self._opened = zmq.EVENT_CONNECTED if connected else zmq.EVENT_ACCEPTED
        self.monitor = _monitor_socket(
            sock, self._opened | zmq.EVENT_DISCONNECTED |
            (HANDSHAKE_EVENTS | zmq.EVENT_CONNECT_RETRIED if connected else 0))
        # update() looks for events once per pass of its role's loop: a poller
        # built once, not the Poller that monitor.poll() builds at each call
        # (1.7 -> 0.8 us a look).
        self._events = zmq.Poller()
        self._events.register(self.monitor, zmq.POLLIN)
        self._family = socket.AF_UNIX if endpoint.startswith("ipc://") else (
            socket.AF_INET6 if endpoint.startswith("tcp://[") else socket.AF_INET)
        # Where the bound socket listens, as its ACCEPTED events say (its
        # LAST_ENDPOINT, read without touching the socket).
        self._listening_at: str | None = None
        self._sock = sock
        # Why libzmq gave up on an endpoint, by the endpoint its events name,
        # until redial().
        self._gave_up: dict[str, str] = {}
        # The endpoints (as events name them) whose peer completed the ZMTP
        # handshake (a CONNECTED peer may still be a wrong one) and has not
        # disconnected since; and whether the last handshake failed (libzmq
        # retries some failures by itself, HANDSHAKE_FAILED_NO_DETAIL: a CURVE
        # server of another key).
        self._handshaken: dict[str, None] = {}  # in the order they succeeded
        self.failing = False
        self.superseded = 0  # older writers' connections dropped for a newer one (stale())
        self.wrong_peers = 0              # handshakes that failed (every kind)
        self.last_wrong_peer: str | None = None
        self.redials = 0
        self._redial_at = 0.0
        self._backoff = REDIAL_MIN_S
        # A connecting socket's connection ended, and libzmq has not said that
        # it will connect again (CONNECT_RETRIED, at once after an ordinary
        # disconnect): after a protocol error (a frame over MAXMSGSIZE, a
        # malformed frame from whatever answers there) it never will.
        # By endpoint (several: each its own), when it dropped.
        self._dropped: dict[str, float] = {}

    @property
    def handshaken(self) -> bool:
        """A peer completed its handshake and is still there."""
        return bool(self._handshaken)

    @property
    def gave_up(self) -> str | None:
        """Why libzmq gave up on the endpoint (None: it did not). Of several,
        only while none is handshaken: a socket connected to several queues
        only for a live peer (bus.sockets.connect), so one endpoint's wrong
        peer blocks nothing while another serves (it is redialed all the
        same)."""
        if not self._gave_up or (len(self.endpoints) > 1 and self._handshaken):
            return None
        return next(iter(self._gave_up.values()))

    def update(self) -> None:
        for _ in range(MONITOR_EVENTS_PER_UPDATE):
            if not self._events.poll(0):
                break
            message = recv_monitor_message(self.monitor)
            event, value = message["event"], message["value"]
            at = message["endpoint"].decode(errors="replace")
            if event == self._opened:
                self.fds.pop(value, None)  # a descriptor reused: the newest again
                self.fds[value] = None
                self._dropped.pop(at, None)
                if not self.connected:
                    self._listening_at = at
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self._dropped.pop(at, None)
            elif event == zmq.EVENT_DISCONNECTED:
                self.fds.pop(value, None)
                self._handshaken.pop(at, None)
                if self.connected and at not in self._gave_up:
                    self._dropped[at] = time.monotonic()
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._backoff = REDIAL_MIN_S
                self._handshaken.pop(at, None)
                self._handshaken[at] = None
                self.failing = False
            elif event & HANDSHAKE_EVENTS:
                self._handshaken.pop(at, None)
                self.failing = True
                self._wrong_peer(describe_handshake_failure(event, value), at,
                                 gives_up=bool(event & GIVES_UP_EVENTS))
        for at, dropped_at in list(self._dropped.items()):
            if time.monotonic() - dropped_at >= NOT_RETRIED_S:
                del self._dropped[at]
                self._wrong_peer("disconnected for a protocol error (a frame too large or "
                                 "malformed), not retried", at, gives_up=True)
        if self.max_connections and len(self.fds) > self.max_connections:
            self._cut_over_cap()

    def _cut_over_cap(self) -> None:
        """Shut down the newest connections above the cap (see the class doc)."""
        now = time.monotonic()
        if now >= self._next_recount:  # no place held by a descriptor closed unseen
            self._next_recount = now + RECOUNT_INTERVAL_S
            for fd in [fd for fd in self.fds if not self._shut_down(fd, check_only=True)]:
                del self.fds[fd]
        over = len(self.fds) - self.max_connections
        if over <= 0:
            return
        newest = list(self.fds)[-over:]
        for fd in newest:
            self._shut_down(fd)
            del self.fds[fd]  # its DISCONNECTED is on its way; it holds no place
        self.refused += over
        if self._log is not None:
            self._log.warning(f"over BUS_MAX_CONNECTIONS on {self.name}", "connection_refused",
                              endpoint=self.name,
                              max_connections=self.max_connections, refused_now=over,
                              refused_total=self.refused, action="shut the newest down")

    def _wrong_peer(self, why: str, at: str, gives_up: bool) -> None:
        """Count a wrong peer (at endpoint `at`); if libzmq gave up on the
        endpoint, a redial is due after the backoff, which doubles while the
        wrong peer stays."""
        self.wrong_peers += 1
        self.last_wrong_peer = why
        if gives_up and at not in self._gave_up:
            if not self._gave_up:
                self._redial_at = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, REDIAL_MAX_S)
            self._gave_up[at] = why

    def redial_due(self, now: float) -> bool:
        return bool(self._gave_up) and now >= self._redial_at

    def redial(self) -> None:
        """Connect again the endpoints libzmq gave up on (the owner's thread,
        see the class doc): those the events named, or, where the events name
        an endpoint otherwise (a host name resolved), every one not
        handshaken."""
        self._connect_again([e for e in self.endpoints if e in self._gave_up] or
                            [e for e in self.endpoints if e not in self._handshaken])
        self._gave_up.clear()
        self.redials += 1

    def _connect_again(self, endpoints: list[str]) -> None:
        """Disconnect and connect each of `endpoints`: its connection, and
        what was queued on it, go (the socket, its options and subscriptions
        stay)."""
        for endpoint in endpoints:
            with contextlib.suppress(zmq.ZMQError):  # libzmq forgot it already
                self._sock.disconnect(endpoint)
            self._sock.connect(endpoint)
            self._handshaken.pop(endpoint, None)

    def stale(self) -> list[str]:
        """Of several endpoints handshaken (writers of a standby pair), those
        before the newest. A standby binds only once it holds the writer's
        lock, so the newest is the writer that holds it, and an older one is
        a writer that lost it (frozen, cut off, about to find out and exit):
        what was sent there would be lost."""
        return list(self._handshaken)[:-1]

    def drop_stale(self) -> list[str]:
        """Connect the stale() endpoints again (the owner's thread): their
        connections, and what was queued on them, go; a writer there that
        still serves completes a new handshake, and becomes the newest."""
        stale = self.stale()
        dropped = [e for e in stale if e in self.endpoints]
        self._connect_again(dropped)
        for endpoint in stale:  # those named otherwise too: not asked again
            self._handshaken.pop(endpoint, None)
        self.superseded += len(dropped)
        return dropped

    def snapshot(self) -> dict[str, Any]:
        return {"wrong_peers": self.wrong_peers, "redials": self.redials,
                "last_wrong_peer": self.last_wrong_peer, "superseded": self.superseded}

    def counts(self) -> dict[str, int]:
        """A bound endpoint's connections: open now, the cap, and how many were
        cut above it (stats' `connections`)."""
        return {"open": len(self.fds), "max": self.max_connections, "refused": self.refused}

    def drop_all(self) -> int:
        """Shut every connection down; how many were."""
        self.update()
        return sum(self._shut_down(fd) for fd in list(self.fds))

    def cut(self, fd: int) -> bool:
        """Shut down one connection of this socket (an fd from `fds`); False if
        it is not, or no longer, one of them (see _shut_down)."""
        return self._shut_down(fd)

    def _shut_down(self, fd: int, check_only: bool = False) -> bool:
        """shutdown(2) a connection libzmq accepted, on its own descriptor:
        a duplicate would need a free one, and a full table is when a cut is
        needed most. The descriptor stays libzmq's (detached, never closed
        here). False if it is not, or no longer, one of this socket's
        connections (closed since; reused by something else)."""
        try:
            peer = socket.socket(fileno=fd)
        except OSError:  # closed since (its DISCONNECTED is on its way), or not a socket
            return False
        try:
            if not self._is_ours(peer):
                return False
            if not check_only:
                peer.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            peer.detach()

    def _is_ours(self, peer: socket.socket) -> bool:
        bound = self._listening_at
        if bound is None or peer.family != self._family or peer.type != socket.SOCK_STREAM:
            return False
        local = peer.getsockname()
        if self._family == socket.AF_UNIX:  # a path, or an abstract name (bytes, from \0)
            name = local.replace(b"\0", b"@", 1).decode(errors="replace") \
                if isinstance(local, bytes) else local
            return bool(name) and bound == f"ipc://{name}"
        return bound.endswith(f":{local[1]}")

    def close(self) -> None:
        self.monitor.close(linger=0)
        self._sock = None  # the socket is its owner's to close

    def unwatch(self) -> None:
        """Stop the socket's monitor, then close ours: for the socket's owner,
        before it closes the socket while the process goes on (the proxy's
        memory guard). libzmq sends each event with a blocking send, from the
        I/O thread that accepts or drops a connection; to a monitor whose
        reader is closed, that send never returns, and the thread stops for
        good. disable_monitor() takes libzmq's monitor lock: no event is on its
        way once it returns, and none is sent after."""
        if self._sock is not None and not self._sock.closed:
            self._sock.disable_monitor()
        self.close()


_MONITOR_NUMBERS = itertools.count()


def _monitor_socket(sock: zmq.Socket, events: int) -> zmq.Socket:
    """pyzmq's get_monitor_socket, with a receive queue of
    MONITOR_QUEUE_EVENTS (libzmq's default is 1,000).

    Never MONITOR_STOPPED among `events`: libzmq sends it from the socket's
    destructor, in its reaper thread, with a blocking send. A socket closed
    after its monitor's reader (the proxy's cut-off did so) blocked the reaper
    for good: no socket of the context was closed after that, their listeners
    kept their ports and their connections kept reading into queues nobody
    read (issue: the proxy grew to 850 MB and could not bind again)."""
    address = f"inproc://bus-monitor-{os.getpid()}-{next(_MONITOR_NUMBERS)}"
    sock.monitor(address, events)
    monitor = sock.context.socket(zmq.PAIR)
    monitor.setsockopt(zmq.RCVHWM, MONITOR_QUEUE_EVENTS)
    monitor.connect(address)
    return monitor


class PeerMemoryGuard:
    """A process's memory limit, held by dropping its peers: over the limit
    (bus/runner.MemoryLimit), every connection of the bound sockets it
    watches is shut down (Connections.drop_all). What libzmq holds for peers
    and no count or budget reaches (a multipart message or request of endless
    frames, a burst of subscriptions) goes with them; the sockets keep
    listening and the peers reconnect.

    It also holds each watched socket to `max_connections` (connection_cap:
    BUS_MAX_CONNECTIONS as the open-file limit allows; 0: none)."""

    def __init__(self, limit_bytes: int, log: Any, max_connections: int = 0) -> None:
        self.memory = MemoryLimit(limit_bytes)
        self.peers: dict[str, Connections] = {}
        self.cutoffs = 0
        self.max_connections = max_connections
        self._log = log

    def watch(self, name: str, endpoint: str) -> Callable[[zmq.Socket], None]:
        """An `on_open` hook for an open_* function."""
        return lambda sock: self.peers.__setitem__(name, Connections(
            sock, endpoint, max_connections=self.max_connections, log=self._log, name=name))

    def check(self, now: float) -> bool:
        """Once per loop pass; True if the peers were just dropped."""
        for peers in self.peers.values():
            peers.update()
        if not self.memory.exceeded(now):
            return False
        self.cutoffs += 1
        dropped = {name: peers.drop_all() for name, peers in self.peers.items()}
        self._log.warning("memory_limit_reached", action="dropped connections",
                          connections=dropped, rss_bytes=self.memory.rss,
                          limit_bytes=self.memory.limit)
        release_free_memory()
        return True

    def snapshot(self) -> dict[str, int]:
        return {"rss_bytes": resident_bytes(), "limit_bytes": self.memory.limit,
                "cutoffs": self.cutoffs}

    def connections(self) -> dict[str, dict[str, int]]:
        """Each watched endpoint's Connections.counts() (stats' `connections`)."""
        return {name: peers.counts() for name, peers in self.peers.items()}

    def close(self) -> None:
        for peers in self.peers.values():
            peers.close()


def _unix_listener_at(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False  # a stale file: libzmq replaces it
    return True


OnOpen = Callable[[zmq.Socket], Any] | None


# Each new connection attempt of a client is given up after CONNECT_TIMEOUT_MS
# (then tried again after RECONNECT_IVL), not the kernel's SYN backoff (up to
# 2 minutes to a host whose link was down); and its TCP keepalives find, in
# about a minute, a connection whose peer's host restarted or vanished (a SUB
# sends nothing on its own, so nothing else would ever reset it).
#
# Not ZMTP heartbeats (ZMQ_HEARTBEAT_IVL/TIMEOUT), tried and taken out: under
# load, a heartbeat timeout on a connection with a large message in flight
# made libzmq 4.3.5 abort the client process ("Assertion failed: !_io_error
# (src/stream_engine_base.cpp:310)", tests/test_hostile.py's writer-down test,
# reproduced with the machine loaded); and on a data subscriber a connection
# given up and made again misses what passes before its subscription is back.
CONNECT_TIMEOUT_MS = 1000
CLIENT_KEEPALIVE_IDLE_S, CLIENT_KEEPALIVE_INTVL_S, CLIENT_KEEPALIVE_CNT = 30, 5, 6


def _set_common(sock: zmq.Socket, linger_ms: int) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, linger_ms)
    # Reconnect quickly after a restart of the peer, backing off to 1 s.
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    return sock


def _set_client(sock: zmq.Socket, linger_ms: int) -> zmq.Socket:
    """_set_common, and for a socket that connects, maybe across hosts: the
    connect timeout and TCP keepalives (CONNECT_TIMEOUT_MS)."""
    _set_common(sock, linger_ms)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, CLIENT_KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, CLIENT_KEEPALIVE_INTVL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, CLIENT_KEEPALIVE_CNT)
    return sock


# --- proxy -------------------------------------------------------------------

def open_proxy_frontend(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    """SUB bound for publishers, subscribed to every first byte a storable topic
    can have (protocol.PROXY_SUBSCRIPTIONS), so a message with no live
    subscriber still reaches the capture pipe. A SUB, not an XSUB: it filters
    what it receives by these subscriptions, so a reserved topic ("$bus.ack...")
    or a frame starting with a control byte sent by any client, however it
    was built, never gets into the proxy; and no subscriber can change them."""
    sock = _set_common(ctx.socket(zmq.SUB), 0)
    sock.setsockopt(zmq.RCVHWM, cfg.pub_hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, cfg.proxy_max_frame_bytes)
    for prefix in protocol.PROXY_SUBSCRIPTIONS:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    security.secure_server(sock, cfg, "pub")
    if on_open is not None:
        on_open(sock)
    bind(sock, cfg.pub_endpoint, "pub")
    return sock


def open_proxy_backend(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    """PUB bound for subscribers. A PUB, not an XPUB: it applies subscriptions
    itself and passes nothing to the proxy loop, so neither a subscription nor
    data sent by a peer on this side reaches publishers or the writer. A
    subscription much longer than a topic can be is refused (the peer is
    disconnected): it could never match, and libzmq's subscription trie is
    recursive in the prefix length. An edge proxy's too (open_edge_upstream:
    what its subscribers send stays here)."""
    sock = _set_common(ctx.socket(zmq.PUB), 0)
    sock.setsockopt(zmq.SNDHWM, cfg.sub_hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max(MIN_FRAME_LIMIT_BYTES,
                                        cfg.max_topic_bytes + SUBSCRIPTION_OVERHEAD_BYTES))
    security.secure_server(sock, cfg, "sub")
    if on_open is not None:
        on_open(sock)
    bind(sock, cfg.sub_endpoint, "sub")
    return sock


def open_edge_upstream(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    """An edge proxy's publisher side: a SUB connected to the upstream proxy's
    subscriber endpoint (BUS_PROXY_UPSTREAM), as a subscriber of it (with
    CURVE, this process's BUS_CURVE_KEY, a key of readers/), subscribed to
    every first byte a storable topic can have, as the main proxy's frontend
    is: a reserved `$` topic never passes an edge either.

    A SUB and a PUB, not libzmq's XSUB/XPUB chain: an XPUB passes up
    whatever its peers send, so each edge subscriber's subscribe and
    unsubscribe churn, and any data frame, reached the upstream on the
    edge's one connection, where the subscription budget counts every byte
    a connection ever sent: one local subscriber got the edge cut off, and
    every subscriber of it with it, again and again (an XSUB also dropped
    what it re-sends past its high-water mark, 1,000 subscriptions, after
    each reconnect). So an edge takes the whole stream and filters for its
    subscribers itself (docs/protocol.md, "Edge proxies")."""
    sock = _set_client(ctx.socket(zmq.SUB), 0)
    sock.setsockopt(zmq.RCVHWM, cfg.sub_hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, cfg.proxy_max_frame_bytes)
    for prefix in protocol.PROXY_SUBSCRIPTIONS:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    security.secure_client(sock, security.client_keys(cfg))
    if on_open is not None:
        on_open(sock)
    sock.connect(cfg.upstream)
    return sock


def open_proxy_capture(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    """PUSH connected to the writer. Its pipe outlives writer restarts and holds
    up to capture_hwm messages; past that the proxy's send blocks (backpressure).
    While no writer is connected, the proxy holds the rest itself
    (proxy/capture.py: the spill).

    Kept short on purpose (fairness, issue 22): the capture queue is first in,
    first out, whoever sent what is in it. When the writer cannot keep up, the
    proxy's loop waits in its capture send and the rest queues in the
    publishers' own pipes at the proxy's SUB, which libzmq reads in turn, a
    message from each (fair queuing): a publisher that floods fills its own
    pipe, and another's message waits behind at most this short queue. A long
    one (BUS_CAPTURE_HWM=1000000 before) put a flood's seconds of work in front
    of everybody. The kernel's socket buffers at both ends are part of the
    same queue (capture_buffer_bytes, 16 KiB: the kernel doubles it, so about
    2,000 of the smallest messages in all; 4 MiB before held 280,000 and
    more, seconds of the writer's work). Over tcp, the writer's end takes
    segments that such a window holds (capture_max_segment)."""
    sock = _set_common(ctx.socket(zmq.PUSH), cfg.shutdown_timeout_ms)
    # A writer on another host (a standby pair) that its network lost: each
    # new attempt given up after a second, not the kernel's SYN backoff.
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    sock.setsockopt(zmq.SNDHWM, cfg.capture_hwm)
    sock.setsockopt(zmq.SNDBUF, cfg.capture_buffer_bytes)
    security.check_capture_directory(cfg)  # nobody else's socket can be at the path
    if security.enabled(cfg) and not security.capture_by_file_permissions(cfg):
        # The only key the writer's capture lets in.
        security.secure_client(sock, security.client_keys(
            cfg, own_key=f"{cfg.curve_dir}/proxy.key_secret"))
    if on_open is not None:
        on_open(sock)
    connect(sock, cfg.capture_endpoint)
    return sock


def seed_routing_ids() -> None:
    """libzmq names a ROUTER's peers 0x00 + a counter that starts at libc's
    rand(), which libzmq does not seed in this build (glibc starts from 1):
    a peer that took the next few names as its own ROUTING_ID made libzmq
    abort the process (add_out_pipe's assertion) at the next plain
    connection, with no message sent. Seeded from os.urandom before each
    ROUTER is made, the counter starts at one of 2^32 values, which a peer
    cannot learn (tests/test_hostile.py)."""
    if _SRAND is not None:
        _SRAND(int.from_bytes(os.urandom(4), "little"))


def open_reply(ctx: zmq.Context, cfg: BusConfig, endpoint: str, domain: str,
               max_request_bytes: int = MAX_SMALL_REQUEST_BYTES,
               on_open: OnOpen = None) -> zmq.Socket:
    """ROUTER bound for control requests (proxy, writer, reader, anchor
    worker), answered by bus/control.Dispatcher.serve: a ROUTER, not a REP,
    so that no message a client sends can block the process or lose another
    client's reply (see serve)."""
    seed_routing_ids()
    sock = _set_common(ctx.socket(zmq.ROUTER), 0)
    sock.setsockopt(zmq.SNDHWM, CONTROL_REPLIES_QUEUED)
    sock.setsockopt(zmq.MAXMSGSIZE, max_request_bytes)
    security.secure_server(sock, cfg, domain)
    if on_open is not None:
        on_open(sock)
    bind(sock, endpoint, domain)
    return sock


def open_proxy_control(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    return open_reply(ctx, cfg, cfg.proxy_control_endpoint, "proxy_control", on_open=on_open)


# --- writer ------------------------------------------------------------------

def capture_receive_hwm(cfg: BusConfig) -> int:
    """Messages the writer's capture queues: CAPTURE_RECEIVE_BYTES of messages
    of the largest size stored, at least 100 (a libzmq queue counts messages,
    not bytes)."""
    return max(100, min(cfg.batch_max_buffer_size, CAPTURE_RECEIVE_BYTES // cfg.max_message_bytes))


def capture_max_segment(cfg: BusConfig) -> int:
    """The largest TCP segment of the capture connection: a quarter of its
    receive buffer (Linux doubles BUS_CAPTURE_BUFFER_BYTES and offers half
    of that as the window), within what TCP_MAXSEG takes (536 to 32,767).
    The window must hold whole segments: with loopback's 65,483-byte ones
    and 16 KiB buffers, once the writer had paused, the proxy's kernel sent
    the rest only on its zero-window probe timer (200 ms, backing off), and
    the capture stalled for 1.5 to 198 s at 40,000 msg/s (issue 26)."""
    return max(536, min(32_767, cfg.capture_buffer_bytes // 4))


def open_writer_capture(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    """PULL bound for the proxy's capture pipe. A small receive queue: what the
    writer has not read stays in the proxy's restart-proof queue, then in the
    publishers' pipes at the proxy (see open_proxy_capture)."""
    sock = _set_common(ctx.socket(zmq.PULL), 0)
    sock.setsockopt(zmq.RCVHWM, capture_receive_hwm(cfg))
    sock.setsockopt(zmq.RCVBUF, cfg.capture_buffer_bytes)
    # The proxy passes no larger frame; a peer pushing one straight in is
    # disconnected before the frame costs memory.
    sock.setsockopt(zmq.MAXMSGSIZE, max(MIN_FRAME_LIMIT_BYTES, cfg.proxy_max_frame_bytes))
    if on_open is not None:
        on_open(sock)
    if not security.capture_by_file_permissions(cfg):
        security.secure_server(sock, cfg, "capture")
        bind(sock, cfg.capture_endpoint, "capture", capture_max_segment(cfg))
        return sock
    security.check_capture_directory(cfg)
    # libzmq creates the socket file inside zmq_bind, with the process's umask:
    # owner-only from its first moment, no window for another user to connect.
    umask = os.umask(0o177)
    try:
        bind(sock, cfg.capture_endpoint, "capture")
    finally:
        os.umask(umask)
    return sock


def open_writer_control(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    return open_reply(ctx, cfg, cfg.control_endpoint, "control", MAX_REQUEST_BYTES, on_open=on_open)


def open_writer_notify(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    """XPUB bound for the $bus.* notifications (acknowledgements, nacks, the
    commit watermark): only the writer binds it, so nothing else can send them.
    VERBOSER passes every subscription to the writer, duplicates too, and every
    unsubscription (a disconnect's included): each new acknowledgement
    subscription is answered with the producer's current acknowledgement, which
    tells its client that the path works, and the writer keeps the
    subscriptions' bytes within a budget. It drops for a
    subscriber whose queue is full instead of blocking the writer, and the next
    notification supersedes a dropped one (they carry watermarks); a frame longer
    than any notification topic's subscription disconnects its peer."""
    sock = _set_common(ctx.socket(zmq.XPUB), 1000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.XPUB_VERBOSER, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, NOTIFY_MAX_FRAME_BYTES)
    security.secure_server(sock, cfg, "notify")
    if on_open is not None:
        on_open(sock)
    bind(sock, cfg.notify_endpoint, "notify")
    return sock


# --- reader ------------------------------------------------------------------

def open_reader(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    return open_reply(ctx, cfg, cfg.read_endpoint, "read", on_open=on_open)


# --- anchor worker -------------------------------------------------------------

def open_anchor_control(ctx: zmq.Context, cfg: BusConfig, on_open: OnOpen = None) -> zmq.Socket:
    return open_reply(ctx, cfg, cfg.anchor_control_endpoint, "anchor_control", on_open=on_open)


# --- clients -----------------------------------------------------------------

def connect_endpoints(value: str) -> list[str]:
    """The endpoints a socket given `value` connects to. One: as given. Several
    (bus.config.endpoints_of): each host name resolved to its address, as
    libzmq's events name a connection once it reconnected (Connections keys
    its peers by them), and aliases of one address taken once."""
    endpoints = endpoints_of(value)
    if len(endpoints) == 1:
        return endpoints
    resolved: dict[str, None] = {}
    for endpoint in endpoints:
        resolved[_resolved(endpoint)] = None
    return list(resolved)


def _resolved(endpoint: str) -> str:
    """tcp://HOST:PORT with HOST's first address (IPv4 first), or as it was
    where HOST is an address already or does not resolve now (libzmq tries
    again itself)."""
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if host.startswith("["):
        return endpoint
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return endpoint
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    address = infos[0][4][0]
    return f"tcp://{address}:{port}" if infos[0][0] == socket.AF_INET \
        else f"tcp://[{address}]:{port}"


def connect(sock: zmq.Socket, value: str) -> None:
    """Connect to each endpoint of `value` (connect_endpoints). To several
    (writers on several hosts, one of them serving), a message is queued only
    for a connection that is made (ZMQ_IMMEDIATE): none waits for a writer
    that is not there."""
    endpoints = connect_endpoints(value)
    if len(endpoints) > 1:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    for endpoint in endpoints:
        sock.connect(endpoint)


def open_publisher(ctx: zmq.Context, cfg: BusConfig, linger_ms: int,
                   on_open: OnOpen = None) -> zmq.Socket:
    """XPUB (not PUB) so the client sees the proxy's subscriptions arrive and
    can hold its first message until then (the slow-joiner fix). NODROP turns
    a full queue into backpressure instead of silent loss."""
    sock = _set_client(ctx.socket(zmq.XPUB), linger_ms)
    sock.setsockopt(zmq.SNDHWM, cfg.pub_hwm)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    security.secure_client(sock, security.client_keys(cfg))
    if on_open is not None:
        on_open(sock)
    sock.connect(cfg.pub_endpoint)
    return sock


def open_subscriber(ctx: zmq.Context, cfg: BusConfig, prefixes: list[bytes],
                    endpoint: str | None = None, on_open: OnOpen = None) -> zmq.Socket:
    """SUB to the proxy's data (sub_endpoint), or to the writer's notifications
    (endpoint=cfg.notify_endpoint)."""
    sock = _set_client(ctx.socket(zmq.SUB), 0)
    sock.setsockopt(zmq.RCVHWM, cfg.sub_hwm)
    for prefix in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    security.secure_client(sock, security.client_keys(cfg))
    if on_open is not None:
        on_open(sock)
    connect(sock, endpoint or cfg.sub_endpoint)
    return sock


def open_request(ctx: zmq.Context, endpoint: str,
                 keys: security.ClientKeys | None = None, on_open: OnOpen = None) -> zmq.Socket:
    sock = _set_client(ctx.socket(zmq.REQ), 0)
    security.secure_client(sock, keys)
    if on_open is not None:
        on_open(sock)
    connect(sock, endpoint)
    return sock


class PeerWatch:
    """The client side's use of Connections: a connecting socket's handshakes,
    watched from `attach` (an `on_open` hook) on; `check()` connects again an
    endpoint libzmq gave up on (its owner calls it wherever it reads the
    socket). True when it did."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.connections: Connections | None = None

    def attach(self, sock: zmq.Socket) -> None:
        if self.connections is not None:
            self.connections.close()
        self.connections = Connections(sock, self.endpoint, connected=True)

    @property
    def monitor(self) -> zmq.Socket | None:
        return None if self.connections is None else self.connections.monitor

    def check(self, now: float | None = None) -> bool:
        connections = self.connections
        if connections is None:
            return False
        connections.update()
        if connections.redial_due(time.monotonic() if now is None else now):
            connections.redial()
            return True
        return False

    def gave_up(self) -> bool:
        """Whether libzmq gave up on the endpoint (the events read first)."""
        if self.connections is None:
            return False
        self.connections.update()
        return self.connections.gave_up is not None

    @property
    def redials(self) -> int:
        return 0 if self.connections is None else self.connections.redials

    def close(self) -> None:
        if self.connections is not None:
            self.connections.close()
            self.connections = None


def handshake_error(ctx: zmq.Context, cfg: BusConfig, endpoint: str,
                    timeout_s: float) -> str | None:
    """None once a ZeroMQ server at `endpoint` completes a handshake with this
    config's keys, else what went wrong. For the endpoints that answer no ping
    (the proxy's subscriber side, the writer's notifications): a SUB socket
    connecting to nothing waits silently forever."""
    sock = _set_common(ctx.socket(zmq.SUB), 0)
    events = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    monitor = sock.get_monitor_socket(events)  # before connect: no event is missed
    try:
        security.secure_client(sock, security.client_keys(cfg))
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(remaining * 1000) + 1):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return None
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "it refused this CURVE key"
            return "the handshake failed (not a ZeroMQ server of this bus, or CURVE " \
                   "settings differ)"
        return f"nothing a subscriber can connect to answered within {timeout_s:g}s"
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
