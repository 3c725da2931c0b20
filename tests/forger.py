"""A hostile local process for the trust tests (a forger): while the writer is down,
it binds that process's endpoints and answers as if it were the bus (forged
acknowledgements on the notify endpoint, a capture PULL that swallows what
the proxy sends). It runs in a forked child as user nobody (uid 65534) when
the tests run as root, as an unprivileged local user would; otherwise as
the test's own user.

A forked child, not a new interpreter: this interpreter lives under a
directory that nobody cannot enter. The child makes its own zmq.Context
after the fork and leaves with os._exit, touching nothing of the parent's.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import zmq

from bus import protocol

NOBODY = 65534


@dataclass
class Squatter:
    pid: int
    ready_fd: int

    def wait_bound(self, timeout: float = 10.0) -> str:
        """What the child reported once it bound its endpoints ("bound", or the error)."""
        import select
        ready, _, _ = select.select([self.ready_fd], [], [], timeout)
        assert ready, "the squatter did not report within its deadline"
        return os.read(self.ready_fd, 200).decode()

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.ready_fd)


def run_as_nobody(body: Callable[[Callable[[str], None]], None]) -> Squatter:
    """Fork; the child drops to nobody (if root) and runs body(report)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(read_end)
            signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            body(lambda text: os.write(write_end, text.encode()))
        except BaseException as exc:  # noqa: BLE001 - the child reports and leaves
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
            code = 1
        os._exit(code)
    os.close(write_end)
    return Squatter(pid, read_end)


def forged_acks(notify_endpoint: str, capture_endpoint: str | None, producer: str, epoch: int,
                seconds: float, bombs: bool = False) -> Squatter:
    """Bind the notify endpoint (and the capture endpoint) and, for `seconds`,
    tell `producer`'s session that a million of its messages are stored: with
    no mac, with a random one, and with a mac entry in the right place. With
    `bombs`, also 16 MiB acknowledgements of a million empty maps each."""
    def body(report: Callable[[str], None]) -> None:
        ctx = zmq.Context()
        notify = ctx.socket(zmq.XPUB)
        notify.setsockopt(zmq.LINGER, 0)
        notify.setsockopt(zmq.XPUB_VERBOSE, 1)
        notify.bind(notify_endpoint)
        pull = None
        if capture_endpoint:
            pull = ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.bind(capture_endpoint)
        report("bound")
        topic = protocol.ack_topic(producer)
        fields = {"producer": producer, "epoch": epoch, "contiguous_seq": 1_000_000,
                  "max_seq": 1_000_000, "refused": 0, "committed_ns": time.time_ns()}
        forgeries = [msgpack.packb(fields),
                     msgpack.packb({**fields, "mac": os.urandom(protocol.MAC_BYTES)}),
                     protocol.SessionMac(os.urandom(32)).notification(topic, fields)]
        if bombs:
            forgeries.append(msgpack.packb({**fields, "x": [{}] * (16 << 20)}))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for payload in forgeries:
                notify.send_multipart([topic, payload])
            while notify.poll(0):
                notify.recv()
            while pull is not None and pull.poll(0):
                pull.recv_multipart()
            time.sleep(0.02)
        ctx.destroy(linger=0)
    return run_as_nobody(body)
