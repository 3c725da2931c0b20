"""The proxy under subscription floods (issue 22, items 2 to 4): its steering
socket stays in step with the forwarding loop, and subscriptions are held
within a budget. Real processes: a bus's writer and proxy, hostile
subscribers as ZeroMQ sockets of the test."""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

import zmq

from bus import protocol
from bus.client import BusError
from tests.conftest import free_port

# The flood: one SUB subscribing to tens of thousands of prefixes of
# 1,000 bytes (under the 1 KiB frame limit of the subscriber endpoint).
FLOOD_PREFIX_BYTES = 1000


def subscribe_flood(endpoint: str, count: int, seed: int) -> tuple[zmq.Context, zmq.Socket]:
    """A SUB subscribed to `count` random prefixes of FLOOD_PREFIX_BYTES, still
    connected (it sends them all again whenever it reconnects): close both."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SNDHWM, 0)
    sub.connect(endpoint)
    rng = random.Random(seed)
    for _ in range(count):
        sub.setsockopt(zmq.SUBSCRIBE, rng.randbytes(FLOOD_PREFIX_BYTES))
    return ctx, sub


def drain_datagrams(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return


def test_the_steering_socket_stays_in_step_under_a_subscription_flood(make_bus,
                                                                      tmp_path: Path) -> None:
    """Item 3: a subscription flood keeps the forwarding loop busy past the
    steering timeouts; late TERMINATE and STATISTICS replies were then read
    as answers to later STATISTICS requests (struct.error): an internal_error
    through `stats`, and the proxy's exit through status_line() (every
    Type=notify unit's NOTIFY_SOCKET) or the HTTP snapshot. Here all three
    ask all along (stats in a loop, the status every 2 s, the snapshot every
    1 s) while the flood is taken in, paused over and cut off: every stats is
    an answer or `busy`, and the proxy lives."""
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    bus = make_bus(NOTIFY_SOCKET=str(notify_path), BUS_PROXY_HTTP=f"127.0.0.1:{free_port()}",
                   BUS_PROXY_MEMORY_LIMIT_BYTES=256 << 20,
                   PYTHONPATH=os.environ.get("PROXY_TEST_PYTHONPATH", ""))
    bus.start_writer()
    bus.start_proxy()
    outcomes: dict[str, int] = {}
    ctx, sub = subscribe_flood(bus["BUS_SUB_ENDPOINT"], 20_000, seed=22)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and bus.proxy.popen.poll() is None:
            try:
                outcome = bus.proxy_stats()["forwarding"]
            except BusError as exc:
                outcome = exc.code
            except Exception as exc:  # a timeout: the proxy busy past 3 s, or gone
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            drain_datagrams(notify)
            time.sleep(0.02)
    finally:
        sub.close()
        ctx.term()
        notify.close()
    assert bus.proxy.popen.poll() is None, (outcomes, bus.proxy.stderr.collect()[-5:])
    assert protocol.INTERNAL_ERROR not in outcomes, outcomes
    stats = bus.proxy_stats()
    assert stats["steering"]["desyncs"] == 0, stats["steering"]
