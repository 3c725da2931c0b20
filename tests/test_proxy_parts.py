"""The proxy's parts stepped in this process, without a proxy process: each
on inproc sockets of its own context, driven with an explicit `now` (as
huey's consumer loop is in its tests). The process tests
(tests/test_proxy_spill.py, test_proxy_steering.py, test_hostile.py and the
others) stay: these show each part's own job.

The forwarding loop here is libzmq's own (zmq.proxy_steerable on a thread),
as in the proxy; the writer's end of the capture is a PULL, and whether the
writer completed its handshake is told by a stand-in of its
bus/sockets.Connections (WriterLink)."""

from __future__ import annotations

import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zmq

from bus import sockets
from bus.config import BusConfig, load_config
from proxy.capture import CAPTURE_DIRECT, CAPTURE_DRAINING, CAPTURE_HOLDING, CaptureCourse
from proxy.memory import CONTROL, MEMORY_CHECK_S, PUBLISHERS, SUBSCRIBERS, WRITER, MemoryGuard
from proxy.steering import STAT_NAMES, STEER_STATISTICS, STEER_TERMINATE, Steering

# A receive or a condition that takes longer than this fails the test.
TIMEOUT_S = 5.0
MIB = 1 << 20


def config_of(tmp_path: Path, **settings: Any) -> BusConfig:
    """The defaults, and `settings` (environment variables)."""
    (tmp_path / "none.toml").write_text("")
    env = {"BUS_CONFIG": str(tmp_path / "none.toml"), "BUS_DB": str(tmp_path / "bus.db"),
           "BUS_LOG_LEVEL": "warning", **{name: str(value) for name, value in settings.items()}}
    return load_config(env=env)


def until(condition: Any, step: Any = lambda: None, message: str = "") -> None:
    """Call `step` until `condition()` holds; bounded in time."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, message or "condition not met in time"
        step()
        time.sleep(0.001)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    """A context of the test's own (the proxy's inproc names are per context);
    every socket closed with linger 0 at the end."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


# --- the steering ------------------------------------------------------------------


def statistics_reply(frames_in: int) -> list[bytes]:
    """A STATISTICS reply as libzmq's loop sends it: eight 64-bit counters."""
    return [struct.pack("=Q", frames_in if name == "frontend_frames_in" else 0)
            for name in STAT_NAMES]


def test_steering_replies_are_matched_and_unanswered_time_grows_with_now(ctx) -> None:
    """The test is the loop's end of the pair: a command it has not answered
    is owed for as long as `now` says; each reply read goes to its command;
    a reply that does not fit its command desynchronises the pair (counted,
    no reply trusted) until the next run, on a new pair."""
    steering = Steering(ctx, running=lambda: True)
    loop_end = steering.open()
    assert steering.unanswered_s(100.0) == 0.0
    assert steering.send(STEER_STATISTICS, 0, now=100.0) is None  # not answered yet
    assert steering.unanswered_s(100.25) == 0.25
    assert steering.unanswered_s(103.0) == 3.0
    assert loop_end.poll(int(TIMEOUT_S * 1000)) and loop_end.recv() == STEER_STATISTICS
    loop_end.send_multipart(statistics_reply(7))
    assert steering.answered(int(TIMEOUT_S * 1000))
    assert steering.unanswered_s(104.0) == 0.0
    assert steering.counts_of(steering.run_statistics)["frontend_frames_in"] == 7

    # TERMINATE answered with a STATISTICS reply: out of step.
    assert steering.send(STEER_TERMINATE, 0, now=105.0) is None
    assert loop_end.recv() == STEER_TERMINATE
    loop_end.send_multipart(statistics_reply(1))
    assert not steering.answered(int(TIMEOUT_S * 1000))
    assert steering.desyncs == 1 and steering.lost
    assert steering.counters(wait_ms=10) is None  # no reply trusted: busy
    assert steering.unanswered_s(106.0) == 0.0   # nothing owed on a lost pair

    steering.open()  # the next run: a new pair, trusted again
    assert not steering.lost and steering.runs == 2 and steering.desyncs == 1


