"""Acknowledged publishing side by side (not a test), one of:

- this tree against another revision: what producer sessions and nacks cost
  (issue #10's target: at most 5% of acknowledged throughput). The other
  revision is checked out in a temporary git worktree;
- --curve: this tree with CURVE authentication (BUS_CURVE_DIR, fresh keys)
  against this tree without (target: at least 0.7x);
- --baseline REV --curve-both: this tree against another revision, both with
  CURVE (issue 21: what authenticating sessions whole costs with CURVE on);
- --watched: this tree with its operations paths on (each process's HTTP
  side, scraped every second, harsher than Prometheus' usual 15 s; sd_notify
  to a NOTIFY_SOCKET with a 2 s watchdog) against this tree without them
  (issue #12's target: under 2% of acknowledged throughput).

Rounds alternate the two sides, each a fresh bus (writer + proxy, from that
side's code) on free loopback ports and one Publisher process (that side's
client) publishing --messages 100-byte messages with up to 100,000
unacknowledged, timed until every one is acknowledged; each process's CPU time
(user + system, its libzmq I/O threads included) is divided by the messages.
The machine is shared and noisy: the ratio of each round, taken minutes apart
at most, is what to read.

    python bench/acked_compare.py [--baseline 4549d21 [--curve-both] | --curve | --watched]
                                  [--ipc-capture]
                                  [--messages 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in the tree under test (cwd), so that its own `bus` package is imported.
PUBLISHER = """
import json, os, time
from bus.client import Publisher
from bus.config import load_config
count = int(os.environ["BENCH_MESSAGES"])
payload = os.urandom(100)
pub = Publisher(load_config(), linger_ms=60000).connect()
started = time.perf_counter()
for _ in range(count):
    pub.publish("bench.acked", payload)
