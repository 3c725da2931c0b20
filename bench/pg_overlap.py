"""PostgreSQL commits overlapped with the next batch (BUS_PG_OVERLAP_COMMITS)
against the writer that waits for each commit (the default), in one run of
alternating rounds; prints a table (not a test).

A private PostgreSQL server (tests/pgserver.py, fsync and synchronous commit
on) on this machine. With --delay-ms, the writer reaches it through a TCP
relay that holds each chunk of bytes that long in each direction, as a
server across a network would be (the round trip it makes is measured and
printed: asyncio waits in whole milliseconds, so it is more than twice the
delay). Each round, for each mode (the order alternating): a new database,
the real writer, proxy and reader, and
  - persisted msg/s of --messages, from a publisher as fast as it can go to
    the last row visible from another connection;
  - the writer's CPU per stored message (user + system, all its threads);
  - acknowledgement p50 / p99 at --rate msg/s (bus_bench.ack_latency).

    python bench/pg_overlap.py [--messages 200000] [--rounds 3] [--batch-size 1000]
                               [--delay-ms 0] [--rate 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bus_bench  # noqa: E402 (the bus's processes, the children, the table)

sys.path.insert(0, str(bus_bench.ROOT))
MODES = {"waits": "false", "overlapped": "true"}


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   delay: float) -> None:
    """Bytes from `reader` to `writer`, each chunk `delay` seconds late, in order."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while chunk := await reader.read(1 << 16):
            await queue.put((time.monotonic() + delay, chunk))
        await queue.put((0.0, b""))

    async def send() -> None:
        while (item := await queue.get())[1]:
            await asyncio.sleep(max(0.0, item[0] - time.monotonic()))
            writer.write(item[1])
            await writer.drain()
        writer.close()
    await asyncio.gather(receive(), send())


def relay_main(listen_port: int, target_port: int, delay: float) -> None:
    """The relay (a child process): 127.0.0.1:listen_port to target_port."""
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(_forward(reader, up_writer, delay),
                             _forward(up_reader, writer, delay), return_exceptions=True)

    async def serve() -> None:
        server = await asyncio.start_server(connection, "127.0.0.1", listen_port)
        print("ready", flush=True)
        await server.serve_forever()
    asyncio.run(serve())


def round_trip_ms(url: str) -> float:
    """The median of 20 `SELECT 1` round trips to `url`."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        times = []
        for _ in range(20):
            started = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def run_mode(workdir: Path, url: str, settings: dict[str, str], args: argparse.Namespace
             ) -> dict[str, float]:
    bus = bus_bench.Bus(workdir, BUS_DB=url, **settings)
    try:
        cpu_before = bus_bench.cpu_seconds(bus.writer.pid)
        rate = bus_bench.persisted_rate(bus.env, url, args.messages, "bus")
        cpu_us = (bus_bench.cpu_seconds(bus.writer.pid) - cpu_before) / args.messages * 1e6
        latency = bus_bench.ack_latency(bus.env, args.rate, args.seconds)
    finally:
        bus.stop()
    return {"rate": rate, "cpu_us": cpu_us, "p50": latency["p50_ms"], "p99": latency["p99_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--delay-ms", type=float, default=0.0,
                    help="the relay's delay in each direction (0: no relay)")
    ap.add_argument("--rate", type=int, default=10_000, help="for the acknowledgement latency")
    ap.add_argument("--seconds", type=float, default=3.0, help="of the latency run")
    args = ap.parse_args()
    from tests.pgserver import PACKAGE_HINT, PgServer, find_bindir
    bindir = find_bindir()
    if bindir is None:
        sys.exit(PACKAGE_HINT)
    server = PgServer(bindir, bus_bench.free_port(), durable=True).start()
    relay = None
    figures: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        if args.delay_ms:
            relay_port = bus_bench.free_port()
            relay = subprocess.Popen([sys.executable, __file__, "_relay", str(relay_port),
                                      str(server.port), str(args.delay_ms / 1000)],
                                     stdout=subprocess.PIPE, text=True)
            assert relay.stdout.readline().strip() == "ready"
        with tempfile.TemporaryDirectory(prefix="pg-overlap-") as tmp:
            workdir = Path(tmp)
            rtt_ms = None
            for round_no in range(args.rounds):
                modes = list(MODES) if round_no % 2 == 0 else list(MODES)[::-1]
                for mode in modes:
                    url = server.create_database()
                    if relay is not None:
                        url = url.replace(f":{server.port}/", f":{relay_port}/")
                    if rtt_ms is None:
                        rtt_ms = round_trip_ms(url)
                    settings = {"BATCH_SIZE": str(args.batch_size),
                                "BUS_PG_OVERLAP_COMMITS": MODES[mode]}
                    figures[mode].append(run_mode(workdir, url, settings, args))
                    print(f"round {round_no + 1} {mode}: " + ", ".join(
                        f"{k} {v:,.2f}" for k, v in figures[mode][-1].items()),
                        file=sys.stderr, flush=True)
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()
        server.stop()

    def cell(mode: str, key: str, form: str) -> str:
        values = [f[key] for f in figures[mode]]
        return format(statistics.median(values), form) + " (" + " / ".join(
            format(v, form) for v in values) + ")"

    print(f"\nPostgreSQL {server.version} on {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; BATCH_SIZE={args.batch_size}; "
          + (f"through a relay of {args.delay_ms:g} ms each way (SELECT 1: {rtt_ms:.2f} ms)"
             if args.delay_ms else f"on loopback (SELECT 1: {rtt_ms:.2f} ms)")
          + f"; {args.rounds} rounds of {args.messages:,} messages, medians (each round)\n")
    bus_bench.print_table(
        ("", "the writer waits for each commit", "BUS_PG_OVERLAP_COMMITS=true"),
        [("persisted msg/s", cell("waits", "rate", ",.0f"), cell("overlapped", "rate", ",.0f")),
         ("writer CPU per stored message, us", cell("waits", "cpu_us", ".2f"),
          cell("overlapped", "cpu_us", ".2f")),
         (f"acknowledgement p50 at {args.rate:,} msg/s, ms", cell("waits", "p50", ".2f"),
          cell("overlapped", "p50", ".2f")),
         (f"acknowledgement p99 at {args.rate:,} msg/s, ms", cell("waits", "p99", ".2f"),
          cell("overlapped", "p99", ".2f"))], "---:")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_relay"]:
        relay_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
