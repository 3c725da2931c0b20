"""The writer's CPU per acknowledged message, in one process (not a test).

One Writer (this tree's, or another revision's) runs in a process with its
real sockets and SQLite database; a PUSH socket of another ZeroMQ context,
connected to its capture endpoint, is handed --messages acknowledged
messages of one producer session as a Publisher sends them (100-byte
payload, meta signed with the session key), all queued before the clock
starts. Then writer.loop() runs until every message is committed and its
acknowledgement sent. The CPU time of the writer's thread alone (user +
system, time.thread_time: not libzmq's I/O threads, not the sender) is
divided by the messages: what the writer's Python does for each one
(receive, validate, check the mac, buffer, commit, acknowledge). `--kind
ingest` times the ingest of each message alone (writer/ingest.py,
Ingest.message) on the same frames, without sockets or commits.

Against another revision (checked out in a temporary git worktree), the two
writers run side by side, each in its own process, and take turns, one batch
each (in turn order ABBA...), so that both see the same noise of a shared
machine; the median of each side's batches and of the ratio of each pair are
what to read:

    python bench/writer_ingest.py [--baseline REV] [--rounds 40] [--messages 20000]
                                  [--kind loop|ingest] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in the tree under test (cwd first on sys.path), so that its own packages
# are imported. Reads a command a line: "run" times one batch and answers
# "RESULT <us per message>", "profile" prints a cProfile of one batch to
# stderr, end of input stops it.
CHILD = r"""
import os, shutil, socket, sys, tempfile, time
import zmq
from bus import protocol
from bus.config import load_config
from bus.runner import StopSignal
from writer.service import Writer

messages, kind = int(sys.argv[1]), sys.argv[2]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

workdir = tempfile.mkdtemp(prefix="writer-ingest-")
env = {"BUS_DB": os.path.join(workdir, "bus.db"), "BUS_LOG_LEVEL": "warning",
       "BUS_LOG_FORMAT": "json"}
for name in ("BUS_CAPTURE_ENDPOINT", "BUS_CONTROL_ENDPOINT", "BUS_NOTIFY_ENDPOINT"):
    env[name] = f"tcp://127.0.0.1:{free_port()}"
writer = Writer(load_config(env=env))
writer.initialize(StopSignal())
session_key = os.urandom(32)
state = writer.producers.open("bench", time.time_ns(), session_key)
assert writer.flush("request", time.monotonic())
if hasattr(writer, "commits"):  # the writer's parts (issue 24)
    ingest_part, notifications = writer.ingest, writer.notifications
    batch_metrics, take = writer.commits.metrics, writer.ingest.message
    owed_acks, send_notifications = (lambda: notifications.owed_acks), notifications.send
else:  # a revision before them: all in the Writer
    ingest_part, batch_metrics, take = writer, writer.metrics, writer.ingest
    owed_acks, send_notifications = (lambda: writer._owed_acks), writer.send_notifications
meta = protocol.MetaEncoder("bench", state.epoch, protocol.SessionMac(session_key))
payload = os.urandom(100)
topic = b"bench.acked"
sender_ctx = zmq.Context()
push = sender_ctx.socket(zmq.PUSH)
push.setsockopt(zmq.SNDHWM, 0)
push.connect(env["BUS_CAPTURE_ENDPOINT"])
seq = 0
profiler = None

def batch():
    global seq
    frames = []
    for _ in range(messages):
        seq += 1
        frames.append([topic, payload, meta.encode(seq, topic=topic, payload=payload)])
    return frames

def run_loop(frames):
    for message in frames:
        push.send_multipart(message)
    target = batch_metrics.total_writes + len(frames)
    received = ingest_part.messages_received + len(frames)
    started = time.thread_time()
    if profiler is not None:
        profiler.enable()
    while batch_metrics.total_writes < target or owed_acks():
        writer.loop()
        if ingest_part.messages_received == received and writer.buffer:
            # The batch's last rows, committed now rather than after
            # BATCH_FLUSH_INTERVAL_MS: the same work, without the wait.
            writer.flush("request", time.monotonic())
    if profiler is not None:
        profiler.disable()
    return time.thread_time() - started

def run_ingest(frames):
    ingest, now = take, time.monotonic()
    started = time.thread_time()
    if profiler is not None:
        profiler.enable()
    for message in frames:
        ingest(message, now)
    if profiler is not None:
        profiler.disable()
    spent = time.thread_time() - started
    writer.flush("request", now)
    send_notifications()
    return spent

run = run_loop if kind == "loop" else run_ingest
run(batch())  # warm up: caches, the database's first pages
print("READY", flush=True)
for command in sys.stdin:
    frames = batch()
    if command.strip() == "profile":
        import cProfile, pstats
        profiler = cProfile.Profile(time.thread_time)
        run(frames)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(40)
        profiler = None
        print("RESULT 0", flush=True)
    else:
        print(f"RESULT {run(frames) / messages * 1e6}", flush=True)
assert ingest_part.forged == 0 and not ingest_part.rejected, (ingest_part.forged,
                                                              ingest_part.rejected)
push.close(linger=0)
sender_ctx.term()
writer.shutdown()
shutil.rmtree(workdir)
"""


class Side:
    """One writer process of one tree, timing a batch when asked."""

    def __init__(self, tree: Path, messages: int, kind: str) -> None:
        # The same hash seed on both sides: the same dict and set layouts.
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(messages), kind],
                                     cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        self._answer("READY")

    def _answer(self, prefix: str) -> str:
        for line in self.proc.stdout:  # the writer logs to stdout too
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"the writer process exited ({self.proc.wait()})")

    def run(self, command: str = "run") -> float:
        """CPU microseconds per message of the writer's thread, one batch."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return float(self._answer("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to compare with (default: none)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--messages", type=int, default=20_000, help="messages a batch")
    parser.add_argument("--kind", choices=("loop", "ingest"), default="loop")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile (thread CPU) of one batch of this tree and exit")
    args = parser.parse_args()
    if args.profile:
        side = Side(ROOT, args.messages, args.kind)
        side.run("profile")
        side.close()
        return
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this": ROOT}
        if args.baseline:
            other = Path(scratch) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other),
                            args.baseline], check=True, capture_output=True)
            trees = {"baseline": other, "this": ROOT}
        sides: dict[str, Side] = {}
        try:
            sides.update((name, Side(tree, args.messages, args.kind))
                         for name, tree in trees.items())
            results: dict[str, list[float]] = {name: [] for name in trees}
            for round_no in range(args.rounds):
                order = list(trees) if round_no % 2 == 0 else list(reversed(trees))
                for name in order:
                    results[name].append(sides[name].run())
            for name, values in results.items():
                print(f"{name}: median {statistics.median(values):.3f} us/msg "
                      f"(min {min(values):.3f}, max {max(values):.3f}, {len(values)} batches "
                      f"of {args.messages})")
            if len(trees) == 2:
                ratios = sorted(t / b for t, b in zip(results["this"], results["baseline"]))
                quartiles = statistics.quantiles(ratios, n=4)
                print(f"this/baseline: median {statistics.median(ratios):.3f} "
                      f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})")
        finally:
            for side in sides.values():
                side.close()
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(trees["baseline"])], check=False, capture_output=True)


if __name__ == "__main__":
    main()
