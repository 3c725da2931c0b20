"""Audit seals: what sealing costs; prints a table (not a test).

1. Sealing: a SQLite bus holding --messages messages of orders.new (100-byte
   payloads, producer and seq in their meta), written straight into the
   database through the writer's own storage handle; the real writer, proxy
   and reader on it, then the anchor worker with BUS_AUDIT_PREFIXES=orders.
   against the bitcoind double (tests/bitcoind_double.py) or, with --node
   core, a real regtest Bitcoin Core (tests/regtest.py), unpaced
   (BUS_AUDIT_MAX_RATE very high: the cost of sealing as such). Measured from
   the worker's start until every message is sealed: the CPU of every process
   of the bus (user + system from /proc, libzmq's threads included): the
   worker's (its start-up included), the reader's (the pages the sealer
   reads), the writer's (the digests and seals it stores) and the proxy's,
   and bitcoind's; the sealer's own CPU as the worker's stats report it; wall
   time; peak RSS.
2. Persisted throughput while a seal runs, against with none: --rounds rounds,
   alternating which goes first, each on a fresh bus prefilled the same way,
   the worker started and settled (the reader quiet after the start-up's
   scans): one publisher floods --flood
   messages of bench.x as fast as it can until the last is stored
   (bus_bench.py's persisted msg/s), (a) with BUS_AUDIT_PREFIXES=orders.: the
   worker seals the backlog meanwhile, at the default BUS_AUDIT_MAX_RATE; (b)
   without: the same worker, nothing to seal. The table gives the ratio a/b
   of each round, their median, and how many messages were sealed during
   each flood. The worker runs at nice 10, as its systemd unit does.

    python bench/audit_bench.py [--messages 1000000] [--flood 300000] [--rounds 3]
                                [--node double|core]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bus.config import SETTINGS  # noqa: E402
from bus_bench import Bus, cpu_seconds, free_port, peak_rss_mb, persisted_rate  # noqa: E402


def prefill(db: str, count: int) -> float:
    """`count` orders.new messages, as the writer stores them; seconds taken."""
    import msgpack

    import storage
    started = time.monotonic()
    store = storage.open_store(db)
    payload = os.urandom(100)
    now = time.time_ns()
    try:
        for start in range(1, count + 1, 20_000):
            rows = [("orders.new", payload, msgpack.packb({"producer": "desk-1", "seq": seq}),
                     "desk-1", seq, now) for seq in range(start, min(start + 20_000, count + 1))]
            store.write_batch(rows)
    finally:
        store.close()
    return time.monotonic() - started


def worker_stats(bus: Bus) -> dict:
    from bus.client import ControlClient
    with ControlClient(bus.env["BUS_ANCHOR_CONTROL_ENDPOINT"], timeout_ms=2000) as client:
        return client.request("stats")


NICE = 10  # as deploy/systemd/bus-anchor.service runs the worker (Nice=10)
DEFAULT_RATE = next(s.default for s in SETTINGS if s.field == "audit_max_rate")


def start_worker(bus: Bus) -> subprocess.Popen:
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "anchor"], cwd=ROOT,
                              env=dict(bus.env, BUS_LOG_LEVEL="info"), stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: os.nice(NICE))
    threading.Thread(target=worker.stderr.read, daemon=True).start()  # keep the pipe empty
    return worker


def sealed(bus: Bus) -> int:
    try:
        return worker_stats(bus)["audit"]["sealed_messages"]
    except Exception:  # not answering yet (starting)
        return 0


def new_bus(workdir: Path, node, messages: int, sealed: bool = True,
            max_rate: float | None = None) -> tuple[Bus, float]:
    workdir.mkdir()
    fill_s = prefill(str(workdir / "bus.db"), messages)
    settings = {"BUS_BITCOIND_RPC_URL": node.url, "BUS_BITCOIND_RPC_USER": node.user,
                "BUS_BITCOIND_RPC_PASSWORD": node.password,
                "BUS_BITCOIND_ZMQ_HASHBLOCK": node.zmq_endpoint,
                "BUS_ANCHOR_FEE_RATE_SAT_VB": "2", "BUS_ANCHOR_INTERVAL_S": "1",
                "BUS_AUDIT_PREFIXES": "orders." if sealed else "", "BUS_AUDIT_INTERVAL_S": "1",
                "BUS_ANCHOR_CONTROL_ENDPOINT": f"tcp://127.0.0.1:{free_port()}"}
    if max_rate is not None:
        settings["BUS_AUDIT_MAX_RATE"] = str(max_rate)
    return Bus(workdir, **settings), fill_s


def node_pid(node) -> int | None:
    """bitcoind's pid (a real node), or None (the double runs in this process)."""
    process = getattr(node, "process", None)
    return process.pid if process is not None else None


def seal_run(workdir: Path, node, messages: int) -> dict:
    bus, fill_s = new_bus(workdir, node, messages, max_rate=1e9)
    try:
        processes = {"writer": bus.writer.pid, "proxy": bus.proxy.pid, "reader": bus.reader.pid}
        if node_pid(node) is not None:
            processes["bitcoind"] = node_pid(node)
        before = {name: cpu_seconds(pid) for name, pid in processes.items()}
        started = time.monotonic()
        worker = start_worker(bus)
        while sealed(bus) < messages:
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with {worker.returncode}")
            if time.monotonic() - started > 600:
                raise TimeoutError("not sealed after 600 s")
            time.sleep(0.1)
        wall = time.monotonic() - started
        cpu = cpu_seconds(worker.pid)
        others = {name: cpu_seconds(pid) - before[name] for name, pid in processes.items()}
        stats = worker_stats(bus)["audit"]
        rss = peak_rss_mb(worker.pid)
        worker.terminate()
        worker.wait(30)
        writer_rss, _, _ = bus.stop()
        return {"fill_s": fill_s, "wall_s": wall, "worker_cpu_s": cpu, "others_cpu_s": others,
                "sealer_cpu_s": stats["cpu_s"], "seals": stats["seals"], "worker_rss": rss,
                "writer_rss": writer_rss, "db_mb": os.path.getsize(bus.db) / 1e6}
    except BaseException:
        bus.stop()
        raise


