"""The proxy's steering socket stays in step with its forwarding loop (issue 22,
item 3), with real processes: a proxy whose forwarding loop is blocked in a
capture send (the writer connected but stopped with SIGSTOP, a capture queue
of one message) when the memory guard pauses it, so that the pause's
STATISTICS and TERMINATE are answered late, after the guard has stopped
waiting for them; then the writer goes on, the loop reads both, answers and
ends, and the guard resumes forwarding with a new run of the loop. (A writer
that is not connected no longer blocks the loop: the proxy holds what it
captures meanwhile.) The proxy runs as its Type=notify unit
does (NOTIFY_SOCKET, WATCHDOG_USEC) with its HTTP side on.

The code the issue describes (3a5791a) started the new run with the count of
unanswered commands set to zero while those two late replies were still
queued: the next STATISTICS read the late STATISTICS reply, the one after it
the empty TERMINATE reply (struct.error), and the proxy exited 1 from its own
status line or HTTP snapshot (an internal_error when a `stats` request met it
first). Issue 21's change (06a1839) already read the late replies before a
new run; issue 22's gives each run a steering pair of its own and matches
every reply with its command (proxy/steering.py, Steering.open, Steering.answered)."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import zmq

from bus import protocol
from bus.client import BusError
from tests.conftest import BUS_CLI, Bus, Proc, free_port, ping, wait_for

# A memory limit the proxy reaches with a few dozen large messages queued at
# its publisher side; each message is one of them.
MEMORY_LIMIT_BYTES = 160 << 20
FLOOD_PAYLOAD_BYTES = 256 << 10
# The unit's watchdog: the proxy pings every half of it, each ping after a
# stats snapshot found it healthy (bus/runner.SystemdNotifier).
WATCHDOG_USEC = 1_000_000
# Pings after the resume to wait for: each one a snapshot of the new run's
# counters (and the HTTP snapshot and status line besides, every 1 and 2 s).
PINGS_AFTER_RESUME = 6
RESUMED = ("memory_back_under_limit", "memory_still_over_limit")


class NotifySocket:
    """What systemd's $NOTIFY_SOCKET is to a Type=notify unit: the datagrams a
    process sends, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.lines: list[str] = []

    def collect(self) -> list[str]:
        while True:
            try:
                self.lines.extend(self.sock.recv(65536).decode().splitlines())
            except BlockingIOError:
                return self.lines

    def pings(self) -> int:
        return self.collect().count("WATCHDOG=1")

    def close(self) -> None:
        self.sock.close()


def start_proxy_unit(bus: Bus, notify: NotifySocket) -> Proc:
    """The proxy as its Type=notify unit runs it (NOTIFY_SOCKET, WATCHDOG_USEC),
    alone: the other processes keep no notify socket here."""
    proc = bus.spawn([BUS_CLI, "proxy"], env={"NOTIFY_SOCKET": str(notify.path),
                                              "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    wait_for(lambda: ping(bus["BUS_PROXY_CONTROL_ENDPOINT"]) or proc.popen.poll() is not None,
             message="proxy ping")
    assert proc.popen.poll() is None, proc.stderr.collect()[-10:]
    bus.proxy = proc
    return proc


def logged(proc: Proc, *events: str) -> bool:
    return any(event.get("event") in events for event in proc.log_events())


def paused_forwarding(proc: Proc) -> bool:
    return any(event.get("event") == "memory_limit_reached"
               and event.get("action") == "paused forwarding" for event in proc.log_events())


def flood_until_paused(bus: Bus, proxy: Proc) -> int:
    """Publish large messages until the proxy pauses over its memory limit;
    how many were sent. An XPUB that drops nothing: sending starts once the
    proxy's subscriptions have arrived, and waits while the proxy reads."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.setsockopt(zmq.SNDHWM, 8)
    pub.setsockopt(zmq.SNDTIMEO, 100)
    try:
        pub.connect(bus["BUS_PUB_ENDPOINT"])
        assert pub.poll(15_000), "the proxy's subscriptions did not arrive"
        payload, sent = b"x" * FLOOD_PAYLOAD_BYTES, 0
        deadline = time.monotonic() + 60
        while not paused_forwarding(proxy):
            assert time.monotonic() < deadline and proxy.popen.poll() is None, (
                sent, crash_report(proxy))
            assert sent * FLOOD_PAYLOAD_BYTES < 4 * MEMORY_LIMIT_BYTES, (
                f"{sent} messages sent and no pause", crash_report(proxy))
            try:
                pub.send_multipart([b"steering.flood", payload, b"meta"])
            except zmq.Again:  # the proxy reads no more: its guard has paused it?
                continue
            sent += 1
        return sent
    finally:
        pub.close()
        ctx.term()


def crash_report(proc: Proc) -> tuple[int | None, list[str]]:
    """The exit status and the last line of each error the process logged (a
    crash's exception)."""
    return proc.popen.poll(), [
        (event.get("exception") or event.get("error") or event["event"]).splitlines()[-1]
        for event in proc.log_events() if event.get("level") == "error"]


def stats_outcome(bus: Bus) -> str:
    try:
        return bus.proxy_stats()["forwarding"]
    except BusError as exc:
        return exc.code


def test_late_steering_replies_of_a_paused_loop_do_not_reach_its_next_run(make_bus,
                                                                         tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    bus = make_bus(BUS_PROXY_HTTP=f"127.0.0.1:{free_port()}",
                   BUS_PROXY_MEMORY_LIMIT_BYTES=MEMORY_LIMIT_BYTES,
                   # The writer stopped (SIGSTOP) once connected: the loop's
                   # second capture send blocks, and with it every steering
                   # command.
                   BUS_CAPTURE_HWM=1)
    bus.start_writer()
    try:
        proxy = start_proxy_unit(bus, notify)
        wait_for(lambda: bus.proxy_stats().get("capture", {}).get("state", "direct") == "direct",
                 message="the capture connected to the writer")  # (no state before issue 22)
        bus.writer.send_signal(signal.SIGSTOP)
        flood_until_paused(bus, proxy)
        # Paused while blocked: the pause's STATISTICS and TERMINATE wait in
        # the loop's queue, and `stats` says so.
        assert stats_outcome(bus) == protocol.BUSY
        bus.writer.send_signal(signal.SIGCONT)  # the loop sends its burst, answers both, ends
        wait_for(lambda: logged(proxy, *RESUMED) or proxy.popen.poll() is not None,
                 timeout=30, message="forwarding to resume")
        pings = notify.pings()
        wait_for(lambda: notify.pings() >= pings + PINGS_AFTER_RESUME
                 or crash_report(proxy) != (None, []),
                 timeout=30, message="the watchdog pings of the resumed proxy")
        if logged(proxy, "crashed"):
            proxy.wait()  # its exit status, for the report
        assert crash_report(proxy) == (None, [])
        outcomes = [stats_outcome(bus) for _ in range(3)]
        assert outcomes == ["running"] * 3, (outcomes, crash_report(proxy))
    finally:
        bus.writer.send_signal(signal.SIGCONT)
        notify.close()
