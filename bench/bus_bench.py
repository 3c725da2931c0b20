"""End-to-end benchmark of the bus; prints a table (not a test).

Starts the real processes on free loopback ports and measures, in one run:
  1. persisted msg/s of the bare prototype (bench/prototype.py), the baseline,
     and of the bus with defaults and with BATCH_SIZE=1000, alternating for
     --rounds rounds (medians shown, and each round's ratio to the prototype);
  2. persisted msg/s of the bus with BATCH_WRITE_ENABLED=false;
  3. live delivery latency p50/p99 through the proxy at a fixed rate;
  4. acknowledged publishing: msg/s of a Publisher that waits until the writer
     has acknowledged everything (windowed: up to 100,000 unacknowledged), in
     the same run as 1.; and acknowledgement latency p50/p99 (publish -> ack
     seen) at a fixed rate;
  5. catch-up replay: msg/s of a Subscriber reading --replay-messages stored
     messages from the reader (after_id=0), and of a durable one;
  6. persisted msg/s of a bus with BUS_RETENTION_MAX_MESSAGES set, past its
     limit, and its longest retention chunk;
  7. peak RSS (VmHWM) of writer, proxy and reader.
"Persisted" = from the publisher's first send until the last row is visible to
a separate SQLite reader. Payloads are 100 bytes. One publisher process sends as
fast as it can, so it outruns the writer and backpressure holds it; publisher,
proxy and writer share the machine's cores.

    python bench/bus_bench.py [--messages 300000] [--rounds 3] [--synchronous FULL]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAYLOAD_BYTES = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoints() -> dict[str, str]:
    names = ("BUS_PUB_ENDPOINT", "BUS_SUB_ENDPOINT", "BUS_CAPTURE_ENDPOINT",
             "BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT", "BUS_READ_ENDPOINT",
             "BUS_NOTIFY_ENDPOINT")
    return {n: f"tcp://127.0.0.1:{free_port()}" for n in names}


def cpu_seconds(pid: int) -> float:
    """A running process's user + system CPU time so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def last_id(db: str) -> int:
    """The newest stored id through a connection of its own (0 if none yet):
    a SQLite file read-only, or a PostgreSQL URL."""
    if db.startswith("postgresql://"):
        import psycopg
        try:
            with psycopg.connect(db, autocommit=True) as conn:
                return conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
        except psycopg.errors.UndefinedTable:
            return 0
    if not Path(db).exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def wait_rows(db: str, count: int, timeout: float) -> float:
    """Poll until `count` rows are stored; returns the time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if last_id(db) >= count:
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"{db}: fewer than {count} rows after {timeout}s")


def stored_rows(db: str) -> int:
    return last_id(db)


def wait_answering(endpoint: str, timeout: float = 15) -> None:
    """Until a process answers ping at `endpoint` (BusError after `timeout` s)."""
    from bus.client import BusError, ControlClient
    deadline = time.monotonic() + timeout
    while True:
        with ControlClient(endpoint, timeout_ms=300) as client:
            try:
                client.request("ping")
                return
            except BusError:
                if time.monotonic() > deadline:
                    raise


def run_child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A child of this script with the settings of the bus in `env` (a
    Publisher also needs the writer's control and notify endpoints)."""
    return subprocess.Popen([sys.executable, str(Path(__file__)), *args],
                            env=dict(os.environ, **env),
                            stdout=subprocess.PIPE, text=True)


