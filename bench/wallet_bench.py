"""Benchmark of the anchor worker's wallet sync on a real regtest Bitcoin Core; prints a table (not a test).

For each wallet shape (--shapes: `distinct` amounts, or `equal` ones, as a
wallet pre-split for anchoring is) and size (--utxos):
  1. a regtest bitcoind (tests/regtest.py; BUS_TEST_BITCOIND names the
     binary) and, in the worker's wallet `anchoring`, a descriptor of its
     own (wpkh, private key, range 0..N+2,000, imported without rescan); the
     miner's wallet pays it --per-tx outputs a transaction (`sendmany`, each
     paid from a coinbase of its own), --per-block transactions a block:
     distinct amounts are 10,000 + i sat, equal ones 20,000 sat;
  2. bitcoind restarted (a cold wallet, a fresh RSS), then its own
     `listunspent` of everything, once, timed to the last byte of its answer
     (not parsed), and bitcoind's peak RSS (VmHWM, reset through
     /proc/PID/clear_refs) from its RSS before;
  3. bitcoind restarted again; the real writer, proxy and reader, then the
     anchor worker (`bus-cli anchor`, BUS_ANCHOR_SYNC_PAGE --page): the full
     load's time (its `wallet_loaded` log line, and from the worker's start
     to `anchor_ready`), the worker's peak RSS (VmHWM) and bitcoind's during
     the load;
  4. an incremental sync: 1,000 more outputs of the same shape in one
     transaction, mined; the time from the block's `generatetoaddress`
     returning to the worker's `stats` showing that tip (bitcoind's wallet
     taking in the block included: listsinceblock waits for it), and the
     sync's own (its `wallet_synced` log line);
  5. `bus-cli anchor submit FILE --wait` (BUS_ANCHOR_INTERVAL_S=1), timed to
     its proof; then --reservations reservations over REQ/REP from one client
     (p50/p99), as bench/anchor_bench.py makes them;
  6. the worker's peak RSS at the end and its sync counters.

--worker-root PATH runs the worker from another checkout (e.g. one
extracted with `git archive COMMIT`), to measure an earlier sync.

    python bench/wallet_bench.py [--utxos 100000] [--shapes distinct,equal] [--page 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from anchor_bench import reservations  # noqa: E402
from bus_bench import Bus, free_port, peak_rss_mb  # noqa: E402

INCREMENT = 1_000          # outputs of the incremental sync
EQUAL_SAT = 20_000


def reset_peak_rss(pid: int) -> None:
    """VmHWM starts again from the current RSS (proc(5), clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def amounts(shape: str, start: int, count: int) -> list[int]:
    return [EQUAL_SAT] * count if shape == "equal" else \
        [10_000 + i for i in range(start, start + count)]


def import_descriptor(node: Any, size: int) -> str:
    """A wpkh descriptor with its private key in the worker's wallet, range
    0..size-1, no rescan; returned with its checksum, for deriveaddresses."""
    from embit import bip32
    from embit.networks import NETWORKS
    root = bip32.HDKey.from_seed(hashlib.sha256(b"wallet bench %d" % size).digest(),
                                 version=NETWORKS["regtest"]["xprv"])
    desc = f"wpkh({root.to_base58()}/0/*)"
    desc = f"{desc}#{node.rpc.call('getdescriptorinfo', desc)['checksum']}"
    [result] = node.rpc.call("importdescriptors", [{"desc": desc, "range": [0, size - 1],
                                                    "timestamp": "now", "active": False}])
    if not result.get("success"):
        raise RuntimeError(f"importdescriptors: {result}")
    return desc


def pay(node: Any, desc: str, start: int, sats: list[int]) -> str:
    """One sendmany from the miner: sats[i] to the descriptor's address start + i."""
    from anchor.bitcoind import to_btc
    addresses = node.rpc.call("deriveaddresses", desc, [start, start + len(sats) - 1])
    return node.miner.call("sendmany", "", dict(zip(addresses, (to_btc(s) for s in sats))))


def build_wallet(node: Any, shape: str, size: int, per_tx: int, per_block: int) -> dict:
    started = time.monotonic()
    desc = import_descriptor(node, size + INCREMENT + 1_000)
    import_s = time.monotonic() - started
    transactions = -(-size // per_tx)
    node.mine(transactions)  # a mature coinbase for each payment: no chain of unconfirmed change
    sent = 0
    blocks = 0
    while sent < size:
        count = min(per_tx, size - sent)
        pay(node, desc, sent, amounts(shape, sent, count))
        sent += count
        if (sent // per_tx) % per_block == 0 or sent == size:
            node.mine(1)
            blocks += 1
    node.mine(1)
    return {"desc": desc, "import_s": import_s, "build_s": time.monotonic() - started,
            "blocks": blocks + 1}


def restart(node: Any) -> None:
    """bitcoind stopped and started again on its datadir (its wallets load
    again), then asked once so that the wallet has caught up with the chain."""
    import tests.regtest
    tests.regtest.START_DEADLINE = 600.0  # loading a wallet of 173,000 outputs takes a while
    node.stop()
    node.start()
    node.rpc.call("listunspent", 0, 9_999_999, [], False, {"maximumCount": 1})


def core_listunspent(node: Any) -> dict[str, float]:
    """listunspent of everything with the worker's own arguments, timed to
    the last byte (not parsed); bitcoind's peak RSS meanwhile."""
    import base64
    pid = node.process.pid
    reset_peak_rss(pid)
    before = rss_mb(pid)
    auth = base64.b64encode(f"{node.user}:{node.password}".encode()).decode()
    body = json.dumps({"jsonrpc": "1.0", "id": 1, "method": "listunspent",
                       "params": [0, 9_999_999, [], False, {}]})
    conn = http.client.HTTPConnection("127.0.0.1", node.rpc_port, timeout=600)
    started = time.monotonic()
    conn.request("POST", f"/wallet/{node.wallet}", body, {"Authorization": f"Basic {auth}"})
    data = conn.getresponse().read()
    seconds = time.monotonic() - started
    conn.close()
    return {"seconds": seconds, "mb": len(data) / 1e6, "rss_before": before,
            "rss_peak": peak_rss_mb(pid)}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def worker_stats(env: dict[str, str]) -> dict:
    from bus.client import ControlClient
    with ControlClient(env["BUS_ANCHOR_CONTROL_ENDPOINT"], timeout_ms=5000) as client:
        return client.request("stats")


def start_worker(bus: Bus, root: Path, synced: list[dict]
                 ) -> tuple[subprocess.Popen, dict, float]:
    """The worker, until `anchor_ready`: its `wallet_loaded` event and the
    wall time; its later `wallet_synced` events are appended to `synced`."""
    env = dict(bus.env, BUS_LOG_LEVEL="info", BUS_LOG_FORMAT="json")
    if root != ROOT:
        env["PYTHONPATH"] = str(root)
    started = time.monotonic()
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "anchor"], cwd=root, env=env,
                              stderr=subprocess.PIPE, text=True)
    loaded: dict = {}
    for line in worker.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "wallet_loaded":
            loaded = event
        if event.get("event") == "anchor_ready":
            break
        if event.get("level") in ("error", "critical"):
            print("worker:", line.strip(), file=sys.stderr)
    else:
        raise RuntimeError(f"the worker exited with {worker.wait()} before anchor_ready")
    ready_s = time.monotonic() - started

    def read_on() -> None:  # and keep the pipe empty
        for line in worker.stderr:
            if '"wallet_synced"' in line:
                synced.append(json.loads(line))

    threading.Thread(target=read_on, daemon=True).start()
    return worker, loaded, ready_s


def incremental(node: Any, bus: Bus, shape: str, desc: str, start: int) -> float:
    pay(node, desc, start, amounts(shape, start, INCREMENT))
    [block] = node.mine(1)
    started = time.monotonic()
    height = node.rpc.call("getblockheader", block)["height"]
    deadline = started + 600
    while worker_stats(bus.env)["wallet_sync"]["tip_height"] != height:
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not sync the new block in 600 s")
        time.sleep(0.01)
    return time.monotonic() - started


def submit_wait(bus: Bus, workdir: Path) -> float:
    document = workdir / "document.txt"
    document.write_text(f"wallet bench {time.time_ns()}\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cli.main", "anchor", "submit", str(document),
                           "--wait"], cwd=ROOT, env=bus.env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"anchor submit --wait: {done.returncode} {done.stderr.strip()}")
    return time.monotonic() - started


