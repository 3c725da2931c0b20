"""The steering of the proxy's forwarding loop (zmq_proxy_steerable(3)).

Each run of the forwarding loop has a steering pair of its own (`open`), and
each reply is matched with the command it answers (`answered`): a reply that
does not fit its command means the pair is out of step, and no reply is
trusted until the next run. libzmq's counters start from zero with each run:
`counters` adds the runs before the current one, so they never go backwards
(a reset to Prometheus). `unanswered_s(now)`: how long a reply has been owed.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import zmq

from bus import sockets
from bus.logging import get_logger

log = get_logger("proxy")

# How long `stats` waits for the forwarding loop's counters. The loop is busy
# or blocked (e.g. the capture queue is full while the writer is down) when it
# does not answer in time: `stats` then answers `busy`.
STATISTICS_WAIT_MS = 2000
# How long a reply the loop still owes is waited for before a new question.
OWED_REPLY_WAIT_MS = 100

STAT_NAMES = (
    "frontend_frames_in", "frontend_bytes_in", "frontend_frames_out", "frontend_bytes_out",
    "backend_frames_in", "backend_bytes_in", "backend_frames_out", "backend_bytes_out",
)

# libzmq's steering commands (zmq_proxy_steerable(3)), and the shape of each
# one's reply: STATISTICS eight 64-bit counters, the others one empty frame.
STEER_STATISTICS, STEER_TERMINATE = b"STATISTICS", b"TERMINATE"


def answers(command: bytes, reply: list[bytes]) -> bool:
    """Whether `reply` has the shape of libzmq's reply to `command`."""
    if command == STEER_STATISTICS:
        return len(reply) == len(STAT_NAMES) and all(len(part) == 8 for part in reply)
    return reply == [b""]


class SpillWhileWaiting(Protocol):
    """What a wait for a steering reply reads meanwhile (proxy/capture.py):
    a loop capturing into the spill may be waiting in its spill send."""
    spill_reader: zmq.Socket | None

    def must_read_spill(self) -> bool: ...

    def take_spilled(self, ending: bool = False) -> None: ...


