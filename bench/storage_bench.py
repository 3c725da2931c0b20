"""SQLite against PostgreSQL, side by side in one run; prints a table (not a test).

Both engines run the same real processes (writer, proxy, reader on free
loopback ports); PostgreSQL is a private server this script starts from the
installed binaries (tests/pgserver.py), on the same machine, with its default
durability (fsync and synchronous_commit on, as SQLite's NORMAL is durable at
each checkpoint and PostgreSQL at each commit). For --rounds rounds, the two
engines alternate (which one goes first alternates too), each on a new
database:
  1. persisted msg/s: one publisher as fast as it can, until the last row is
     visible to a separate connection;
  2. acknowledged msg/s: a Publisher that waits for the writer's
     acknowledgements (windowed: up to 100,000 unacknowledged);
  3. replay msg/s: a Subscriber reading the stored messages from the reader
     (after_id=0).
Then, once per engine, reservations at --utxos UTXOs: the table is filled
(amounts 600-1,799 sat, confirmed), the writer started on it, and one client
makes --reservations reservations over REQ/REP one after the other (latency
p50/p99 of each: one indexed pick and one transaction).

    python bench/storage_bench.py [--messages 200000] [--rounds 3] [--utxos 1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from anchor_bench import reservations  # noqa: E402
from bus_bench import Bus, acked_rate, free_port, persisted_rate, replay  # noqa: E402

ENGINES = ("sqlite", "postgresql")


def new_database(engine: str, workdir: Path, server: object, n: int) -> str:
    if engine == "sqlite":
        return str(workdir / f"bench-{n}.db")
    return server.create_database()


def fill_utxos(db: str, size: int) -> float:
    """`size` confirmed UTXO rows and a wallet tip, through storage's own writer
    handle (either engine); returns the seconds it took."""
    import storage
    from storage.utxos import UPSERT_SQL, write_tip
    started = time.monotonic()
    store = storage.open_store(db)
    now = time.time_ns()
    try:
        for start in range(0, size, 50_000):
            rows = [(hashlib.sha256(b"utxo %d" % i).hexdigest(), i % 4, 600 + (i * 7919) % 1200,
                     "bcrt1qbench", "0014" + "00" * 20, max(1, 1000 - i % 100), 1_700_000_000,
                     0, now) for i in range(start, min(size, start + 50_000))]
            with store.transaction() as conn:
                conn.executemany(UPSERT_SQL, rows)
        with store.transaction() as conn:
            write_tip(conn, 1000, "00" * 32)
            if getattr(conn, "dialect", "") == "postgresql":
                conn.execute("ANALYZE utxos")  # as autovacuum would, soon after a bulk load
    finally:
        store.close()
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--utxos", type=int, default=1_000_000)
    ap.add_argument("--reservations", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="BATCH_SIZE for both engines (default: the bus's, 100)")
    args = ap.parse_args()
    from tests.pgserver import PACKAGE_HINT, PgServer, find_bindir
    bindir = find_bindir()
    if bindir is None:
        sys.exit(PACKAGE_HINT)
    server = PgServer(bindir, free_port(), durable=True).start()
    settings = {"BATCH_SIZE": str(args.batch_size)} if args.batch_size else {}
    figures: dict[str, dict[str, list[float]]] = {e: {"persisted": [], "acked": [], "replay": []}
                                                  for e in ENGINES}
    try:
        with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
            workdir = Path(tmp)
            n = 0
            for round_no in range(args.rounds):
                order = ENGINES if round_no % 2 == 0 else ENGINES[::-1]
                for engine in order:
                    n += 1
                    db = new_database(engine, workdir, server, n)
                    bus = Bus(workdir, BUS_DB=db, **settings)
                    try:
                        figures[engine]["persisted"].append(
                            persisted_rate(bus.env, db, args.messages, "bus"))
                        figures[engine]["acked"].append(acked_rate(bus.env, args.messages))
                        figures[engine]["replay"].append(replay(bus.env, args.messages, False))
                    finally:
                        bus.stop()
                    print(f"round {round_no + 1} {engine}: " + ", ".join(
                        f"{k} {v[-1]:,.0f} msg/s" for k, v in figures[engine].items()),
                        file=sys.stderr, flush=True)
            reserve: dict[str, dict[str, float]] = {}
            for engine in ENGINES:
                n += 1
                db = new_database(engine, workdir, server, n)
                fill_s = fill_utxos(db, args.utxos)
                bus = Bus(workdir, BUS_DB=db)
                try:
                    reserve[engine] = reservations(bus.env, args.reservations, 1)
                    reserve[engine]["fill_s"] = fill_s
                finally:
                    bus.stop()
    finally:
        server.stop()

    def median(engine: str, key: str) -> float:
        return statistics.median(figures[engine][key])

    print(f"\nSQLite vs PostgreSQL {server.version} on {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.rounds} rounds of {args.messages:,} messages of 100 bytes, "
          f"BATCH_SIZE={args.batch_size or 100}, medians\n")
    print("| | SQLite | PostgreSQL | PostgreSQL / SQLite |\n|---|---:|---:|---:|")
    for key, label in (("persisted", "persisted msg/s"), ("acked", "acknowledged msg/s"),
                       ("replay", "replay msg/s")):
        s, p = median("sqlite", key), median("postgresql", key)
        print(f"| {label} | {s:,.0f} | {p:,.0f} | {p / s:.2f} |")
    for key, label in (("p50_ms", "reservation p50 ms"), ("p99_ms", "reservation p99 ms")):
        s, p = reserve["sqlite"][key], reserve["postgresql"][key]
        print(f"| {label} at {args.utxos:,} UTXOs | {s:.2f} | {p:.2f} | {p / s:.2f} |")
    print(f"| filling {args.utxos:,} UTXOs, s | {reserve['sqlite']['fill_s']:.1f} | "
          f"{reserve['postgresql']['fill_s']:.1f} | |")
    ratios = [b / a for a, b in zip(figures["sqlite"]["persisted"],
                                    figures["postgresql"]["persisted"])]
    print("\npersisted, PostgreSQL / SQLite by round: "
          + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
