"""Benchmark of UTXO reservations and anchoring; prints a table (not a test).

For each table size (--sizes, default 1,000 and 1,000,000 UTXOs):
  1. the `utxos` table is filled directly in SQLite (what a full wallet load
     would leave: amounts 600-1,799 sat, all confirmed) plus 3 real UTXOs of
     the bitcoind double (tests/bitcoind_double.py: bitcoind cannot be
     installed here);
  2. the real writer, proxy and reader start on it; one client process makes
     --reservations reservations over REQ/REP, one after the other (latency
     of each: p50/p99, and reservations/s), then releases them; then 4 client
     processes at once make as many in all (reservations/s together); at most
     80% of the table is reserved at once;
  3. the anchor worker (`bus-cli anchor`) starts, --documents anchor.request
     messages are published, and it anchors them in one transaction; every
     inclusion proof of its anchor.submitted events is checked against the
     OP_RETURN of the transaction the double received;
  4. peak RSS (VmHWM) of the writer and of the worker.
The table's amounts are below what an anchoring needs (it reserves at least
fee x 4 + 546 sat), so the worker's smallest-sufficient pick seeks past a
million rows to one of the double's UTXOs, the only ones it can sign.

With --node core, the anchoring alone through a real regtest Bitcoin Core
(tests/regtest.py; BUS_TEST_BITCOIND names it): --single anchors of one
document, then one of --documents, each then confirmed (see run_core).

    python bench/anchor_bench.py [--sizes 1000,1000000] [--reservations 5000]
    python bench/anchor_bench.py --node core [--single 20] [--documents 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bus_bench import Bus, cpu_seconds, free_port, peak_rss_mb  # noqa: E402


def fill_table(db: str, size: int, real: list[dict], tip: tuple[int, str]) -> float:
    """Create the schema and `size` UTXO rows (+ the double's `real` ones)."""
    from anchor.bitcoind import to_sat
    from storage.sqlite import connect
    from storage.utxos import write_tip
    started = time.monotonic()
    conn = connect(db)
    height = tip[0]
    now = time.time_ns()
    sql = ("INSERT INTO utxos (txid, vout, amount_sat, address, script_pubkey, block_height,"
           " block_time, status, sync_generation, updated_ns)"
           " VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, ?)")
    for start in range(0, size, 50_000):
        rows = [(hashlib.sha256(b"utxo %d" % i).hexdigest(), i % 4, 600 + (i * 7919) % 1200,
                 "bcrt1qbench", "0014" + "00" * 20, max(1, height - i % 100), 1_700_000_000, now)
                for i in range(start, min(size, start + 50_000))]
        with conn:
            conn.executemany(sql, rows)
    with conn:
        conn.executemany(sql, [(u["txid"], u["vout"], to_sat(u["amount"]), u["address"],
                                u["scriptPubKey"], height - u["confirmations"] + 1,
                                1_700_000_000, now) for u in real])
        write_tip(conn, height, tip[1])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - started


def child_reserve(endpoint: str, count: int, seed: int) -> None:
    """`count` reservations (timed), then their releases (not timed)."""
    from anchor.reservations import UtxoClient
    rng = random.Random(seed)
    latencies, leases = [], []
    with UtxoClient(endpoint) as client:
        started = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            leases.append(client.reserve(rng.randrange(600, 1800), 60)["lease_id"])
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        for lease_id in leases:
            client.release(lease_id)
    print(json.dumps({"latencies": latencies, "elapsed": elapsed}), flush=True)


def reservations(env: dict[str, str], count: int, clients: int) -> dict[str, float]:
    children = [subprocess.Popen([sys.executable, __file__, "_reserve",
                                  env["BUS_CONTROL_ENDPOINT"], str(count), str(seed)],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
                for seed in range(clients)]
    results = [json.loads(child.stdout.readline()) for child in children]
    for child in children:
        child.wait(60)
    latencies = sorted(x for r in results for x in r["latencies"])
    return {"p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
            "rate": clients * count / max(r["elapsed"] for r in results),
            "count": clients * count}


def raw_tx_of(node) -> Callable[[str], str]:
    """How to read a transaction's hex from the node: the double keeps what it
    received; Core answers getrawtransaction (mempool or wallet)."""
    from tests.bitcoind_double import BitcoindDouble
    if isinstance(node, BitcoindDouble):
        return lambda txid: node.txs[txid].tx.serialize().hex()
    return lambda txid: node.getrawtransaction(txid)


def anchor_documents(bus: Bus, node, documents: int, rounds: int = 1, label: str = "",
                     confirm: Callable[[], object] | None = None) -> dict:
    """Start the worker; `rounds` times, publish `documents` requests and wait
    for their anchor (BUS_ANCHOR_MAX_DOCUMENTS = documents: anchored as soon
    as they are all in); check every proof against its transaction's
    OP_RETURN as the node has it. Wall time of each round, the worker's CPU
    during the rounds and from its start (wallet sync included). With
    `confirm` (mining the blocks needed): how long from those blocks to the
    last anchor.confirmed."""
    import msgpack

    from anchor.bitcoind import op_return_outputs, parse_tx
    from proofs.merkle import root_from_path
    from bus.client import Publisher, Subscriber
    from bus.config import load_config
    cfg = load_config(env=bus.env)
    raw_tx = raw_tx_of(node)
    events = Subscriber(["anchor.submitted", "anchor.confirmed"], cfg)
    worker = subprocess.Popen([sys.executable, "-m", "cli.main", "anchor"], cwd=ROOT,
                              env=dict(bus.env, BUS_LOG_LEVEL="info",
                                       BUS_ANCHOR_MAX_DOCUMENTS=str(documents)),
                              stderr=subprocess.PIPE, text=True)
    try:
        for line in worker.stderr:
            if '"anchor_ready"' in line:
                break
        threading.Thread(target=worker.stderr.read, daemon=True).start()  # keep the pipe empty
        cpu_ready = cpu_seconds(worker.pid)
        walls, verified, txids = [], 0, set()
        with Publisher(cfg) as pub:
            for r in range(rounds):
                hashes = [hashlib.sha256(b"bench document %s%d.%d" % (label.encode(), r, i))
                          .digest() for i in range(documents)]
                started = time.monotonic()
                for h in hashes:
                    pub.publish("anchor.request", msgpack.packb({"hash": h}))
                pub.flush(60)
                proofs: dict[bytes, dict] = {}
                while len(proofs) < documents:
                    msg = events.receive(120)
                    if msg is None:
                        raise TimeoutError(f"{len(proofs)} of {documents} documents anchored "
                                           "after 120 s")
                    if msg.topic != "anchor.submitted":
                        continue
                    body = msgpack.unpackb(msg.payload, raw=False)
                    for d in body["documents"]:
                        proofs[d["hash"]] = {**d, "txid": body["txid"], "size": body["tree_size"]}
                walls.append(time.monotonic() - started)
                payloads = {}
                for h, p in proofs.items():
                    if p["txid"] not in payloads:
                        [(_, payloads[p["txid"]])] = op_return_outputs(parse_tx(raw_tx(p["txid"])))
                    verified += payloads[p["txid"]][5:37] == root_from_path(
                        h, p["leaf_index"], p["size"], p["path"])
                txids |= set(payloads)
        cpu_anchoring = cpu_seconds(worker.pid) - cpu_ready
        confirm_s = None
        if confirm is not None:
            mined = time.monotonic()
            confirm()
            unconfirmed = set(txids)
            while unconfirmed:
                msg = events.receive(120)
                if msg is None:
                    raise TimeoutError(f"{len(unconfirmed)} anchors unconfirmed 120 s after "
                                       "the blocks")
                if msg.topic == "anchor.confirmed":
                    unconfirmed.discard(msgpack.unpackb(msg.payload, raw=False)["txid"])
            confirm_s = time.monotonic() - mined
        rss = peak_rss_mb(worker.pid)
        cpu_total = cpu_seconds(worker.pid)
    finally:
        worker.terminate()
        worker.wait(30)
        events.close()
    return {"seconds": sum(walls), "walls": walls, "transactions": len(txids),
            "verified": verified, "documents": documents * rounds, "rss": rss,
            "cpu_anchoring_s": cpu_anchoring, "cpu_total_s": cpu_total, "confirm_s": confirm_s}


def run_size(size: int, args: argparse.Namespace, workdir: Path) -> dict:
    from anchor.bitcoind import BitcoinRpc
    from tests.bitcoind_double import BitcoindDouble
    node = BitcoindDouble()
    try:
        node.fund([1_000_000] * 3)
        rpc = BitcoinRpc(node.url, node.user, node.password)
        real = rpc.call("listunspent")
        workdir = workdir / f"size-{size}"
        workdir.mkdir()
        db = str(workdir / "bus.db")  # where Bus() puts it
        fill_s = fill_table(db, size, real, (node.height, node.getbestblockhash()))
        settings = {"BUS_BITCOIND_RPC_URL": node.url, "BUS_BITCOIND_RPC_USER": node.user,
                    "BUS_BITCOIND_RPC_PASSWORD": node.password,
                    "BUS_BITCOIND_ZMQ_HASHBLOCK": node.zmq_endpoint,
                    "BUS_ANCHOR_FEE_RATE_SAT_VB": "2", "BUS_ANCHOR_INTERVAL_S": "5",
                    "BUS_ANCHOR_MAX_DOCUMENTS": str(args.documents)}
        bus = Bus(workdir, **settings)
        # Reservations are not released until each run ends: at most 80% of the table.
        per_run = min(args.reservations, int(size * 0.8))
        one = reservations(bus.env, per_run, 1)
        four = reservations(bus.env, per_run // 4, 4)
        writer_rss_reserving = peak_rss_mb(bus.writer.pid)
        anchored = anchor_documents(bus, node, args.documents)
        writer_rss, _, _ = bus.stop()
        return {"size": size, "fill_s": fill_s, "one": one, "four": four,
                "writer_rss_reserving": writer_rss_reserving, "writer_rss": writer_rss,
                "anchor": anchored, "db_mb": os.path.getsize(db) / 1e6}
    finally:
        node.close()


def run_core(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Anchoring through a real regtest Bitcoin Core (tests/regtest.py): its
    wallet funded with 50 outputs, a fresh bus, the worker syncing its wallet
    from the node; --single anchors of one document, one after the other,
    then one of --documents, each anchored as soon as its documents are in
    (BUS_ANCHOR_MAX_DOCUMENTS), then confirmed (3 blocks mined)."""
    from tests.regtest import RegtestNode, missing
    if missing():
        sys.exit(f"--node core: {missing()}")
    node = RegtestNode(workdir / "bitcoind", free_port)
    try:
        node.fund([1_000_000] * 50)
        (workdir / "bus").mkdir()
        bus = Bus(workdir / "bus", BUS_BITCOIND_RPC_URL=node.url,
                  BUS_BITCOIND_RPC_USER=node.user, BUS_BITCOIND_RPC_PASSWORD=node.password,
                  BUS_BITCOIND_ZMQ_HASHBLOCK=node.zmq_endpoint,
                  BUS_ANCHOR_FEE_RATE_SAT_VB="2", BUS_ANCHOR_INTERVAL_S="60",
                  BUS_ANCHOR_CONTROL_ENDPOINT=f"tcp://127.0.0.1:{free_port()}")
        try:
            results = []
            for n, (documents, rounds) in enumerate(((1, args.single), (args.documents, 1))):
                node_cpu = cpu_seconds(node.process.pid)
                anchored = anchor_documents(bus, node, documents, rounds, label=f"core {n} ",
                                            confirm=lambda: node.mine(3))
                anchored["node_cpu_s"] = cpu_seconds(node.process.pid) - node_cpu
                results.append(anchored)
        finally:
            bus.stop()
        return results
    finally:
        node.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_reserve":
        return child_reserve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,1000000")
    ap.add_argument("--reservations", type=int, default=5000)
    ap.add_argument("--documents", type=int, default=10_000)
    ap.add_argument("--node", choices=("double", "core"), default="double",
                    help="core: anchoring alone, through a real regtest Bitcoin Core")
    ap.add_argument("--single", type=int, default=20,
                    help="with --node core: anchors of one document, one after the other")
    args = ap.parse_args()
    if args.node == "core":
        with tempfile.TemporaryDirectory() as tmp:
            results = run_core(args, Path(tmp))
        print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}; a real regtest Bitcoin Core")
        print("| anchors x documents | published -> proofs received, per anchor (p50 / max) "
              "| worker CPU per anchor | worker CPU from its start (wallet sync included) "
              "| bitcoind CPU | 3 blocks mined -> every anchor.confirmed | worker peak RSS "
              "| proofs verified |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for a in results:
            walls = sorted(a["walls"])
            print(f"| {len(walls)} x {a['documents'] // len(walls):,} "
                  f"| {walls[len(walls) // 2] * 1000:,.0f} / {walls[-1] * 1000:,.0f} ms "
                  f"| {a['cpu_anchoring_s'] / len(walls) * 1000:,.0f} ms "
                  f"| {a['cpu_total_s']:.2f} s | {a['node_cpu_s']:.2f} s "
                  f"| {a['confirm_s'] * 1000:,.0f} ms | {a['rss']:.1f} MB "
                  f"| {a['verified']:,} of {a['documents']:,} |")
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(run_size(size, args, Path(tmp)))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; up to {args.reservations:,} reservations from 1 client,"
          " then the same number from 4 clients at once (each its own process)")
    print("| UTXOs in the table | reserve p50 / p99 (1 client) | reservations/s (1 client) "
          "| reservations/s (4 clients) | writer peak RSS | anchor worker peak RSS "
          "| anchoring |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        a = r["anchor"]
        print(f"| {r['size']:,} ({r['db_mb']:.0f} MB file) | {r['one']['p50_ms']:.2f} / "
              f"{r['one']['p99_ms']:.2f} ms | {r['one']['rate']:,.0f} | {r['four']['rate']:,.0f} "
              f"(p99 {r['four']['p99_ms']:.2f} ms) | {r['writer_rss']:.1f} MB "
              f"({r['writer_rss_reserving']:.1f} MB after the reservations) "
              f"| {a['rss']:.1f} MB | {a['documents']:,} documents in {a['transactions']} "
              f"transaction(s), {a['seconds']:.1f} s, {a['verified']:,} proofs verified |")


if __name__ == "__main__":
    main()
