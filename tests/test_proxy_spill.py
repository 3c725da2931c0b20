"""What the proxy holds while no writer takes its captures (the spill:
proxy/service.py, "the capture's course"), attacked as an independent review
did: `stats` and /healthz while holding under a flood, the frame counters
when the writer dies under load, the memory guard when the writer comes back
to a proxy paused while holding, and a writer that stops reading at the tail
of the drain. Each test failed on the spill's first version (c77e2a3,
4d4aff7)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

import zmq

from bus import protocol
from bus.client import BusError, Publisher
from tests.conftest import Bus, RawProducer, free_port, wait_for
from tests.test_hostile import PROXY_LIMIT
from tests.test_operations import metrics, scrape
from tests.test_restarts import kill_9

# A publisher as fast as it can go, in a process of its own: an XPUB that
# waits for the proxy's subscription and drops nothing.
FLOOD = """
import sys, zmq
s = zmq.Context().socket(zmq.XPUB)
s.setsockopt(zmq.XPUB_NODROP, 1)
s.setsockopt(zmq.SNDHWM, 100000)
s.connect(sys.argv[1])
s.recv()
seq = 0
while True:
    seq += 1
    s.send_multipart([b"t.a", b"a:%d" % seq, b"m"])
"""


def healthz(address: str) -> int:
    try:
        return urllib.request.urlopen(f"http://{address}/healthz", timeout=3).status
    except urllib.error.HTTPError as exc:
        return exc.code


def forwarding(bus: Bus) -> str:
    try:
        return bus.proxy_stats()["forwarding"]
    except BusError as exc:
        return exc.code


def capture_state(bus: Bus) -> str:
    try:
        return bus.proxy_stats()["capture"]["state"]
    except BusError as exc:  # busy while the loop is blocked
        return exc.code


class Receiver:
    """A SUB on the proxy's subscriber side, read on a thread: the gaps
    between the messages it receives."""

    def __init__(self, bus: Bus, prefix: bytes) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.connect(bus["BUS_SUB_ENDPOINT"])
        self.received = 0
        self.longest_gap = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = None
        while not self._done.is_set():
            if self.sub.poll(100):
                self.sub.recv_multipart()
                now = time.monotonic()
                if last is not None:
                    self.longest_gap = max(self.longest_gap, now - last)
                last = now
                self.received += 1

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.sub.close(0)
        self.ctx.term()


def test_stats_while_holding_under_a_flood_answer_and_do_not_stall_delivery(make_bus) -> None:
    """Waiting for the loop's STATISTICS reply, the main thread did not read
    the spill: the loop, waiting in its spill send, could not answer, `stats`
    said busy, /healthz 503 "capture stalled", and live delivery stopped for
    the whole wait (1.7-2 s at each request)."""
    http = f"127.0.0.1:{free_port()}"
    # (A short shutdown: the proxy stopped with the writer gone holds what it
    # took for BUS_SHUTDOWN_TIMEOUT_MS, 10 s of the suite by default.)
    bus = make_bus(BUS_PROXY_HTTP=http, BUS_SHUTDOWN_TIMEOUT_MS=1000).start()
    assert bus.writer.stop() == 0
    receiver = Receiver(bus, b"t.a")
    flood = bus.spawn([sys.executable, "-c", FLOOD, bus["BUS_PUB_ENDPOINT"]])
    answers: list[object] = []
    try:
        wait_for(lambda: bus.proxy_stats()["capture"]["held"] > 10_000, timeout=30,
                 message="the proxy holding what the flood sends")
        receiver.longest_gap = 0.0
        for _ in range(6):
            answers += [forwarding(bus), healthz(http)]
        gap = receiver.longest_gap
    finally:
        flood.kill()
        receiver.close()
    # Before the fix about half of them said busy / 503; one transient (a
    # reply owed past 100 ms on a loaded machine) is let by.
    assert sum(answer not in ("running", 200) for answer in answers) <= 1, str(answers)
    assert gap < 1.0, f"live delivery stopped for {gap:.2f} s while stats were read"


def test_the_frame_counters_never_go_backwards_when_the_writer_dies_under_load(
        make_bus) -> None:
    """The loop blocked on a full capture queue (the writer stopped) when the
    writer died: its STATISTICS reply came after the proxy stopped waiting,
    and was closed with the old steering pair, so the run's frames were not
    counted (60,000 -> 21,015: a counter reset to Prometheus)."""
    bus = make_bus(BUS_SHUTDOWN_TIMEOUT_MS=1000).start()
    producer = RawProducer(bus, "c")
    try:
        producer.send(*range(1, 20_001), topic=b"c.t")
        bus.wait_count(20_000, "c.t")
        before = bus.proxy_stats()["frontend_frames_in"]
        bus.writer.send_signal(signal.SIGSTOP)
        producer.send(*range(20_001, 30_001), topic=b"c.t")
        wait_for(lambda: forwarding(bus) == protocol.BUSY, timeout=30,
                 message="the loop blocked on the stopped writer's full queue")
        kill_9(bus.writer)
        wait_for(lambda: capture_state(bus) == "holding", timeout=30,
                 message="the proxy holding for the dead writer")
        after = bus.proxy_stats()["frontend_frames_in"]
    finally:
        producer.close()
    assert after >= before, f"frontend_frames_in went from {before} to {after}"


def test_a_writer_back_to_a_proxy_paused_while_holding_does_not_cut_off_subscribers(
        make_bus) -> None:
    """The memory guard counted its subscriber cut-off from the pause: a
    writer back after a pause of more than a second found the backlog not yet
    sent, and the guard cut the subscribers off (their queues lost) instead of
    letting what is held drain."""
    bus = make_bus(BUS_PROXY_MEMORY_LIMIT_BYTES=PROXY_LIMIT).start()
    receiver = Receiver(bus, b"held.")
    payload = os.urandom(900_000)
    try:
        with Publisher(bus.config(), producer_id="held", connect_timeout=5) as pub:
            pub.publish("held.probe", b"", wait=True)
            assert bus.writer.stop() == 0
            wait_for(lambda: bus.proxy_stats()["capture"]["state"] == "holding",
                     message="the proxy holding for the writer that is gone")
            for _ in range(300):
                pub.publish("held.x", payload)
            wait_for(lambda: bus.proxy_stats()["memory"]["pauses"] >= 1, timeout=30,
                     message="the proxy to pause over its limit")
            time.sleep(1.5)  # a pause longer than the guard's 1 s to a subscriber cut-off
            before = bus.proxy_stats()["memory"]["subscriber_cutoffs"]
            bus.start_writer()
            pub.flush(timeout=120)
    finally:
        receiver.close()
    after = bus.proxy_stats()["memory"]["subscriber_cutoffs"]
    assert after == before, f"subscribers cut off {after - before} time(s) while held drained"
    assert bus.count("held.x") == 300


def test_a_writer_that_stops_reading_at_the_tail_of_the_drain_stops_no_live_delivery(
        make_bus) -> None:
    """With the loop stopped to send the last of what is held, a connected
    writer that stopped reading (SIGSTOP, a stuck commit) kept the loop
    stopped for good: no live delivery, `stats` "reconnecting", /healthz 200."""
    bus = make_bus(BUS_SHUTDOWN_TIMEOUT_MS=1000)  # (what it holds at the end: no 10 s stop)
    bus.start_proxy()
    receiver = Receiver(bus, b"t.")
    producer = RawProducer(bus, "a", session=False)
    ctx = zmq.Context()
    stopped, done = threading.Event(), threading.Event()

    def slow_writer() -> None:  # a PULL at the capture endpoint (CURVE off), 1 msg/2 ms
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 10)
        pull.setsockopt(zmq.RCVBUF, 4096)
        pull.bind(bus["BUS_CAPTURE_ENDPOINT"])
        while not done.is_set():
            if stopped.is_set():
                done.wait(0.01)
            elif pull.poll(10):
                pull.recv_multipart()
                time.sleep(0.002)  # the tail of the drain (1,000) lasts about 2 s
        pull.close(0)
    writer = threading.Thread(target=slow_writer, daemon=True)
    try:
        def delivered() -> bool:  # the receiver's subscription in place
            producer.sock.send_multipart([b"t.probe", b"", b"m"])
            return receiver.received > 0
        wait_for(delivered, message="live delivery to the receiver")
        payload = os.urandom(1024)  # the capture's socket buffers hold few of them
        for _ in range(2_500):
            producer.sock.send_multipart([b"t.a", payload, b"m"])
        wait_for(lambda: bus.proxy_stats()["capture"]["held"] >= 2_500,
                 message="the proxy holding 2,500")
        writer.start()
        # The tail: what the writer takes in half a second, or less, is left.
        wait_for(lambda: 0 < bus.proxy_stats()["capture"]["held"] <= 200, timeout=60,
                 interval=0.005, message="the tail of the drain")
        stopped.set()
        seen = receiver.received
        for i in range(100):
            producer.sock.send_multipart([b"t.a", b"live%d" % i, b"m"])
        wait_for(lambda: receiver.received >= seen + 100, timeout=10,
                 message="live delivery with the writer stopped at the tail of the drain")
        wait_for(lambda: forwarding(bus) == "running", message="the loop running")
    finally:
        done.set()
        if writer.is_alive():
            writer.join(5)
        receiver.close()
        producer.close()
        ctx.term()


def test_a_forwarding_loop_slow_to_answer_is_not_a_stalled_capture(make_bus) -> None:
    """/healthz (and with it the watchdog) read the loop's STATISTICS within
    500 ms and called any later answer "capture stalled": a loop that only
    answers late (a loaded machine, a writer that takes its captures in
    bursts) was 503 at every snapshot while `stats` said running, and systemd
    would have restarted the proxy, and lost what it holds, for a bus that
    moved. Here the writer is stopped 1.5 s out of every 1.8 s under a flood:
    the loop blocks on its full capture queue and answers within each 0.3 s
    the writer runs; /healthz stays 200. A stall (no answer for
    STALLED_AFTER_S) is still 503: test_operations'
    test_healthz_says_why_a_process_is_not_healthy."""
    http = f"127.0.0.1:{free_port()}"
    bus = make_bus(BUS_PROXY_HTTP=http, BUS_SHUTDOWN_TIMEOUT_MS=1000).start()
    flood = bus.spawn([sys.executable, "-c", FLOOD, bus["BUS_PUB_ENDPOINT"]])
    statuses: list[tuple[int, str]] = []
    slowest = 0.0
    try:
        wait_for(lambda: bus.proxy_stats()["backend_frames_out"] > 10_000, timeout=30,
                 message="the flood reaching the writer")
        for _ in range(5):
            bus.writer.send_signal(signal.SIGSTOP)
            stopped_until = time.monotonic() + 1.5
            while time.monotonic() < stopped_until:
                statuses.append(scrape(http, "/healthz"))
                slowest = max(slowest, metrics(http).get("bus_proxy_steering_unanswered_seconds", 0))
                time.sleep(0.1)
            bus.writer.send_signal(signal.SIGCONT)
            time.sleep(0.3)  # the writer's turn: the loop answers
    finally:
        bus.writer.send_signal(signal.SIGCONT)
        flood.kill()
    unhealthy = [body for status, body in statuses if status != 200]
    assert not unhealthy, f"{len(unhealthy)} of {len(statuses)} 503: {unhealthy[:2]}"
    # The loop was slow indeed: a question it owed for more than the old 500 ms.
    assert slowest > 0.5, f"the loop always answered within {slowest:.2f} s"