class Steering:
    """The steering pair of the current run of the forwarding loop, the
    commands sent on it that the loop has not answered yet (in order, with
    when each was sent), the last reply read, and the frame counters."""

    def __init__(self, ctx: zmq.Context | None, running: Callable[[], bool]) -> None:
        self.ctx = ctx
        self.running = running                 # whether the forwarding loop runs
        self.spill: SpillWhileWaiting | None = None
        self.steer: zmq.Socket | None = None
        self.steered: zmq.Socket | None = None  # the loop's end of the pair
        self.runs = 0
        self.awaiting: deque[tuple[bytes, float]] = deque()  # (command, sent at)
        self.last_reply: list[bytes] | None = None
        self.lost = False
        self.desyncs = 0
        # Whether TERMINATE was sent to the current run (it must then be read
        # from, to end: the capture's course reads its spill to the end).
        self.loop_ending = False
        # What the loops before the current one counted (the current run's
        # base), and the current run's last STATISTICS reply (read late or not).
        self.counted = dict.fromkeys(STAT_NAMES, 0)
        self.run_base = dict(self.counted)
        self.run_statistics: list[bytes] | None = None

    def open(self) -> zmq.Socket:
        """A new steering pair, on an endpoint of its own, for each run of the
        forwarding loop; returns the loop's end. What the loop before it owed
        (late replies of a busy loop, commands a blocked one never read)
        stays on the old pair, which is closed, and can never be read as an
        answer to this run's commands (issue 22 reported a stale TERMINATE
        reply read as STATISTICS: struct.error, and the proxy's exit). Called
        while no loop runs: the old pair is this thread's. What the old pair
        owes is read first: the last STATISTICS of the run that ended
        (answered late, after its waiter gave up) counts its frames, so that
        the counters never go backwards (a reset to Prometheus)."""
        if self.steer is not None:
            self.answered(0)
            if self.run_statistics is not None:
                self.counted = self.counts_of(self.run_statistics)
        self.run_base = dict(self.counted)
        self.run_statistics = None
        for sock in (self.steer, self.steered):
            if sock is not None:
                sock.close(linger=0)
        self.runs += 1
        endpoint = f"{sockets.PROXY_STEERING_ENDPOINT}-{self.runs}"
        self.steer = self.ctx.socket(zmq.PAIR)
        self.steer.bind(endpoint)
        self.steered = self.ctx.socket(zmq.PAIR)
        self.steered.connect(endpoint)
        self.awaiting.clear()
        self.last_reply = None
        self.lost = False
        self.loop_ending = False
        return self.steered

    def send(self, command: bytes, wait_ms: int, now: float | None = None) -> list[bytes] | None:
        """Send one steering command and return its reply, or None if the loop
        does not answer within `wait_ms` (busy, or blocked in a capture send):
        the command stays queued for it, and its reply is matched later."""
        self.steer.send(command)
        self.awaiting.append((command, time.monotonic() if now is None else now))
        self.loop_ending |= command == STEER_TERMINATE
        return self.last_reply if self.answered(wait_ms) else None

    def answered(self, wait_ms: int) -> bool:
        """Read the replies the loop owes, each matched with its command
        (libzmq answers every command once, in order: STATISTICS with 8 frames
        of 8 bytes, the others with one empty frame); whether all came within
        `wait_ms`. A reply that does not fit its command means the pair is out
        of step: it is counted and logged, and no reply is trusted until the
        next run of the loop, on a new pair (counters() answers busy)."""
        if self.lost:
            return False
        deadline = time.monotonic() + wait_ms / 1000
        while self.awaiting:
            if not self.wait_reply(deadline):
                return False
            reply = self.steer.recv_multipart()
            command, _ = self.awaiting.popleft()
            if not answers(command, reply):
                self.desyncs += 1
                self.lost = True
                self.awaiting.clear()
                log.error("steering_desynchronised", command=command.decode(),
                          reply_frames=len(reply), reply_bytes=sum(map(len, reply)),
                          action="no reply trusted until the forwarding loop runs again")
                return False
            self.last_reply = reply
            if command == STEER_STATISTICS:
                self.run_statistics = reply
        return True

    def wait_reply(self, deadline: float) -> bool:
        """Wait for the loop's next steering reply until `deadline`. A loop
        capturing into the spill may be waiting in its spill send: the spill
        is read meanwhile (up to the held bound, where the loop is blocked
        indeed), or the wait itself would stall live delivery and read as
        "blocked"."""
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            spill = self.spill
            if spill is None or not spill.must_read_spill():
                return bool(self.steer.poll(remaining))
            if self.steer.poll(0):
                return True
            if remaining == 0:
                return False
            spill.take_spilled()
            zmq.select([self.steer, spill.spill_reader], [], [], min(remaining, 10) / 1000)

    def counts_of(self, reply: list[bytes]) -> dict[str, int]:
        """The counters since the proxy started, from a STATISTICS reply of
        the current run (libzmq's count from the run's start)."""
        return {name: self.run_base[name] + struct.unpack("=Q", part)[0]
                for name, part in zip(STAT_NAMES, reply)}

    def counters(self, wait_ms: int = STATISTICS_WAIT_MS) -> dict[str, int] | None:
        """libzmq's frame and byte counters since the proxy started, or None if
        the running loop does not answer within `wait_ms`."""
        if not self.running():
            return dict(self.counted)
        # A reply still owed (a question that timed out before) is waited for
        # first, briefly: without it the loop is busy, and no more questions
        # pile up behind. (Not waited for at all, it read as "blocked" while
        # the loop was only slow under a flood: /healthz 503.)
        if not self.answered(min(wait_ms, OWED_REPLY_WAIT_MS)):
            return None
        reply = self.send(STEER_STATISTICS, wait_ms)
        if reply is None:
            return None
        return self.counts_of(reply)

    def settle(self, wait_ms: int) -> None:
        """Before the loop is ended: its counters as they are now, kept for
        the runs after it (if it answers within `wait_ms`)."""
        counted = self.counters(wait_ms=wait_ms)
        if counted is not None:
            self.counted = counted

    def unanswered_s(self, now: float) -> float:
        """How long the loop has owed a steering reply at `now` (0.0: none owed)."""
        if not self.awaiting:
            return 0.0
        return round(now - self.awaiting[0][1], 3)

    def snapshot(self, now: float) -> dict[str, float | int]:
        return {"runs": self.runs, "desyncs": self.desyncs,
                "unanswered_s": self.unanswered_s(now)}

    def close(self) -> None:
        """The main thread's end of the pair (the loop's end is the loop
        thread's to close: _close_forwarding_sockets)."""
        if self.steer is not None:
            self.steer.close(linger=0)
