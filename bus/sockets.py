"""Socket setup for every role: types, binds/connects, high-water marks, timeouts.

Each function opens one socket of the architecture from the config, so the
options of a socket are read in one place:

    publishers  XPUB --connect--> pub_endpoint      (proxy XSUB, bound)
    subscribers SUB  --connect--> sub_endpoint      (proxy XPUB, bound)
    proxy       PUSH --connect--> capture_endpoint  (writer PULL, bound)
    writer      PUB  --connect--> pub_endpoint      ($bus.* notifications)
    clients     REQ  --connect--> control_endpoint  (writer REP, bound)
    clients     REQ  --connect--> proxy_control_endpoint (proxy REP, bound)
    clients     REQ  --connect--> read_endpoint     (reader REP, bound)
"""

from __future__ import annotations

import os
import socket

import zmq

from bus.config import BusConfig
from bus.runner import StartupError

# Inside the proxy process: the steerable proxy's control pipe.
PROXY_STEERING_ENDPOINT = "inproc://bus-proxy-steering"


class EndpointInUse(StartupError):
    """Another process already serves this endpoint."""


def bind(sock: zmq.Socket, endpoint: str) -> None:
    """Bind, refusing an endpoint another process serves.

    tcp fails by itself (EADDRINUSE). For ipc, libzmq silently unlinks the
    other process's socket file and takes the path over, so a second writer or
    proxy would steal the first one's traffic: check for a listener first.
    """
    if endpoint.startswith("ipc://") and _unix_listener_at(endpoint[len("ipc://"):]):
        raise EndpointInUse(f"{endpoint} is in use by another process")
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EADDRINUSE:
            raise EndpointInUse(f"{endpoint} is in use by another process") from None
        raise


def _unix_listener_at(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False  # a stale file: libzmq replaces it
    return True


def _set_common(sock: zmq.Socket, linger_ms: int) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, linger_ms)
    # Reconnect quickly after a restart of the peer, backing off to 1 s.
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    return sock


# --- proxy -------------------------------------------------------------------

def open_proxy_frontend(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    """XSUB bound for publishers; subscribed upstream to everything."""
    sock = _set_common(ctx.socket(zmq.XSUB), 0)
    sock.setsockopt(zmq.RCVHWM, cfg.pub_hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, cfg.proxy_max_frame_bytes)
    bind(sock, cfg.pub_endpoint)
    # Subscribe to everything so that a message with no live subscriber still
    # reaches the capture pipe. XSUB refcounts prefixes, so a subscriber's own
    # "" unsubscribe never cancels this one.
    sock.send(b"\x01")
    return sock


def open_proxy_backend(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    """XPUB bound for subscribers; every (un)subscription is passed on (VERBOSER)."""
    sock = _set_common(ctx.socket(zmq.XPUB), 0)
    sock.setsockopt(zmq.SNDHWM, cfg.sub_hwm)
    sock.setsockopt(zmq.XPUB_VERBOSER, 1)
    bind(sock, cfg.sub_endpoint)
    return sock


def open_proxy_capture(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    """PUSH connected to the writer. Its pipe outlives writer restarts and holds
    up to capture_hwm messages; past that the proxy's send blocks (backpressure)."""
    sock = _set_common(ctx.socket(zmq.PUSH), cfg.shutdown_timeout_ms)
    sock.setsockopt(zmq.SNDHWM, cfg.capture_hwm)
    sock.setsockopt(zmq.SNDBUF, 4 << 20)
    sock.connect(cfg.capture_endpoint)
    return sock


def open_proxy_control(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    sock = _set_common(ctx.socket(zmq.REP), 0)
    bind(sock, cfg.proxy_control_endpoint)
    return sock


# --- writer ------------------------------------------------------------------

def open_writer_capture(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    """PULL bound for the proxy's capture pipe. A small receive queue: what the
    writer has not read stays in the proxy's larger, restart-proof queue."""
    sock = _set_common(ctx.socket(zmq.PULL), 0)
    sock.setsockopt(zmq.RCVHWM, max(1000, cfg.batch_max_buffer_size))
    sock.setsockopt(zmq.RCVBUF, 4 << 20)
    bind(sock, cfg.capture_endpoint)
    return sock


def open_writer_control(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    sock = _set_common(ctx.socket(zmq.REP), 0)
    bind(sock, cfg.control_endpoint)
    return sock


def open_writer_notify(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    """PUB connected to the proxy's XSUB, like any publisher: commit
    acknowledgements and the commit watermark. A plain PUB on purpose: while
    the proxy is away these are dropped instead of blocking the writer, and the
    next commit's notifications supersede them (they carry watermarks)."""
    sock = _set_common(ctx.socket(zmq.PUB), 1000)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.connect(cfg.pub_endpoint)
    return sock


# --- reader ------------------------------------------------------------------

def open_reader(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    sock = _set_common(ctx.socket(zmq.REP), 0)
    bind(sock, cfg.read_endpoint)
    return sock


# --- clients -----------------------------------------------------------------

def open_publisher(ctx: zmq.Context, cfg: BusConfig, linger_ms: int) -> zmq.Socket:
    """XPUB (not PUB) so the client sees the proxy's upstream subscription arrive
    and can hold its first message until then (the slow-joiner fix). NODROP turns
    a full queue into backpressure instead of silent loss."""
    sock = _set_common(ctx.socket(zmq.XPUB), linger_ms)
    sock.setsockopt(zmq.SNDHWM, cfg.pub_hwm)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.connect(cfg.pub_endpoint)
    return sock


def open_subscriber(ctx: zmq.Context, cfg: BusConfig, prefixes: list[bytes]) -> zmq.Socket:
    sock = _set_common(ctx.socket(zmq.SUB), 0)
    sock.setsockopt(zmq.RCVHWM, cfg.sub_hwm)
    for prefix in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    sock.connect(cfg.sub_endpoint)
    return sock


def open_request(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = _set_common(ctx.socket(zmq.REQ), 0)
    sock.connect(endpoint)
    return sock