def test_steering_counters_never_go_backwards_across_runs(ctx) -> None:
    """libzmq counts from zero with each run of its loop; the counters add
    the runs before, with the last STATISTICS of a run answered after its
    waiter gave up (read when the next run's pair is opened)."""
    frontend, backend, capture = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB), ctx.socket(zmq.PUSH)
    frontend.bind("inproc://steering-in")
    backend.bind("inproc://steering-out")
    capture.bind("inproc://steering-capture")
    publisher, captured = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    publisher.connect("inproc://steering-in")
    captured.connect("inproc://steering-capture")
    thread: threading.Thread | None = None
    steering = Steering(ctx, running=lambda: thread is not None and thread.is_alive())

    def run(messages: int) -> None:
        nonlocal thread
        steered = steering.open()
        thread = threading.Thread(target=zmq.proxy_steerable,
                                  args=(frontend, backend, capture, steered), daemon=True)
        thread.start()
        for n in range(messages):
            publisher.send_multipart([b"t", b"%d" % n])
            assert captured.poll(int(TIMEOUT_S * 1000)) and captured.recv_multipart()

    run(3)
    steering.send(STEER_STATISTICS, 0)  # not waited for: answered late, if at all
    steering.send(STEER_TERMINATE, 0)
    thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    run(2)  # the late replies are read before the new pair opens
    counted = steering.counters(wait_ms=int(TIMEOUT_S * 1000))
    # Two frames a message: 6 in the first run, and 4 in the second.
    assert counted is not None and counted["frontend_frames_in"] == 10
    assert steering.runs == 2 and steering.desyncs == 0
    steering.settle(wait_ms=int(TIMEOUT_S * 1000))
    steering.send(STEER_TERMINATE, int(TIMEOUT_S * 1000))
    thread.join(TIMEOUT_S)
    assert steering.counters()["frontend_frames_in"] == 10  # no loop: what was counted


# --- the capture's course ------------------------------------------------------------


class WriterLink:
    """Stands in for the capture's bus/sockets.Connections: what the monitor
    says of the writer, set by the test."""

    def __init__(self) -> None:
        self.handshaken = True
        self.gave_up: str | None = None
        self.failing = False
        self.fds: dict[int, None] = {}
        self.wrong_peers = self.redials = 0

    def redial_due(self, now: float) -> bool:
        return False

    def redial(self) -> None:
        self.redials += 1

    def stale(self) -> list[str]:
        return []

    def snapshot(self) -> dict[str, Any]:
        return {"wrong_peers": self.wrong_peers, "redials": self.redials}


