"""The tcp capture's own listening socket (bus/sockets._tcp_listener, made so
that its connections announce small segments: issue 26) binds where libzmq's
bind would, as libzmq would: the proxy connects with libzmq's resolver, and
every other endpoint of the bus is bound by libzmq. Review of issue 26."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest
import zmq

from bus import sockets
from bus.runner import StartupError
from tests.conftest import free_port

MAX_SEGMENT = 4096


def _host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0]


def _libzmq_binds(ctx: zmq.Context, endpoint: str) -> str:
    sock = ctx.socket(zmq.PULL)
    try:
        sock.bind(endpoint)
        return _host(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    except zmq.ZMQError:
        return "refused"
    finally:
        sock.close(linger=0)


def _capture_binds(ctx: zmq.Context, endpoint: str) -> str:
    sock = ctx.socket(zmq.PULL)
    try:
        sockets.bind(sock, endpoint, "capture", MAX_SEGMENT)
    except StartupError:
        return "refused"
    try:
        return _host(sock.getsockopt(zmq.LAST_ENDPOINT).decode())
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize("host", ["127.0.0.1", "*", "localhost", "[::1]", "lo",
                                  "nosuch.invalid"])
def test_the_capture_listener_binds_where_libzmq_would(host: str) -> None:
    """An IPv6 address bound by the capture alone (libzmq, without ZMQ_IPV6,
    refuses it) is one the proxy's capture never connects to: the writer
    started, and nothing was ever stored. Before issue 26 the writer refused it
    at start. An interface name (tcp://lo:PORT) libzmq binds, and did here."""
    if host == "lo" and "lo" not in dict(map(reversed, socket.if_nameindex())):
        pytest.skip("no interface named lo")
    ctx = zmq.Context()
    try:
        # Each on a port of its own: libzmq frees a closed socket's port later.
        expected = _libzmq_binds(ctx, f"tcp://{host}:{free_port()}")
        assert _capture_binds(ctx, f"tcp://{host}:{free_port()}") == expected
    finally:
        ctx.destroy(linger=0)


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_capture_listener_has_libzmqs_backlog() -> None:
    ctx = zmq.Context()
    try:
        port = free_port()
        sock = ctx.socket(zmq.PULL)
        sockets.bind(sock, f"tcp://127.0.0.1:{port}", "capture", MAX_SEGMENT)
        listing = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout.split()
        assert int(listing[2]) == sock.getsockopt(zmq.BACKLOG)  # Send-Q of a listener
    finally:
        ctx.destroy(linger=0)


@pytest.mark.xfail(strict=True, reason="review of issue 26, not fixed: a connection the "
                   "kernel accepted on an inherited listener before the writer set "
                   "TCP_MAXSEG keeps loopback's segments for its lifetime")
def test_a_capture_connection_queued_at_a_socket_activated_port_takes_small_segments() -> None:
    """Under systemd the proxy's first connection to a socket-activated tcp
    capture is what starts the writer: the kernel has completed it (and
    announced its segment size) before the writer runs _limit_segments."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    early = socket.create_connection(listener.getsockname())  # the proxy, before the writer
    try:
        sockets._limit_segments(listener.fileno(), MAX_SEGMENT)  # the writer, in bind()
        assert early.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) <= MAX_SEGMENT
    finally:
        early.close()
        listener.close()