class Bus:
    def __init__(self, workdir: Path, **settings: str) -> None:
        self.env = dict(os.environ, **endpoints(), BUS_DB=str(workdir / "bus.db"),
                        BUS_LOG_FORMAT="json", BUS_LOG_LEVEL="warning")
        self.env.update(settings)
        self.db = self.env["BUS_DB"]
        cmd = [sys.executable, "-m", "cli.main"]
        self.writer = subprocess.Popen(cmd + ["writer"], env=self.env, cwd=ROOT)
        self.proxy = subprocess.Popen(cmd + ["proxy"], env=self.env, cwd=ROOT)
        self.reader = subprocess.Popen(cmd + ["reader"], env=self.env, cwd=ROOT)
        for endpoint in (self.env["BUS_CONTROL_ENDPOINT"], self.env["BUS_PROXY_CONTROL_ENDPOINT"],
                         self.env["BUS_READ_ENDPOINT"]):
            wait_answering(endpoint)

    def writer_stats(self) -> dict:
        from bus.client import ControlClient
        with ControlClient(self.env["BUS_CONTROL_ENDPOINT"]) as client:
            return client.request("stats")

    def stop(self) -> tuple[float, float, float]:
        """Stops proxy, writer, reader; returns their peak RSS in MB (writer, proxy, reader)."""
        rss = peak_rss_mb(self.writer.pid), peak_rss_mb(self.proxy.pid), \
            peak_rss_mb(self.reader.pid)
        for proc in (self.proxy, self.writer, self.reader):
            proc.terminate()
            if proc.wait(30) != 0:
                raise RuntimeError(f"process exited with {proc.returncode}")
        return rss


def persisted_rate(endpoints: dict[str, str], db: str, count: int, mode: str) -> float:
    before = stored_rows(db)  # before the child starts: it may store rows at once
    pub = run_child(["_publish", mode, endpoints["BUS_PUB_ENDPOINT"],
                     endpoints["BUS_SUB_ENDPOINT"], str(count)], endpoints)
    started = float(pub.stdout.readline())   # after connect, before the first send
    done = wait_rows(db, before + count, timeout=max(60.0, count / 2000))
    pub.wait(30)
    return count / (done - started)


def latency(env: dict[str, str], rate: int, seconds: float) -> dict[str, float]:
    count = int(rate * seconds)
    sub = run_child(["_subscribe", env["BUS_SUB_ENDPOINT"], str(count)], env)
    assert sub.stdout.readline().strip() == "ready"
    pub = run_child(["_publish", "bus", env["BUS_PUB_ENDPOINT"], env["BUS_SUB_ENDPOINT"],
                     str(count), str(rate)], env)
    out = json.loads(sub.stdout.readline())
    pub.wait(30)
    sub.wait(30)
    return out


def acked_rate(env: dict[str, str], count: int) -> float:
    pub = run_child(["_publish_acked", env["BUS_PUB_ENDPOINT"], env["BUS_SUB_ENDPOINT"],
                     str(count)], env)
    out = json.loads(pub.stdout.readline())
    pub.wait(30)
    return out["rate"]


def ack_latency(env: dict[str, str], rate: int, seconds: float) -> dict[str, float]:
    pub = run_child(["_publish_acked", env["BUS_PUB_ENDPOINT"], env["BUS_SUB_ENDPOINT"],
                     str(int(rate * seconds)), str(rate)], env)
    out = json.loads(pub.stdout.readline())
    pub.wait(30)
    return out


def replay(env: dict[str, str], count: int, durable: bool) -> float:
    sub = run_child(["_replay", env["BUS_SUB_ENDPOINT"], env["BUS_READ_ENDPOINT"],
                     env["BUS_CONTROL_ENDPOINT"], str(count), "durable" if durable else "since"],
                    env)
    out = json.loads(sub.stdout.readline())
    sub.wait(30)
    if out["received"] < count:
        raise RuntimeError(f"replay received {out['received']} of {count}")
    return out["rate"]


# --- child processes ----------------------------------------------------------

