"""The writer's CPU per acknowledged message, in one process (not a test).

One Writer (this tree's, or another revision's) runs in the process with its
real sockets and SQLite database; a PUSH socket of another ZeroMQ context,
connected to its capture endpoint, is handed --messages acknowledged
messages of one producer session as a Publisher sends them (100-byte
payload, meta signed with the session key), all queued before the clock
starts. Then writer.loop() runs until every message is committed and its
acknowledgement sent. The CPU time of the writer's thread alone (user +
system, time.thread_time: not libzmq's I/O threads, not the sender) is
divided by the messages: what the writer's Python does for each one
(receive, validate, check the mac, buffer, commit, acknowledge). `--kind
ingest` times Writer.ingest alone on the same frames, without sockets or
commits.

Against another revision, rounds alternate the two trees (a fresh process
each, from that tree's code; the other revision checked out in a temporary
git worktree), so that both see the same noise; the medians and the ratio of
each pair are what to read:

    python bench/writer_ingest.py [--baseline REV] [--rounds 8] [--messages 20000]
                                  [--kind loop|ingest] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in the tree under test (cwd first on sys.path), so that its own packages are imported.
CHILD = r"""
import json, os, socket, sys, tempfile, time
import zmq
from bus import protocol
from bus.config import load_config
from bus.runner import StopSignal
from writer.service import Writer

messages, repeats, kind, profile = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                    sys.argv[4] == "1")

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
meta = protocol.MetaEncoder("bench", state.epoch, protocol.SessionMac(session_key))
payload = os.urandom(100)
topic = b"bench.acked"
sender_ctx = zmq.Context()
push = sender_ctx.socket(zmq.PUSH)
push.setsockopt(zmq.SNDHWM, 0)
push.connect(env["BUS_CAPTURE_ENDPOINT"])
seq = 0

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
    target = writer.metrics.total_writes + len(frames)
    started = time.thread_time()
    if profiler is not None:
        profiler.enable()
    while writer.metrics.total_writes < target or writer._owed_acks:
        writer.loop()
    if profiler is not None:
        profiler.disable()
    return time.thread_time() - started

def run_ingest(frames):
    ingest, now = writer.ingest, time.monotonic()
    started = time.thread_time()
    if profiler is not None:
        profiler.enable()
    for message in frames:
        ingest(message, now)
    if profiler is not None:
        profiler.disable()
    spent = time.thread_time() - started
    writer.flush("request", now)
    writer.send_notifications()
    return spent

profiler = None
run = run_loop if kind == "loop" else run_ingest
run(batch())  # warm up: caches, the database's first pages
if profile:
    import cProfile, pstats
    frames = batch()
    profiler = cProfile.Profile(time.thread_time)
    run(frames)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(40)
    profiler = None
results = [run(batch()) / messages * 1e6 for _ in range(repeats)]
assert writer.forged == 0 and not writer.rejected, (writer.forged, writer.rejected)
print("RESULTS " + json.dumps(results), flush=True)
push.close(linger=0)
sender_ctx.term()
writer.shutdown()
"""


def measure(tree: Path, messages: int, repeats: int, kind: str, profile: bool = False
            ) -> list[float]:
    """CPU microseconds per message of the writer's thread, `repeats` times."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(messages), str(repeats), kind,
                          "1" if profile else "0"], cwd=tree, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    # The writer logs to stdout too.
    return json.loads(next(line for line in out.splitlines()
                           if line.startswith("RESULTS "))[len("RESULTS "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to compare with (default: none)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3, help="batches timed per process")
    parser.add_argument("--kind", choices=("loop", "ingest"), default="loop")
    parser.add_argument("--profile", action="store_true",
                        help="print a cProfile (thread CPU) of one batch of this tree and exit")
    args = parser.parse_args()
    if args.profile:
        measure(ROOT, args.messages, 1, args.kind, profile=True)
        return
    trees = {"this": ROOT}
    with tempfile.TemporaryDirectory() as scratch:
        if args.baseline:
            other = Path(scratch) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other),
                            args.baseline], check=True, capture_output=True)
            trees = {"baseline": other, "this": ROOT}
        try:
            medians: dict[str, list[float]] = {name: [] for name in trees}
            for round_no in range(args.rounds):
                # Alternate which goes first, so neither always follows the other.
                order = list(trees) if round_no % 2 == 0 else list(reversed(trees))
                line = []
                for name in order:
                    median = statistics.median(measure(trees[name], args.messages,
                                                       args.repeats, args.kind))
                    medians[name].append(median)
                    line.append(f"{name} {median:.3f}")
                ratio = "" if len(trees) < 2 else \
                    f"  this/baseline {medians['this'][-1] / medians['baseline'][-1]:.3f}"
                print(f"round {round_no + 1}: " + ", ".join(line) + " us/msg" + ratio,
                      flush=True)
            for name, values in medians.items():
                print(f"{name}: median {statistics.median(values):.3f} us/msg "
                      f"(min {min(values):.3f}, max {max(values):.3f})")
            if len(trees) == 2:
                ratios = [t / b for t, b in zip(medians["this"], medians["baseline"])]
                print(f"this/baseline: median {statistics.median(ratios):.3f} "
                      f"({min(ratios):.3f}-{max(ratios):.3f})")
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(trees["baseline"])], check=False, capture_output=True)


if __name__ == "__main__":
    main()