pub.flush(timeout=300)
print(json.dumps({"rate": count / (time.perf_counter() - started)}), flush=True)
pub.close()
"""

ROLES = ("writer", "proxy")
ENDPOINTS = ("BUS_PUB_ENDPOINT", "BUS_SUB_ENDPOINT", "BUS_CAPTURE_ENDPOINT",
             "BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT", "BUS_READ_ENDPOINT",
             "BUS_NOTIFY_ENDPOINT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ping(endpoint: str, deadline: float, env: dict[str, str]) -> None:
    from bus import security
    from bus.client import BusError, ControlClient
    from bus.config import load_config
    curve = security.client_keys(load_config(env=env))
    while True:
        with ControlClient(endpoint, timeout_ms=300, curve=curve) as client:
            try:
                client.request("ping")
                return
            except BusError:
                if time.monotonic() > deadline:
                    raise


def make_keys(directory: Path) -> dict[str, str]:
    """A BUS_CURVE_DIR with one publisher key; the settings of that publisher."""
    import zmq.auth
    (directory / "publishers").mkdir(parents=True)
    for name in ("server", "proxy"):
        zmq.auth.create_certificates(directory, name)
    public, secret = zmq.auth.create_certificates(directory, "bench")
    Path(public).rename(directory / "publishers" / "bench.key")
    return {"BUS_CURVE_DIR": str(directory), "BUS_CURVE_KEY": secret}


def cpu_seconds(proc: subprocess.Popen) -> float:
    """Reap a process that is exiting; its user + system CPU time."""
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


class Watcher:
    """What systemd and Prometheus do to a bus: read its sd_notify datagrams,
    scrape each /metrics every second."""

    def __init__(self, workdir: Path) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(workdir / "notify.sock"))
        self.notify.settimeout(0.2)
        self.http = [f"127.0.0.1:{free_port()}" for _ in ROLES]
        self.env = {"NOTIFY_SOCKET": str(workdir / "notify.sock"), "WATCHDOG_USEC": "2000000",
                    "BUS_WRITER_HTTP": self.http[0], "BUS_PROXY_HTTP": self.http[1]}
        self.scrapes = self.notifications = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._scrape, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.notify.recv(4096)
                self.notifications += 1
            except OSError:
                pass

    def _scrape(self) -> None:
        while not self._stop.wait(1.0):
            for address in self.http:
                try:
                    with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as page:
                        page.read()
                    self.scrapes += 1
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.notify.close()


def acked_rate(tree: Path, workdir: Path, messages: int, settings: dict[str, str] | None = None,
               ipc_capture: bool = False, watched: bool = False
               ) -> tuple[float, dict[str, float]]:
    """Acknowledged msg/s, and each process's CPU microseconds per message."""
    env = dict(os.environ, BUS_DB=str(workdir / "bus.db"), BUS_LOG_FORMAT="json",
               BUS_LOG_LEVEL="warning", BENCH_MESSAGES=str(messages),
               **{name: f"tcp://127.0.0.1:{free_port()}" for name in ENDPOINTS},
               **(settings or {}))
    if ipc_capture:
        env["BUS_CAPTURE_ENDPOINT"] = f"ipc://{workdir}/capture.sock"
    watcher = Watcher(workdir) if watched else None
    role_env = {**env, **(watcher.env if watcher else {})}
    procs = [subprocess.Popen([sys.executable, "-m", "cli.main", role], cwd=tree, env=role_env)
             for role in ROLES]
    try:
        deadline = time.monotonic() + 15
        for name in ("BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT"):
            wait_ping(env[name], deadline, env)
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER], cwd=tree, env=env,
                                     stdout=subprocess.PIPE, text=True)
        out = publisher.stdout.read()  # until it exits; reaped by cpu_seconds
        cpu = {"publisher": cpu_seconds(publisher)}
        if publisher.returncode != 0:
            raise RuntimeError(f"the publisher exited {publisher.returncode}")
        rate = json.loads(out.splitlines()[-1])["rate"]
    finally:
        for proc in reversed(procs):  # the proxy first, as systemd stops them
            proc.terminate()
    for role, proc in zip(ROLES, procs):
        cpu[role] = cpu_seconds(proc)
    if watcher is not None:
        watcher.close()
        if not (watcher.scrapes and watcher.notifications):
            raise RuntimeError("the watched side was not watched (no scrape or notification)")
    return rate, {role: seconds / messages * 1e6 for role, seconds in cpu.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="4549d21",
                        help="git revision to compare with (default: main before issue #10)")
    parser.add_argument("--curve", action="store_true",
                        help="compare this tree with CURVE against this tree without")
    parser.add_argument("--curve-both", action="store_true",
                        help="with --baseline: both sides with CURVE")
    parser.add_argument("--watched", action="store_true",
                        help="compare this tree with its HTTP sides scraped and sd_notify on "
                             "against this tree without")
    parser.add_argument("--ipc-capture", action="store_true",
                        help="proxy -> writer over ipc (no CURVE on that hop: owner-only "
                             "socket file) instead of tcp, on both sides")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bus-compare-") as tmp:
        if args.curve:
            curve = make_keys(Path(tmp) / "curve")
            sides = {"plain": (ROOT, {}), "curve": (ROOT, curve)}
        elif args.watched:
            sides = {"unwatched": (ROOT, {}), "watched": (ROOT, {})}
        else:
            baseline = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach",
                            str(baseline), args.baseline], check=True, capture_output=True)
            keys = make_keys(Path(tmp) / "curve") if args.curve_both else {}
            sides = {f"baseline {args.baseline}": (baseline, keys), "current": (ROOT, keys)}
        try:
            rates: dict[str, list[float]] = {name: [] for name in sides}
            cpus: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
            for n in range(args.rounds):
                for name, (tree, settings) in sides.items():
                    workdir = Path(tmp) / f"{name.split()[0]}-{n}"
                    workdir.mkdir()
                    rate, cpu = acked_rate(tree, workdir, args.messages, settings,
                                           args.ipc_capture, watched=name == "watched")
                    rates[name].append(rate)
                    cpus[name].append(cpu)
        finally:
            if not (args.curve or args.watched):
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(baseline)], check=False)
    first, second = sides
    print(f"acknowledged publishing, {args.messages:,} messages of 100 bytes per run, "
          f"capture over {'ipc' if args.ipc_capture else 'tcp'}"
          f"{', CURVE on both sides' if args.curve_both else ''}, "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'round':>5}  {first:>18}  {second:>14}  ratio")
    for n, (old, new) in enumerate(zip(rates[first], rates[second]), 1):
        print(f"{n:>5}  {old:>12,.0f} msg/s  {new:>8,.0f} msg/s  {new / old:.3f}")
    ratios = [new / old for old, new in zip(rates[first], rates[second])]
    print(f"median ratio {second}/{first}: {statistics.median(ratios):.3f}")
    print("CPU per message, median of the rounds (user + system, all threads):")
    for name in sides:
        print(f"  {name:>18}: " + ", ".join(
            f"{role} {statistics.median(c[role] for c in cpus[name]):.1f} us"
            for role in ("publisher",) + ROLES))


if __name__ == "__main__":
    main()