def child_publish_acked(endpoint: str, sub_endpoint: str, count: int, rate: float = 0.0) -> None:
    """Publish `count` messages and wait until all are acknowledged. With a rate,
    also time each message from publish() until its acknowledgement is seen
    (acknowledgements are read after every publish)."""
    from bus.client import Publisher
    from bus.config import load_config
    payload = os.urandom(PAYLOAD_BYTES)
    pub = Publisher(load_config({"pub_endpoint": endpoint, "sub_endpoint": sub_endpoint}),
                    linger_ms=60000).connect()
    sent = [0.0] * (count + 1)
    lat: list[float] = []
    seen = 0

    def note_acks(acked: int) -> None:
        nonlocal seen
        if acked > seen:
            now = time.perf_counter()
            lat.extend(now - sent[s] for s in range(seen + 1, acked + 1))
            seen = acked
    started = time.perf_counter()
    for i in range(count):
        if rate:
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        sent[pub.publish("bench.acked", payload)] = time.perf_counter()
        if rate:
            note_acks(pub.read_acks())
    deadline = time.monotonic() + 120  # a writer that never answers ends the child
    while seen < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {count - seen} of {count} messages not acknowledged "
                             "within 120 s")
        note_acks(pub.read_acks(0.001) if rate else count)
        if not rate:
            pub.flush(timeout=120)
    elapsed = time.perf_counter() - started
    out = {"rate": count / elapsed}
    if rate:
        lat.sort()
        out.update(p50_ms=lat[len(lat) // 2] * 1e3, p99_ms=lat[int(0.99 * len(lat))] * 1e3,
                   max_ms=lat[-1] * 1e3)
    print(json.dumps(out), flush=True)
    pub.close()


def child_replay(sub_endpoint: str, read_endpoint: str, control_endpoint: str, count: int,
                 mode: str) -> None:
    from bus.client import Subscriber
    from bus.config import load_config
    cfg = load_config({"sub_endpoint": sub_endpoint, "read_endpoint": read_endpoint,
                       "control_endpoint": control_endpoint})
    started = time.perf_counter()
    sub = Subscriber(["bench."], cfg, after_id=0,
                     durable=f"bench-{os.getpid()}" if mode == "durable" else None)
    received = 0
    while received < count and sub.receive(timeout=5) is not None:
        received += 1
    elapsed = time.perf_counter() - started
    sub.close()
    print(json.dumps({"received": received, "rate": received / elapsed}), flush=True)


def child_publish(mode: str, endpoint: str, sub_endpoint: str, count: int,
                  rate: float = 0.0) -> None:
    import zmq
    payload = os.urandom(PAYLOAD_BYTES)
    if mode == "bus":
        from bus.client import Publisher
        from bus.config import load_config
        pub = Publisher(load_config({"pub_endpoint": endpoint, "sub_endpoint": sub_endpoint}),
                        linger_ms=60000)
        pub.connect()
        send = pub.publish
    else:  # bare [topic, payload] frames; XPUB+NODROP so the baseline loses nothing either
        ctx = zmq.Context()
        sock = ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.connect(endpoint)
        # The proxy's upstream subscription: everything (the prototype), or each
        # first byte a topic may have (the bus: protocol.PROXY_SUBSCRIPTIONS).
        assert sock.recv()[:1] == b"\x01"

        def send(topic: str, data: bytes) -> None:  # as the bus's Publisher sends
            sock.send(topic.encode(), zmq.SNDMORE)
            sock.send(data)
    print(time.monotonic(), flush=True)
    started = time.monotonic()
    for i in range(count):
        if rate:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        send("bench.trade", payload)
    if mode == "bus":
        pub.close()
    else:
        sock.close(linger=60000)
        ctx.term()


def child_subscribe(endpoint: str, count: int) -> None:
    from bus.client import Subscriber
    from bus.config import load_config
    sub = Subscriber(["bench."], load_config({"sub_endpoint": endpoint}))
    time.sleep(0.5)  # let the subscription reach the proxy before the publisher starts
    print("ready", flush=True)
    lat = []
    while len(lat) < count:
        msg = sub.receive(timeout=10)
        if msg is None:
            break
        lat.append(time.time_ns() - msg.time_ns)
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6  # noqa: E731
    print(json.dumps({"received": len(lat), "p50_ms": pick(0.50), "p99_ms": pick(0.99),
                      "max_ms": lat[-1] / 1e6}), flush=True)
    sub.close()


# --- main ----------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_publish":
        a = sys.argv[2:]
        return child_publish(a[0], a[1], a[2], int(a[3]), float(a[4]) if len(a) > 4 else 0.0)
    if len(sys.argv) > 1 and sys.argv[1] == "_subscribe":
        return child_subscribe(sys.argv[2], int(sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "_publish_acked":
        a = sys.argv[2:]
        return child_publish_acked(a[0], a[1], int(a[2]), float(a[3]) if len(a) > 3 else 0.0)
    if len(sys.argv) > 1 and sys.argv[1] == "_replay":
        a = sys.argv[2:]
        return child_replay(a[0], a[1], a[2], int(a[3]), a[4])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=300_000, help="per throughput run")
    ap.add_argument("--rounds", type=int, default=3,
                    help="prototype and bus runs alternate this many times; medians shown")
    ap.add_argument("--sequential-messages", type=int, default=50_000)
    ap.add_argument("--latency-rate", type=int, default=10_000)
    ap.add_argument("--latency-seconds", type=float, default=5.0)
    ap.add_argument("--latency-runs", type=int, default=3,
                    help="latency is measured this many times; the median run is shown")
    ap.add_argument("--ack-rate", type=int, default=10_000,
                    help="messages/s for the acknowledgement latency run")
    ap.add_argument("--replay-messages", type=int, default=1_000_000)
    ap.add_argument("--retention-messages", type=int, default=100_000,
                    help="BUS_RETENTION_MAX_MESSAGES of the retention run")
    ap.add_argument("--synchronous", default="NORMAL", help="BUS_SQLITE_SYNCHRONOUS for the bus runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        eps = endpoints()
        proto = subprocess.Popen([sys.executable, str(ROOT / "bench" / "prototype.py"),
                                  eps["BUS_PUB_ENDPOINT"], eps["BUS_SUB_ENDPOINT"],
                                  str(work / "proto.db")])
        buses = {}
        for name, settings in (("batch", {}), ("batch1000", {"BATCH_SIZE": "1000"}),
                               ("seq", {"BATCH_WRITE_ENABLED": "false"}),
                               ("retention", {"BUS_RETENTION_MAX_MESSAGES":
                                              str(args.retention_messages)})):
            (work / name).mkdir()
            buses[name] = Bus(work / name, BUS_SQLITE_SYNCHRONOUS=args.synchronous, **settings)
        # Rounds alternate prototype and bus runs so that both see the same
        # machine; idle processes only wake for their poll timeouts.
        rates: dict[str, list[float]] = {name: [] for name in
                                         ("proto", "batch", "batch1000", "acked", "retention")}
        for _ in range(args.rounds):
            rates["proto"].append(persisted_rate(eps, str(work / "proto.db"), args.messages,
                                                 "raw"))
            for name in ("batch", "batch1000"):
                rates[name].append(persisted_rate(buses[name].env, buses[name].db,
                                                  args.messages, "bus"))
            rates["acked"].append(acked_rate(buses["batch"].env, args.messages))
            # Past the limit from the first round on: every batch meets deletions.
            rates["retention"].append(persisted_rate(buses["retention"].env,
                                                     buses["retention"].db, args.messages, "bus"))
        proto.kill()
        proto.wait()
        seq_rate = persisted_rate(buses["seq"].env, buses["seq"].db,
                                  args.sequential_messages, "bus")
        runs = sorted((latency(buses["batch"].env, args.latency_rate, args.latency_seconds)
                       for _ in range(args.latency_runs)), key=lambda r: r["p99_ms"])
        lat = runs[len(runs) // 2]
        ack_runs = sorted((ack_latency(buses["batch"].env, args.ack_rate, args.latency_seconds)
                           for _ in range(args.latency_runs)), key=lambda r: r["p99_ms"])
        ack_lat = ack_runs[len(ack_runs) // 2]
        batch = buses["batch"]
        while stored_rows(batch.db) < args.replay_messages:  # top up, untimed
            persisted_rate(batch.env, batch.db,
                           min(args.messages, args.replay_messages - stored_rows(batch.db)), "bus")
        replays = {mode: [replay(batch.env, args.replay_messages, mode == "durable")
                          for _ in range(args.rounds)] for mode in ("since", "durable")}
        retention = buses["retention"].writer_stats()["retention"]
        longest_commit = {name: buses[name].writer_stats()["batch"]["max_flush_ms"]
                    for name in ("batch", "retention")}
        rss = {name: bus.stop() for name, bus in buses.items()}

    from bus.config import load_config
    flush_ms = load_config(env={}, config_path=os.devnull).batch_flush_interval_ms
    proto_rate, batch_rate, big_rate, acked = (statistics.median(rates[n]) for n in
                                               ("proto", "batch", "batch1000", "acked"))

    def versus_prototype(name: str) -> str:
        each = ", ".join(f"{b / p:.0%}" for b, p in zip(rates[name], rates["proto"]))
        median = statistics.median(rates[name]) / proto_rate
        return f"{median:.0%} of prototype (each round: {each})"

    rows = [
        ("prototype (zmq.proxy + executemany 1000, 2 columns)", f"{proto_rate:,.0f} msg/s", ""),
        ("bus, batch mode (defaults, BATCH_SIZE=100)", f"{batch_rate:,.0f} msg/s",
         versus_prototype("batch")),
        ("bus, BATCH_SIZE=1000", f"{big_rate:,.0f} msg/s",
         versus_prototype("batch1000")),
        ("bus, BATCH_WRITE_ENABLED=false", f"{seq_rate:,.0f} msg/s",
         f"batch mode = {batch_rate / seq_rate:.1f}x, BATCH_SIZE=1000 = "
         f"{big_rate / seq_rate:.1f}x"),
        (f"live latency at {args.latency_rate:,} msg/s",
         f"p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms",
         f"median of {len(runs)} runs of {lat['received']:,} messages; p99 of each: "
         + ", ".join(f"{r['p99_ms']:.2f}" for r in runs) + " ms"),
        ("acknowledged publishing (window 100,000; until every ack)", f"{acked:,.0f} msg/s",
         f"{acked / batch_rate:.0%} of the plain bus run (each round: "
         + ", ".join(f"{a / b:.0%}" for a, b in zip(rates["acked"], rates["batch"])) + ")"),
        (f"acknowledgement latency at {args.ack_rate:,} msg/s",
         f"p50 {ack_lat['p50_ms']:.1f} ms, p99 {ack_lat['p99_ms']:.1f} ms",
         f"median of {len(ack_runs)} runs; p99 of each: "
         + ", ".join(f"{r['p99_ms']:.1f}" for r in ack_runs)
         + f" ms; BATCH_FLUSH_INTERVAL_MS={flush_ms}"),
        (f"catch-up replay of {args.replay_messages:,} stored messages",
         f"{statistics.median(replays['since']):,.0f} msg/s",
         "Subscriber(after_id=0); each run: "
         + ", ".join(f"{r:,.0f}" for r in replays["since"])),
        ("the same, durable consumer", f"{statistics.median(replays['durable']):,.0f} msg/s",
         "Subscriber(durable=..., after_id=0), auto-ack; each run: "
         + ", ".join(f"{r:,.0f}" for r in replays["durable"])),
        (f"bus, retention at {args.retention_messages:,} messages (deleting as it stores)",
         f"{statistics.median(rates['retention']):,.0f} msg/s",
         f"{statistics.median(rates['retention']) / batch_rate:.0%} of the plain bus run; "
         f"{retention['deleted_total']:,} rows deleted in {retention['chunks']:,} chunks, "
         f"longest {retention['max_chunk_ms']:.1f} ms; longest batch commit "
         f"{longest_commit['retention']:.1f} ms (plain bus: {longest_commit['batch']:.1f} ms)"),
        ("peak RSS, batch runs incl. latency and replay (publisher outruns writer)",
         f"writer {rss['batch'][0]:.1f} MB",
         f"proxy {rss['batch'][1]:.1f} MB, reader {rss['batch'][2]:.1f} MB"),
        ("peak RSS, sequential run (writer far behind)",
         f"writer {rss['seq'][0]:.1f} MB", f"proxy {rss['seq'][1]:.1f} MB"),
    ]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {args.messages:,} x {PAYLOAD_BYTES}-byte messages, "
          f"synchronous={args.synchronous}")
    print_table(("measure", "result", "note"), rows)


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]],
                align: str = "---") -> None:
    """A Markdown table, as the README shows them (`align`: each cell's rule
    under the header, e.g. "---:" for figures)."""
    print("| " + " | ".join(header) + " |")
    print("|---|" + "|".join([align] * (len(header) - 1)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
