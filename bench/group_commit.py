"""Group commit against the seed's size-or-time batches (issue 26), in one run
of alternating rounds; prints a table (not a test).

Each round starts, in turn (the order alternates from round to round):
  seed   a bus with BATCH_GROUP_COMMIT=false: commits by size (BATCH_SIZE),
         time (BATCH_FLUSH_INTERVAL_MS) and low load, as before issue 26;
  group  a bus with the defaults: group commit on;
  proto  the bare prototype (bench/prototype.py), raw frames only.
and measures on each bus, with `bus-cli bench --json` (a Python Publisher,
one subscriber):
  - acknowledgement latency (publish() to the acknowledgement seen) and live
    end-to-end latency at --low-rate and --high-rate msg/s;
  - acknowledged msg/s of one Publisher sending as fast as it can
    (bus_bench.acked_rate: up to 100,000 unacknowledged);
  - persisted msg/s of raw frames (no meta, as the prototype stores), and the
    CPU each stored message cost the writer and the proxy (user + system,
    libzmq's threads included), against the prototype's whole process (its
    proxy thread and its store loop) on the same messages.
Medians of the rounds are shown, with each round's figure.

    python bench/group_commit.py [--rounds 3] [--messages 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bus_bench  # noqa: E402 (the bus's processes, the prototype's runs, the children)

BUS_CLI = str(Path(sys.executable).with_name("bus-cli"))
MODES = {"seed": {"BATCH_GROUP_COMMIT": "false"}, "group": {}}


def latencies(env: dict[str, str], rate: int, seconds: float) -> dict[str, float]:
    """`bus-cli bench --acked --sub 1` at `rate`: the acknowledgement's and the
    live delivery's percentiles (ms)."""
    run = subprocess.run([BUS_CLI, "bench", "--json", "--acked", "--sub", "1", "--rate",
                          str(rate), "-n", str(int(rate * seconds)), "--size",
                          str(bus_bench.PAYLOAD_BYTES)], env=env, capture_output=True,
                         text=True, timeout=120 + seconds * 4, check=True)
    out = json.loads(run.stdout)
    acked, live = out["acknowledged"]["latency_ms"], out["subscribe"]["latency_ms"]
    return {"ack_p50": acked["p50"], "ack_p99": acked["p99"], "ack_p999": acked["p99.9"],
            "live_p50": live["p50"], "live_p99": live["p99"],
            "acked_rate": out["acknowledged"]["msg_per_s"]}


def raw_run(env: dict[str, str], db: str, count: int, pids: dict[str, int],
            mode: str) -> dict[str, float]:
    """Persisted msg/s of `count` messages and the CPU each cost each of `pids`."""
    before = {name: bus_bench.cpu_seconds(pid) for name, pid in pids.items()}
    rate = bus_bench.persisted_rate(env, db, count, mode)
    return {"rate": rate, **{f"{name}_us": (bus_bench.cpu_seconds(pid) - before[name])
                             / count * 1e6 for name, pid in pids.items()}}


def bus_round(workdir: Path, settings: dict[str, str], args: argparse.Namespace
              ) -> dict[str, float]:
    bus = bus_bench.Bus(workdir, **settings)
    try:
        figures: dict[str, float] = {}
        for label, rate in (("low", args.low_rate), ("high", args.high_rate)):
            figures.update({f"{label}_{key}": value for key, value in
                            latencies(bus.env, rate, args.latency_seconds).items()})
        figures["acked_rate"] = bus_bench.acked_rate(bus.env, args.messages)
        raw = raw_run(bus.env, bus.db, args.messages,
                      {"writer": bus.writer.pid, "proxy": bus.proxy.pid}, "raw")
        figures.update({f"raw_{key}": value for key, value in raw.items()})
        stats = bus.writer_stats()["batch"]
        figures["drained_share"] = stats["flush_by_drained"] / max(1, stats["total_flushes"])
        figures["avg_batch"] = stats["avg_batch_size"]
        return figures
    finally:
        bus.stop()