class ForwardingHarness:
    """libzmq's loop between a PULL frontend (the test's publisher PUSHes to
    it) and a PUB backend, run as the proxy runs it: the capture each run is
    given is the course's choice. `writer`: the writer's PULL at the capture."""

    def __init__(self, ctx: zmq.Context, config: BusConfig) -> None:
        self.ctx = ctx
        self.frontend, self.backend = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB)
        self.frontend.bind("inproc://harness-in")
        self.backend.bind("inproc://harness-out")
        self.publisher = ctx.socket(zmq.PUSH)
        self.publisher.connect("inproc://harness-in")
        self.writer = ctx.socket(zmq.PULL)
        self.writer.bind("inproc://harness-writer")
        capture = ctx.socket(zmq.PUSH)
        capture.connect("inproc://harness-writer")
        self.link = WriterLink()
        self.thread: threading.Thread | None = None
        self.steering = Steering(ctx, self.forwarding)
        self.course = CaptureCourse(config, self.steering, lambda: self.link, self.forwarding,
                                    self.start, paused=lambda: False)
        self.steering.spill = self.course
        self.course.open(ctx, capture)
        self.course.poller = zmq.Poller()

    def forwarding(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        if self.course.loop_capture is not None:
            self.course.end_of_loop()
        steered = self.steering.open()
        capture = self.course.next_run_capture()
        self.thread = threading.Thread(target=zmq.proxy_steerable, daemon=True,
                                       args=(self.frontend, self.backend, capture, steered))
        self.thread.start()

    def publish(self, *bodies: bytes) -> None:
        for body in bodies:
            self.publisher.send_multipart([b"topic", body])

    def written(self, count: int) -> list[bytes]:
        """The bodies of the next `count` messages at the writer."""
        bodies = []
        for _ in range(count):
            assert self.writer.poll(int(TIMEOUT_S * 1000)), f"at the writer: {bodies}"
            bodies.append(self.writer.recv_multipart()[1])
        return bodies

    def stop(self) -> None:
        if self.forwarding():
            self.steering.send(STEER_TERMINATE, 0)
            until(lambda: not self.forwarding(), self.course.take_spilled)


@pytest.fixture
def harness(ctx, tmp_path) -> Iterator[ForwardingHarness]:
    loop = ForwardingHarness(ctx, config_of(tmp_path, BUS_CAPTURE_HWM_WRITER_DOWN=5))
    yield loop
    loop.stop()


def test_capture_holds_while_the_writer_is_gone_then_sends_oldest_first(harness) -> None:
    """direct -> holding when the writer's connection has not completed its
    handshake (the loop stopped, run again on the spill, what it captures held
    here); -> draining once it is back (what is held sent, oldest first, as
    the capture takes it); -> direct when nothing is held: nothing overtakes."""
    course, now = harness.course, 1000.0

    def tend() -> None:
        nonlocal now
        now += 0.01
        course.tend(now)

    harness.start()
    assert course.state() == CAPTURE_DIRECT
    harness.publish(b"m1")
    assert harness.written(1) == [b"m1"]

    harness.link.handshaken = False  # the writer is gone
    until(lambda: course.state() == CAPTURE_HOLDING and harness.forwarding(), tend,
          "the loop to run on the spill")
    assert course.loop_capture is course.spill and course.down is None
    harness.publish(b"m2", b"m3", b"m4")
    until(lambda: len(course.held) == 3, tend, "three messages held")
    assert not harness.writer.poll(50), "nothing reaches a writer that is gone"

    harness.link.handshaken = True   # the writer is back
    assert course.state() == CAPTURE_DRAINING
    until(lambda: not course.held, tend, "what is held sent")
    assert course.held_taken_at > 1000.0
    assert harness.written(3) == [b"m2", b"m3", b"m4"]
    until(lambda: course.state() == CAPTURE_DIRECT, tend, "straight to the writer again")
    harness.publish(b"m5")
    assert harness.written(1) == [b"m5"]
    assert course.spilled_total == 3 and course.held_peak == 3


def test_capture_holds_up_to_its_bound_then_the_loop_waits(harness) -> None:
    """What is held stops at BUS_CAPTURE_HWM_WRITER_DOWN (5 here): past it the
    spill is not read, and the loop waits in its send (live delivery with
    it); nothing is dropped, and all of it reaches the writer, in order."""
    course, now = harness.course, 0.0
    harness.link.handshaken = False
    harness.start()
    assert course.state() == CAPTURE_HOLDING
    bodies = [b"%d" % n for n in range(12)]
    harness.publish(*bodies)
    until(lambda: len(course.held) == 5, lambda: course.tend(now), "the bound reached")
    for _ in range(20):
        course.tend(now)
    assert len(course.held) == 5 and not course.must_read_spill()
    harness.link.handshaken = True

    def tend() -> None:
        nonlocal now
        now += 0.01
        course.tend(now)

    until(lambda: course.state() == CAPTURE_DIRECT and not course.held, tend, "all sent")
    assert harness.written(12) == bodies


# --- the memory guard -----------------------------------------------------------------


class GuardHost:
    """The forwarding loop and its sides as the memory guard sees them
    (proxy/memory.GuardedProxy): what the guard asks of it is written down."""

    def __init__(self) -> None:
        self.connections = {WRITER: SimpleNamespace(fds={7: None}),
                            CONTROL: SimpleNamespace(fds={})}
        self.frontend: Any = "publishers' socket"
        self.backend: Any = "subscribers' socket"
        self.loop_runs = True
        self.calls: list[str] = []
        self.refuse_open: Exception | None = None

    def running(self) -> bool:
        return self.loop_runs

    def stop(self) -> None:
        self.calls.append("stop")
        self.loop_runs = False

    def resume(self) -> None:
        self.calls.append("resume")
        self.loop_runs = True

    def close_side(self, side: str) -> None:
        self.calls.append(f"close {side}")
        if side != CONTROL:
            setattr(self, {PUBLISHERS: "frontend", SUBSCRIBERS: "backend"}[side], None)

    def open_side(self, side: str) -> None:
        if self.refuse_open is not None:
            raise self.refuse_open
        self.calls.append(f"open {side}")
        setattr(self, {PUBLISHERS: "frontend", SUBSCRIBERS: "backend"}[side], "opened again")


@pytest.fixture
def guarded(tmp_path) -> tuple[MemoryGuard, GuardHost, list[int]]:
    """A guard over a GuardHost, with a limit of 1 GiB (the default) and its
    RSS read from the list it returns (the test sets `rss[0]`)."""
    rss = [100 * MIB]
    host = GuardHost()
    course = SimpleNamespace(held=deque(), held_taken_at=0.0)
    guard = MemoryGuard(config_of(tmp_path), host, course, rss=lambda: rss[0],
                        release=lambda: None)
    return guard, host, rss


def test_memory_guard_pauses_over_its_limit_and_resumes_under_it(guarded) -> None:
    guard, host, rss = guarded
    limit = guard.config.proxy_memory_limit_bytes
    guard.step(0.0)
    assert not guard.paused and host.calls == []
    rss[0] = limit + MIB
    guard.step(MEMORY_CHECK_S / 2)  # between two reads: not read yet
    assert not guard.paused
    guard.step(0.1)
    assert guard.paused and host.calls == ["stop"] and guard.actions["pauses"] == 1
    rss[0] = int(limit * 0.8)   # back under the limit, not under 75% of it
    guard.step(0.2)
    assert guard.paused
    rss[0] = int(limit * 0.7)
    guard.step(0.3)
    assert not guard.paused and host.calls == ["stop", "resume"]
    assert guard.snapshot()["paused"] is False and guard.snapshot()["pauses"] == 1


def test_memory_guard_cuts_off_a_side_that_keeps_growing(guarded) -> None:
    """Paused and still growing by an eighth of the limit: the publishers
    are cut off, then the subscribers; resumed, both are opened again (a side
    that cannot be opened yet keeps the pause, tried again at the next read)."""
    guard, host, rss = guarded
    limit = guard.config.proxy_memory_limit_bytes
    now = 0.0
    rss[0] = limit + MIB
    guard.step(now)
    for side in (PUBLISHERS, SUBSCRIBERS):
        rss[0] += limit // 8 + MIB
        now += 0.1
        guard.step(now)
        assert host.calls[-1] == f"close {side}"
    assert host.frontend is None and host.backend is None
    assert guard.actions["publisher_cutoffs"] == guard.actions["subscriber_cutoffs"] == 1
    rss[0] = limit // 2
    host.refuse_open = sockets.EndpointInUse("the port is still held")
    now += 0.1
    guard.step(now)
    assert guard.paused and guard.actions["resume_retries"] == 1
    host.refuse_open = None
    now += 0.1
    guard.step(now)
    assert not guard.paused
    assert host.calls[-3:] == [f"open {PUBLISHERS}", f"open {SUBSCRIBERS}", "resume"]


def test_memory_guard_cuts_no_side_off_for_what_it_holds_for_the_writer(guarded) -> None:
    """Paused, memory growing while what is held goes to the writer is that
    memory in transit (no one streaming in: no side cut off); held and not
    taken, it is the writer's, not a slow subscriber's (the subscribers stay);
    nothing held, memory not coming back for a second with the writer
    connected: the subscribers are cut off."""
    guard, host, rss = guarded
    limit = guard.config.proxy_memory_limit_bytes
    rss[0] = limit + MIB
    guard.step(0.0)
    guard.course.held.append([b"t", b"held"])
    now = 0.0
    for _ in range(30):  # 3 s, growing by 30/64 of the limit
        now += 0.1
        rss[0] += limit // 64
        guard.course.held_taken_at = now  # the writer takes what is held
        guard.step(now)
    for _ in range(20):  # 2 s more: the writer takes nothing
        now += 0.1
        guard.step(now)
    assert guard.paused and host.calls == ["stop"], host.calls
    guard.course.held.clear()
    now += 0.1
    guard.step(now)
    assert host.calls[-1] == f"close {SUBSCRIBERS}" and guard.actions["subscriber_cutoffs"] == 1
    assert guard.actions["publisher_cutoffs"] == 0


class UpstreamLink:
    """A stand-in for an edge's upstream bus/sockets.Connections: a failed
    handshake libzmq gave up on, and the redials made."""

    def __init__(self) -> None:
        self.gave_up: str | None = "HANDSHAKE_FAILED_PROTOCOL (mechanism mismatch)"
        self.wrong_peers, self.redials, self.handshaken = 1, 0, False

    def redial_due(self, now: float) -> bool:
        return self.gave_up is not None

    def redial(self) -> None:
        self.gave_up = None
        self.redials += 1

    def snapshot(self) -> dict[str, Any]:
        return {"wrong_peers": self.wrong_peers, "redials": self.redials,
                "last_wrong_peer": None, "superseded": 0}


def test_an_edge_s_loop_stopped_for_a_redial_starts_again_once_no_pause_holds_it() -> None:
    """UpstreamCourse, stepped with `now`: a wrong peer at the upstream stops
    the loop (TERMINATE) before the redial, which waits until the loop has
    ended; a memory pause then keeps the loop stopped; once the pause ends,
    the course starts the loop again. Before (the hostile review of the
    edge), a pause at that moment left `down` set for good, and the memory
    guard's resume does not start a loop the course stopped: forwarding
    stayed stopped."""
    from proxy.upstream import UpstreamCourse
    link = UpstreamLink()
    state = SimpleNamespace(running=True, paused=False, starts=0, sent=[])
    steering = SimpleNamespace(settle=lambda wait_ms: None,
                               send=lambda command, wait_ms: state.sent.append(command))

    def start() -> None:
        state.running, state.starts = True, state.starts + 1
    course = UpstreamCourse("tcp://10.0.0.1:5551", steering, lambda: link,
                            lambda: state.running, start, lambda: state.paused)
    course.tend(now=1.0)
    assert state.sent == [STEER_TERMINATE] and course.down is not None and link.redials == 0
    course.tend(now=1.1)  # the loop has not ended yet: no redial under its feet
    assert link.redials == 0 and state.sent == [STEER_TERMINATE]
    state.running, state.paused = False, True  # it ended; the memory guard pauses now
    course.tend(now=1.2)
    assert link.redials == 1 and state.starts == 0  # redialed, held stopped by the pause
    course.tend(now=1.3)
    assert state.starts == 0
    state.paused = False
    course.tend(now=1.4)
    assert state.starts == 1 and state.running and course.down is None
    course.tend(now=1.5)
    assert state.starts == 1 and course.snapshot()["state"] == "none"