def run(shape: str, size: int, args: argparse.Namespace, workdir: Path) -> dict:
    from tests.regtest import RegtestNode
    workdir = workdir / f"{shape}-{size}"
    workdir.mkdir()
    node = RegtestNode(workdir / "bitcoind", free_port)
    worker = None
    bus = None
    try:
        built = build_wallet(node, shape, size, args.per_tx, args.per_block)
        print(f"{shape} {size:,}: wallet built in {built['build_s']:.0f} s "
              f"(descriptor import {built['import_s']:.1f} s, {built['blocks']} blocks)",
              flush=True)
        restart(node)  # a cold wallet (Core's caches empty) and a fresh RSS for each measure
        core = core_listunspent(node)
        restart(node)
        settings = {"BUS_BITCOIND_RPC_URL": node.url, "BUS_BITCOIND_RPC_USER": node.user,
                    "BUS_BITCOIND_RPC_PASSWORD": node.password,
                    "BUS_BITCOIND_ZMQ_HASHBLOCK": node.zmq_endpoint,
                    "BUS_ANCHOR_CONTROL_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
                    "BUS_ANCHOR_INTERVAL_S": "1", "BUS_ANCHOR_SYNC_PAGE": str(args.page)}
        bus = Bus(workdir, **settings)
        reset_peak_rss(node.process.pid)
        core_before_load = rss_mb(node.process.pid)
        synced: list[dict] = []
        worker, loaded, ready_s = start_worker(bus, Path(args.worker_root).resolve(), synced)
        load_rss = peak_rss_mb(worker.pid)
        core_load_rss = peak_rss_mb(node.process.pid)
        table_rows = worker_stats(bus.env)
        synced_s = incremental(node, bus, shape, built["desc"], size)
        submit_s = submit_wait(bus, workdir)
        reserved = reservations(bus.env, args.reservations, 1)
        stats = worker_stats(bus.env)
        return {"shape": shape, "size": size, "built": built, "core": core,
                "load_s": loaded.get("seconds"), "loaded": loaded.get("utxos"),
                "ready_s": ready_s, "load_rss": load_rss, "core_load_rss": core_load_rss,
                "core_before_load": core_before_load,
                "incremental_s": synced_s, "submit_s": submit_s, "reserve": reserved,
                "sync_s": synced[0].get("seconds") if synced else None,
                "rss": peak_rss_mb(worker.pid),
                "counters": stats["wallet_sync"].get("counters", {}),  # none before 6a4af6a
                "lag": table_rows["wallet_sync"]["lag_blocks"],
                "loadavg": os.getloadavg()}  # a shared machine: what else ran meanwhile
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(60)
        if bus is not None:
            bus.stop()
        node.close()
        node.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utxos", default="100000", help="wallet sizes, comma-separated")
    ap.add_argument("--shapes", default="distinct,equal")
    ap.add_argument("--page", type=int, default=1000)
    ap.add_argument("--per-tx", type=int, default=2000)
    ap.add_argument("--per-block", type=int, default=5)
    ap.add_argument("--reservations", type=int, default=2000)
    ap.add_argument("--worker-root", default=str(ROOT))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.utxos.split(",")):
            for shape in args.shapes.split(","):
                results.append(run(shape, size, args, Path(tmp)))
                r = results[-1]
                print(json.dumps({k: v for k, v in r.items() if k != "built"}, default=str),
                      flush=True)
    version = subprocess.run([os.environ.get("BUS_TEST_BITCOIND") or
                              str(ROOT.parent / "shared" / "bitcoin" / "bin" / "bitcoind"),
                              "-version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {version}; page {args.page}, {args.per_tx} outputs a "
          f"transaction, {args.per_block} transactions a block")
    print("| wallet | full load (worker's log / to anchor_ready) | worker peak RSS: load / end "
          "| bitcoind's listunspent of all (answer) | bitcoind peak RSS: the load / its "
          "listunspent of all | incremental sync of 1,000: block to synced (the sync's own) | submit --wait | reserve p50 / p99 "
          "| listunspent calls (streamed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c, core = r["counters"], r["core"]
        print(f"| {r['size']:,} {r['shape']} ({r['built']['blocks']} blocks) "
              f"| {r['load_s']:.1f} / {r['ready_s']:.1f} s | {r['load_rss']:.0f} / {r['rss']:.0f} MB "
              f"| {core['seconds']:.1f} s ({core['mb']:.0f} MB) "
              f"| {r['core_load_rss']:.0f} MB (from {r['core_before_load']:.0f}) / "
              f"{core['rss_peak']:.0f} MB (from {core['rss_before']:.0f}) "
              f"| {r['incremental_s']:.2f} s ({r['sync_s'] or float('nan'):.2f} s) "
              f"| {r['submit_s']:.2f} s "
              f"| {r['reserve']['p50_ms']:.2f} / {r['reserve']['p99_ms']:.2f} ms "
              f"| {c.get('listunspent_calls', '?')} ({c.get('streamed', '?')}) |")


if __name__ == "__main__":
    main()