def proto_round(workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    eps = bus_bench.endpoints()
    db = str(workdir / "proto.db")
    proto = subprocess.Popen([sys.executable, str(bus_bench.ROOT / "bench" / "prototype.py"),
                              eps["BUS_PUB_ENDPOINT"], eps["BUS_SUB_ENDPOINT"], db])
    try:
        raw = raw_run(eps, db, args.messages, {"proto": proto.pid}, "raw")
        return {"raw_rate": raw["rate"], "raw_proto_us": raw["proto_us"]}
    finally:
        proto.kill()
        proto.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=300_000,
                    help="per throughput run (acknowledged, raw)")
    ap.add_argument("--low-rate", type=int, default=10_000)
    ap.add_argument("--high-rate", type=int, default=50_000)
    ap.add_argument("--latency-seconds", type=float, default=4.0)
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {"seed": [], "group": [], "proto": []}
    print(f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; {args.rounds} alternating rounds, "
          f"{bus_bench.PAYLOAD_BYTES}-byte payloads", flush=True)
    for index in range(args.rounds):
        order = list(results)[index % 3:] + list(results)[:index % 3]
        for name in order:
            with tempfile.TemporaryDirectory(prefix=f"group-commit-{name}-") as tmp:
                figures = proto_round(Path(tmp), args) if name == "proto" else \
                    bus_round(Path(tmp), MODES[name], args)
            results[name].append(figures)
            print(f"  round {index + 1} {name}: " + ", ".join(
                f"{key} {value:,.3g}" for key, value in figures.items()), file=sys.stderr,
                flush=True)

    def cell(name: str, key: str, digits: int = 2) -> str:
        values = [figures[key] for figures in results[name]]
        each = " / ".join(f"{v:,.{digits}f}" for v in values)
        return f"{statistics.median(values):,.{digits}f} ({each})"

    proto_rates = [figures["raw_rate"] for figures in results["proto"]]
    rows = []
    for label, rate in (("low", args.low_rate), ("high", args.high_rate)):
        for key, what in (("ack_p50", "acknowledgement p50 ms"),
                          ("ack_p99", "acknowledgement p99 ms"),
                          ("ack_p999", "acknowledgement p99.9 ms"),
                          ("live_p99", "live end-to-end p99 ms"),
                          ("acked_rate", "acknowledged msg/s")):
            rows.append((f"{what} at {rate:,} msg/s", cell("seed", f"{label}_{key}"),
                         cell("group", f"{label}_{key}")))
    rows += [
        ("acknowledged msg/s, as fast as it goes", cell("seed", "acked_rate", 0),
         cell("group", "acked_rate", 0)),
        ("persisted msg/s, raw frames", cell("seed", "raw_rate", 0),
         cell("group", "raw_rate", 0)),
        ("... of the prototype's, each round", *(
            " / ".join(f"{figures['raw_rate'] / proto:.2f}" for figures, proto in
                       zip(results[name], proto_rates)) for name in ("seed", "group"))),
        ("writer CPU us per stored message", cell("seed", "raw_writer_us"),
         cell("group", "raw_writer_us")),
        ("proxy CPU us per stored message", cell("seed", "raw_proxy_us"),
         cell("group", "raw_proxy_us")),
        ("commits of a drained capture, share", cell("seed", "drained_share"),
         cell("group", "drained_share")),
        ("rows per commit, average", cell("seed", "avg_batch", 1),
         cell("group", "avg_batch", 1)),
    ]
    print(f"\nprototype, raw frames: {cell('proto', 'raw_rate', 0)} msg/s, "
          f"{cell('proto', 'raw_proto_us')} CPU us per stored message (proxy and store)")
    bus_bench.print_table(("medians (each round)", "seed: by size or time", "group commit"),
                          rows, align="---:")


if __name__ == "__main__":
    main()
