"""Operations (issue #12): what systemd, an operator and a monitoring system
see of each process: readiness, watchdog, status lines, journald priorities,
process titles."""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from bus.client import Publisher
from tests.conftest import BUS_CLI, Bus, ping, wait_for

# A ping every second: the processes' loops turn at least that often, so
# WatchdogSec= must be 2 s or more (the units say 30 s).
WATCHDOG_USEC = "2000000"
ROLES = (("writer", "BUS_CONTROL_ENDPOINT"), ("proxy", "BUS_PROXY_CONTROL_ENDPOINT"),
         ("reader", "BUS_READ_ENDPOINT"))


class NotifySocket:
    """The datagram socket systemd binds for a service's sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[tuple[float, str]] = []

    def read(self, timeout: float) -> list[str]:
        """Every line received within `timeout` (each datagram split in lines)."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            now = time.monotonic()
            for line in data.decode().splitlines():
                self.received.append((now, line))
                lines.append(line)
        return lines

    def wait_for(self, line: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.read(0.2):
                return
        raise AssertionError(f"no {line} within {timeout} s; got {self.received[-10:]}")

    def close(self) -> None:
        self.sock.close()


def test_each_process_is_ready_only_when_it_serves_then_pings_the_watchdog_and_says_stopping(
        make_bus, tmp_path: Path) -> None:
    """READY=1 once the sockets are bound and the database open (a ping right
    after it is answered), WATCHDOG=1 at half of WATCHDOG_USEC from the loop,
    a STATUS= line a person can read, STOPPING=1 on SIGTERM, exit 0."""
    bus = make_bus()
    for role, endpoint in ROLES:
        notify = NotifySocket(tmp_path / f"{role}.notify")
        try:
            proc = bus.spawn([BUS_CLI, role], env={"NOTIFY_SOCKET": str(notify.path),
                                                   "WATCHDOG_USEC": WATCHDOG_USEC})
            notify.wait_for("READY=1")
            assert ping(bus[endpoint]), f"{role} said READY=1 before it served"
            statuses = [line for _, line in notify.received if line.startswith("STATUS=")]
            assert statuses and len(statuses[0]) > len("STATUS="), notify.received
            lines = notify.read(2.5)
            assert lines.count("WATCHDOG=1") >= 2, (role, lines)  # every second
            proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1")
            assert proc.wait() == 0
        finally:
            notify.close()


def test_a_stuck_writer_loop_stops_pinging_the_watchdog(make_bus, tmp_path: Path) -> None:
    """systemd restarts a process whose WATCHDOG=1 stops (WatchdogSec=): the
    pings come from the loop itself, so a commit stuck on another process's
    write lock (busy timeout 30 s here) stops them, and they resume after."""
    bus = make_bus(BUS_SQLITE_BUSY_TIMEOUT_MS=30_000)
    notify = NotifySocket(tmp_path / "writer.notify")
    try:
        bus.spawn([BUS_CLI, "writer"], env={"NOTIFY_SOCKET": str(notify.path),
                                            "WATCHDOG_USEC": WATCHDOG_USEC})
        notify.wait_for("READY=1")
        bus.start_proxy()
        notify.wait_for("WATCHDOG=1")
        with Publisher(bus.config(), producer_id="stuck") as pub:
            holder = sqlite3.connect(bus.db, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                pub.publish("stuck.t", b"x")
                notify.read(1.2)  # the writer reaches its commit within its flush interval
                assert "WATCHDOG=1" not in notify.read(3.0), "the stuck loop kept pinging"
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            notify.wait_for("WATCHDOG=1", timeout=10)
            pub.flush(timeout=10)
    finally:
        notify.close()


def test_processes_carry_their_names_and_journald_priorities(bus: Bus) -> None:
    """`ps` shows bus-writer, bus-proxy, bus-reader, not python."""
    for proc, title in ((bus.writer, "bus-writer"), (bus.proxy, "bus-proxy"),
                        (bus.reader, "bus-reader")):
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert cmdline == title, cmdline
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == title
