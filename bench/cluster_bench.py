"""Three hosts across network namespaces (issue 27): the deployment of
tests/cluster.py (host A: PostgreSQL primary, proxy, writer; B: hot standby,
standby writer, reader; C: edge proxy, an acknowledged publisher, a live
subscriber through the edge), taken through the issue's scenarios in turn,
as tests/test_cluster.py does but with the issue's 30-second cuts:

    kill -9       of A's writer at --rate msg/s (B takes over; A's unit
                  restarts it as a standby)
    B cut         B's link down --cut-s s while B's writer is the active one
                  (A takes over; B's writer must exit 75 and never commit again)
    A cut         A's link down --cut-s s (the primary's host: nobody can
                  write; the bus waits)
    replica       B's hot standby stopped --replica-down-s s and started again

For each: takeover time (from the hit to the new writer's `took_over`),
acknowledged messages lost and stored twice (must be 0), what the old
writer did (commits after the takeover, from a statement trigger on
`messages` that records each committing client's address: must be 0), the
live subscriber's missing seqs and longest silence, and the publisher's
99th-percentile and longest wait for an acknowledgement (how long it saw
no progress). Then a subscriber catching up from the reader on the hot
standby through the edge: every stored message, gaps (must be 0).

    python bench/cluster_bench.py [--rate 5000] [--cut-rate 2000] [--cut-s 30]

Needs root (ip netns) and PostgreSQL's binaries; says which is missing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bus_bench  # noqa: E402 (print_table)
from tests.cluster import Deployment, Hosts, missing  # noqa: E402
from tests.pgserver import PACKAGE_HINT, find_bindir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=5000, help="msg/s of the kill -9 round")
    parser.add_argument("--cut-rate", type=int, default=2000, help="msg/s of the other rounds")
    parser.add_argument("--cut-s", type=float, default=30.0)
    parser.add_argument("--replica-down-s", type=float, default=10.0)
    parser.add_argument("--session-timeout", type=int, default=5,
                        help="BUS_PG_SESSION_TIMEOUT_S of the writers")
    args = parser.parse_args()
    why = missing() or (None if find_bindir() else PACKAGE_HINT)
    if why:
        print(f"bench: skipped: {why}")
        return
    print(f"bench: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {platform.node()}; three network namespaces on one "
          f"machine; BUS_PG_SESSION_TIMEOUT_S={args.session_timeout}", flush=True)
    hosts = Hosts()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as workdir:
        deployment = Deployment(hosts, Path(workdir), session_timeout_s=args.session_timeout)
        try:  # whatever fails, from the first namespace on, is undone
            hosts.up()
            deployment.start()
            rounds = (lambda: deployment.kill_writer(args.rate, 8),
                      lambda: deployment.cut("b", args.cut_rate, args.cut_s),
                      lambda: deployment.cut("a", args.cut_rate, args.cut_s),
                      lambda: deployment.restart_replica(args.cut_rate, args.replica_down_s))
            for run in rounds:
                started = time.monotonic()
                row = run()
                rows.append(row)
                print(f"bench: {row['scenario']}: {time.monotonic() - started:.0f} s: {row}",
                      file=sys.stderr, flush=True)
            caught_up = deployment.catch_up()
            stored = deployment.query(
                "SELECT count(*) FROM messages WHERE topic = 'bench.acked'")[0][0]
        finally:
            try:
                deployment.close()
            finally:
                hosts.close()
    bus_bench.print_table(
        ("scenario", "takeover s", "old writer", "lost", "twice", "live missing",
         "live silence s", "ack p99 ms", "ack max ms"),
        [(r["scenario"], "-" if r["takeover_s"] is None else f"{r['takeover_s']:.2f}",
          r["old_writer"], str(r["lost"]), str(r["twice"]), str(r["live_missing"]),
          f"{r['live_longest_silence_s']:.2f}", f"{r['ack_p99_ms']:,.0f}",
          f"{r['ack_max_ms']:,}") for r in rows])
    print(f"catching up from the reader on B's hot standby through the edge: "
          f"{caught_up.get('received')} of {stored} stored, {caught_up.get('gaps')} missing")


if __name__ == "__main__":
    main()
