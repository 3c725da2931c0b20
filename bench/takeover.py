"""A standby writer's takeover (issue 27), on one machine: a private
PostgreSQL server (tests/pgserver.py, durable), writer A and a standby B with
endpoints of their own (as on two hosts: each lists its own first, and the
proxy and the publisher connect to both), a proxy, and a publisher child
sending acknowledged messages at a steady rate. After 2 s, A is

    kill -9       killed: its kernel closes its connection, the server frees the lock
    terminated    its session ended by the server (pg_terminate_backend): A exits 75
    frozen        SIGSTOP: the server ends nothing by itself; B ends A's session once
                  it has sent nothing for BUS_PG_SESSION_TIMEOUT_S (--session-timeout),
                  then A is thawed and must exit 75 without committing

and the table says, for each round: how long until B said `took_over`
(from the moment A was hit), the publisher's longest and 99th-percentile wait
for an acknowledgement (what its application saw of the takeover), and what
the database holds: acknowledged messages missing (must be 0) and stored
twice (must be 0).

    python bench/takeover.py [--rounds 3] [--rate 2000] [--seconds 6] [--session-timeout 3]

Rounds alternate the three ways. Figures are of this machine; the takeover
after a lost host is bounded by BUS_PG_SESSION_TIMEOUT_S the same way as
`frozen` (README, "A standby writer").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bus_bench  # noqa: E402 (the children, free ports)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import Process  # noqa: E402 (a process's log events as they come)

WRITER_VARS = ("BUS_CAPTURE_ENDPOINT", "BUS_CONTROL_ENDPOINT", "BUS_NOTIFY_ENDPOINT")
WAYS = ("kill -9", "terminated", "frozen")


def bus_process(name: str, args: list[str], env: dict[str, str]) -> Process:
    """`bus-cli ARGS` whose JSON log lines are read as they come
    (tests/cluster.Process: `seen`, event -> when it was first read)."""
    return Process(name, [sys.executable, "-m", "cli.main", *args], env)


def one_round(url: str, way: str, rate: int, seconds: float, session_timeout: int) -> dict:
    ports = {name: (bus_bench.free_port(), bus_bench.free_port()) for name in WRITER_VARS}
    base = dict(os.environ, **bus_bench.endpoints(), BUS_DB=url, BUS_LOG_FORMAT="json",
                BUS_LOG_LEVEL="info", BUS_STANDBY_RETRY_MS="100",
                BUS_PG_SESSION_TIMEOUT_S=str(session_timeout))
    env_a = dict(base, **{n: f"tcp://127.0.0.1:{a},tcp://127.0.0.1:{b}"
                          for n, (a, b) in ports.items()})
    env_b = dict(base, **{n: f"tcp://127.0.0.1:{b},tcp://127.0.0.1:{a}"
                          for n, (a, b) in ports.items()})
    children: list[subprocess.Popen] = []
    try:
        return _hit(url, way, rate, seconds, session_timeout, env_a, env_b, children)
    finally:  # whatever went wrong, no process of the round is left behind
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGCONT)
                child.kill()
                child.wait(10)


def _hit(url: str, way: str, rate: int, seconds: float, session_timeout: int,
         env_a: dict[str, str], env_b: dict[str, str], children: list[subprocess.Popen]) -> dict:
    import psycopg
    writer_a = bus_process("writer A", ["writer"], env_a)
    children.append(writer_a.popen)
    bus_bench.wait_answering(env_a["BUS_CONTROL_ENDPOINT"])
    writer_b = bus_process("writer B", ["writer", "--standby"], env_b)
    children.append(writer_b.popen)
    writer_b.wait_for("standby_waiting", 15)
    proxy = bus_process("proxy", ["proxy"], env_a)
    children.append(proxy.popen)
    bus_bench.wait_answering(env_a["BUS_PROXY_CONTROL_ENDPOINT"])
    count = int(rate * seconds)
    publisher = bus_bench.run_child(["_publish_acked", env_a["BUS_PUB_ENDPOINT"],
                                     env_a["BUS_SUB_ENDPOINT"], str(count), str(rate)], env_a)
    children.append(publisher)
    time.sleep(2.0)  # a steady load first (the child paces itself)
    hit = time.monotonic()
    if way == "kill -9":
        writer_a.popen.kill()
    elif way == "terminated":
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                         "application_name = 'bus-writer' AND pid IN (SELECT pid FROM pg_locks"
                         " WHERE locktype = 'advisory' AND granted)")
    else:
        writer_a.popen.send_signal(signal.SIGSTOP)
    took_over = writer_b.wait_for("took_over", session_timeout + 30) - hit
    if way == "frozen":
        writer_a.popen.send_signal(signal.SIGCONT)
    old_exit = writer_a.popen.wait(30)
    figures = json.loads(publisher.stdout.readline())
    publisher.wait(30)
    with psycopg.connect(url, autocommit=True) as conn:
        stored, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT producer_seq) FROM messages").fetchone()
    codes = (proxy.stop(), writer_b.stop())
    if codes != (0, 0):
        raise RuntimeError(f"proxy, new writer exited {codes}")
    return {"way": way, "takeover_s": took_over, "old_exit": old_exit,
            "p99_ms": figures["p99_ms"], "max_ms": figures["max_ms"],
            "missing": count - distinct, "twice": stored - distinct}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--session-timeout", type=int, default=3)
    args = parser.parse_args()
    from tests.pgserver import PACKAGE_HINT, PgServer, find_bindir
    bindir = find_bindir()
    if bindir is None:
        print(f"bench: skipped: {PACKAGE_HINT}")
        return
    print(f"bench: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.rate} acknowledged msg/s for {args.seconds} s, "
          f"BUS_PG_SESSION_TIMEOUT_S={args.session_timeout}", flush=True)
    with tempfile.TemporaryDirectory(prefix="takeover-"):
        server = PgServer(bindir, bus_bench.free_port(), durable=True).start()
        rows = []
        try:
            for round_no in range(args.rounds):
                for way in WAYS:
                    row = one_round(server.create_database(), way, args.rate, args.seconds,
                                    args.session_timeout)
                    rows.append(row)
                    print(f"bench: round {round_no + 1} {way}: {row}", file=sys.stderr,
                          flush=True)
        finally:
            server.stop()
    bus_bench.print_table(
        ("old writer", "takeover s", "old exit", "ack p99 ms", "ack max ms", "missing", "twice"),
        [(r["way"], f"{r['takeover_s']:.2f}", str(r["old_exit"]), f"{r['p99_ms']:.1f}",
          f"{r['max_ms']:.0f}", str(r["missing"]), str(r["twice"])) for r in rows])


if __name__ == "__main__":
    main()