def flood_round(workdir: Path, node, messages: int, flood: int, sealing: bool,
                rate: float) -> dict:
    """The worker runs in both cases (started, synced, settled for 2 s), with
    BUS_AUDIT_PREFIXES set (a backlog of `messages` to seal) or not: the
    difference is the sealing alone."""
    bus, _ = new_bus(workdir, node, messages, sealed=sealing, max_rate=rate)
    worker = start_worker(bus)
    try:
        deadline = time.monotonic() + 60
        while not worker_ready(bus, sealing):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the worker did not start (sealing)")
            time.sleep(0.05)
        settle(bus)
        before = progress(bus) if sealing else 0
        rate = persisted_rate(bus.env, bus.db, flood, "bus")
        during = progress(bus) - before if sealing else 0
        return {"rate": rate, "sealed_during": during}
    finally:
        worker.terminate()
        worker.wait(30)
        bus.stop()


def settle(bus: Bus) -> None:
    """Until the start-up's reads are over: the worker's durable consumer
    scans the stored messages for anchor.request when it starts (a million
    rows: seconds of the reader's CPU), which must not overlap either flood.
    Quiet: the reader used under 25% of a core in the last half second."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        used = cpu_seconds(bus.reader.pid)
        time.sleep(0.5)
        if cpu_seconds(bus.reader.pid) - used < 0.125:
            return
    raise RuntimeError("the reader did not settle in 60 s")


def worker_ready(bus: Bus, sealing: bool) -> bool:
    """The worker answers, and its sealer has begun (a page read)."""
    try:
        stats = worker_stats(bus)
    except Exception:
        return False
    return stats["audit"]["pages"] > 0 if sealing else stats["wallet_sync"]["ready"]


def progress(bus: Bus) -> int:
    audit = worker_stats(bus)["audit"]
    return audit["sealed_messages"] + audit["in_progress"]


def start_node(kind: str, workdir: Path):
    """The double, or a real regtest node on a private datadir and free ports."""
    if kind == "core":
        from tests.regtest import RegtestNode, missing
        if missing():
            sys.exit(f"--node core: {missing()}")
        return RegtestNode(workdir / "bitcoind", free_port)
    from tests.bitcoind_double import BitcoindDouble
    return BitcoindDouble()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--flood", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=DEFAULT_RATE,
                    help="BUS_AUDIT_MAX_RATE while the floods run")
    ap.add_argument("--node", choices=("double", "core"), default="double",
                    help="the bitcoind double, or a real regtest Bitcoin Core (tests/regtest.py)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        node = start_node(args.node, work)
        try:
            node.fund([1_000_000] * 20)
            seal = seal_run(work / "seal", node, args.messages)
            print(f"sealed {args.messages:,} in {seal['wall_s']:.1f} s: worker CPU "
                  f"{seal['worker_cpu_s']:.2f} s (sealer {seal['sealer_cpu_s']:.2f} s), "
                  f"{seal['seals']} seals", flush=True)
            ratios, during = [], []
            for n in range(args.rounds):
                result = {}
                for sealing in ((True, False) if n % 2 == 0 else (False, True)):
                    result[sealing] = flood_round(work / f"round-{n}-{sealing}", node,
                                                  args.messages, args.flood, sealing,
                                                  args.rate)
                ratios.append(result[True]["rate"] / result[False]["rate"])
                during.append(result[True]["sealed_during"])
                print(f"round {n + 1}: persisted {result[False]['rate']:,.0f} msg/s without, "
                      f"{result[True]['rate']:,.0f} msg/s while sealing "
                      f"({result[True]['sealed_during']:,} sealed meanwhile): "
                      f"{ratios[-1]:.3f}", flush=True)
        finally:
            node.close()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.messages:,} stored messages of 100 bytes; "
          f"node: {args.node}")
    print("| | |\n|---|---:|")
    print(f"| worker CPU to seal {args.messages:,}, unpaced (from its start) | "
          f"{seal['worker_cpu_s']:.2f} s |")
    print(f"| the sealer's own CPU | {seal['sealer_cpu_s']:.2f} s |")
    others = seal["others_cpu_s"]
    print("| meanwhile, the other processes: " + ", ".join(others) + " | "
          + " / ".join(f"{cpu:.2f}" for cpu in others.values()) + " s |")
    bus_cpu = seal["worker_cpu_s"] + sum(cpu for name, cpu in others.items()
                                        if name != "bitcoind")
    print(f"| CPU of the whole bus to seal them (worker + writer + proxy + reader) | "
          f"{bus_cpu:.2f} s |")
    print(f"| wall time to seal, unpaced | {seal['wall_s']:.1f} s ({seal['seals']} seals) |")
    print(f"| peak RSS: worker / writer | {seal['worker_rss']:.0f} / {seal['writer_rss']:.0f} MB |")
    print(f"| database: {args.messages:,} messages and their seals | {seal['db_mb']:.0f} MB |")
    if not ratios:
        return
    print(f"| persisted msg/s while sealing (BUS_AUDIT_MAX_RATE {args.rate:,.0f}) / without,"
          " by round | "
          f"{', '.join(f'{r:.3f}' for r in ratios)} |")
    print(f"| median | {statistics.median(ratios):.3f} |")
    print(f"| messages sealed during each flood | {', '.join(f'{d:,}' for d in during)} |")


if __name__ == "__main__":
    main()
