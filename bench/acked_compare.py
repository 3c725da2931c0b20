"""Acknowledged publishing of this tree against another revision, side by side
(not a test): what producer sessions and nacks cost (issue #10's target: at
most 5% of acknowledged throughput).

The other revision is checked out in a temporary git worktree. Rounds
alternate the two trees, each a fresh bus (writer + proxy, from that tree's
code) on free loopback ports and one Publisher process (that tree's client)
publishing --messages 100-byte messages with up to 100,000 unacknowledged,
timed until every one is acknowledged. The machine is shared and noisy: the
ratio of each round, taken minutes apart at most, is what to read.

    python bench/acked_compare.py [--baseline 4549d21] [--messages 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in the tree under test (cwd), so that its own `bus` package is imported.
PUBLISHER = """
import json, os, time
from bus.client import Publisher
from bus.config import load_config
count = int(os.environ["BENCH_MESSAGES"])
payload = os.urandom(100)
pub = Publisher(load_config(), linger_ms=60000).connect()
started = time.perf_counter()
for _ in range(count):
    pub.publish("bench.acked", payload)
pub.flush(timeout=300)
print(json.dumps({"rate": count / (time.perf_counter() - started)}), flush=True)
pub.close()
"""

ROLES = ("writer", "proxy")
ENDPOINTS = ("BUS_PUB_ENDPOINT", "BUS_SUB_ENDPOINT", "BUS_CAPTURE_ENDPOINT",
             "BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT", "BUS_READ_ENDPOINT",
             "BUS_NOTIFY_ENDPOINT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ping(endpoint: str, deadline: float) -> None:
    from bus.client import BusError, ControlClient
    while True:
        with ControlClient(endpoint, timeout_ms=300) as client:
            try:
                client.request("ping")
                return
            except BusError:
                if time.monotonic() > deadline:
                    raise


def acked_rate(tree: Path, workdir: Path, messages: int) -> float:
    env = dict(os.environ, BUS_DB=str(workdir / "bus.db"), BUS_LOG_FORMAT="json",
               BUS_LOG_LEVEL="warning", BENCH_MESSAGES=str(messages),
               **{name: f"tcp://127.0.0.1:{free_port()}" for name in ENDPOINTS})
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", role], cwd=tree, env=env)
             for role in ROLES]
    try:
        deadline = time.monotonic() + 15
        for name in ("BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT"):
            wait_ping(env[name], deadline)
        out = subprocess.run([sys.executable, "-c", PUBLISHER], cwd=tree, env=env, check=True,
                             capture_output=True, text=True, timeout=600).stdout
        return json.loads(out.splitlines()[-1])["rate"]
    finally:
        for proc in reversed(procs):  # the proxy first, as systemd stops them
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="4549d21",
                        help="git revision to compare with (default: main before issue #10)")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bus-compare-") as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline),
                        args.baseline], check=True, capture_output=True)
        try:
            rates: dict[str, list[float]] = {"baseline": [], "current": []}
            for n in range(args.rounds):
                for name, tree in (("baseline", baseline), ("current", ROOT)):
                    workdir = Path(tmp) / f"{name}-{n}"
                    workdir.mkdir()
                    rates[name].append(acked_rate(tree, workdir, args.messages))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(baseline)], check=False)
    print(f"acknowledged publishing, {args.messages:,} messages of 100 bytes per run, "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'round':>5}  {'baseline ' + args.baseline:>18}  {'current':>12}  ratio")
    for n, (old, new) in enumerate(zip(rates["baseline"], rates["current"]), 1):
        print(f"{n:>5}  {old:>14,.0f} msg/s  {new:>8,.0f} msg/s  {new / old:.3f}")
    ratios = [new / old for old, new in zip(rates["baseline"], rates["current"])]
    print(f"median ratio current/baseline: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
