"""Operations (issue #12): what systemd, an operator and a monitoring system
see of each process: readiness, watchdog, status lines, journald priorities,
process titles."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from bus.client import Publisher
from tests.conftest import BUS_CLI, Bus, free_port, ping, query, wait_for
from tests.test_hostile import publish_acked

# A ping every second: the processes' loops turn at least that often, so
# WatchdogSec= must be 2 s or more (the units say 30 s).
WATCHDOG_USEC = "2000000"
ROLES = (("writer", "BUS_CONTROL_ENDPOINT"), ("proxy", "BUS_PROXY_CONTROL_ENDPOINT"),
         ("reader", "BUS_READ_ENDPOINT"))


class NotifySocket:
    """The datagram socket systemd binds for a service's sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[tuple[float, str]] = []

    def read(self, timeout: float) -> list[str]:
        """Every line received within `timeout` (each datagram split in lines)."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            now = time.monotonic()
            for line in data.decode().splitlines():
                self.received.append((now, line))
                lines.append(line)
        return lines

    def wait_for(self, line: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.read(0.2):
                return
        raise AssertionError(f"no {line} within {timeout} s; got {self.received[-10:]}")

    def close(self) -> None:
        self.sock.close()


def test_each_process_is_ready_only_when_it_serves_then_pings_the_watchdog_and_says_stopping(
        make_bus, tmp_path: Path) -> None:
    """READY=1 once the sockets are bound and the database open (a ping right
    after it is answered), WATCHDOG=1 at half of WATCHDOG_USEC from the loop,
    a STATUS= line a person can read, STOPPING=1 on SIGTERM, exit 0."""
    bus = make_bus()
    for role, endpoint in ROLES:
        notify = NotifySocket(tmp_path / f"{role}.notify")
        try:
            proc = bus.spawn([BUS_CLI, role], env={"NOTIFY_SOCKET": str(notify.path),
                                                   "WATCHDOG_USEC": WATCHDOG_USEC})
            notify.wait_for("READY=1")
            assert ping(bus[endpoint]), f"{role} said READY=1 before it served"
            statuses = [line for _, line in notify.received if line.startswith("STATUS=")]
            assert statuses and len(statuses[0]) > len("STATUS="), notify.received
            lines = notify.read(2.5)
            assert lines.count("WATCHDOG=1") >= 2, (role, lines)  # every second
            proc.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING=1")
            assert proc.wait() == 0
        finally:
            notify.close()


def test_a_stuck_writer_loop_stops_pinging_the_watchdog(make_bus, tmp_path: Path) -> None:
    """systemd restarts a process whose WATCHDOG=1 stops (WatchdogSec=): the
    pings come from the loop itself, so a commit stuck on another process's
    write lock (busy timeout 30 s here) stops them, and they resume after."""
    bus = make_bus(BUS_SQLITE_BUSY_TIMEOUT_MS=30_000)
    notify = NotifySocket(tmp_path / "writer.notify")
    try:
        bus.spawn([BUS_CLI, "writer"], env={"NOTIFY_SOCKET": str(notify.path),
                                            "WATCHDOG_USEC": WATCHDOG_USEC})
        notify.wait_for("READY=1")
        bus.start_proxy()
        notify.wait_for("WATCHDOG=1")
        with Publisher(bus.config(), producer_id="stuck") as pub:
            holder = sqlite3.connect(bus.db, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                pub.publish("stuck.t", b"x")
                notify.read(1.2)  # the writer reaches its commit within its flush interval
                assert "WATCHDOG=1" not in notify.read(3.0), "the stuck loop kept pinging"
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            notify.wait_for("WATCHDOG=1", timeout=10)
            pub.flush(timeout=10)
    finally:
        notify.close()


def test_an_unhealthy_writer_stops_pinging_the_watchdog_until_it_is_healthy(
        make_bus, tmp_path: Path) -> None:
    """A loop that turns but cannot serve (its commits fail: another process
    holds the database's write lock, busy timeout 50 ms) used to ping the
    watchdog all along while /healthz said 503, for ever. WATCHDOG=1 now goes
    out only while healthy, so systemd restarts a process whose failure lasts
    WatchdogSec=; the pings resume as soon as it is healthy again, and the
    journal says why they stopped."""
    bus = make_bus(BUS_SQLITE_BUSY_TIMEOUT_MS=50)
    notify = NotifySocket(tmp_path / "writer.notify")
    try:
        writer = bus.spawn([BUS_CLI, "writer"], env={"NOTIFY_SOCKET": str(notify.path),
                                                     "WATCHDOG_USEC": WATCHDOG_USEC})
        notify.wait_for("READY=1")
        bus.start_proxy()
        notify.wait_for("WATCHDOG=1")
        with Publisher(bus.config(), producer_id="unhealthy") as pub:
            holder = sqlite3.connect(bus.db, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            try:
                pub.publish("unhealthy.t", b"x")
                wait_for(lambda: bus.writer_stats()["backlog"]["failing_for_s"] is not None,
                         message="the writer's commits to fail")
                notify.read(1.2)  # a ping sent just before
                lines = notify.read(3.0)
                assert "WATCHDOG=1" not in lines, "an unhealthy writer kept pinging"
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            notify.wait_for("WATCHDOG=1", timeout=10)
            pub.flush(timeout=10)
        withheld = [e for e in writer.log_events() if e.get("event") == "watchdog_withheld"]
        assert "database not writable" in withheld[0]["reason"], withheld
    finally:
        notify.close()


def test_processes_carry_their_names_and_journald_priorities(bus: Bus) -> None:
    """`ps` shows bus-writer, bus-proxy, bus-reader, not python."""
    for proc, title in ((bus.writer, "bus-writer"), (bus.proxy, "bus-proxy"),
                        (bus.reader, "bus-reader")):
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert cmdline == title, cmdline
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == title


def scrape(address: str, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://{address}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(address: str) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    status, text = scrape(address, "/metrics")
    assert status == 200, text
    return {sample.name + (str(sorted(sample.labels.items())) if sample.labels else ""):
            sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture
def watched(make_bus) -> Bus:
    """A bus with the HTTP side of each process on."""
    return make_bus(BUS_WRITER_HTTP=f"127.0.0.1:{free_port()}",
                    BUS_PROXY_HTTP=f"127.0.0.1:{free_port()}",
                    BUS_READER_HTTP=f"127.0.0.1:{free_port()}").start()


def test_each_process_serves_prometheus_metrics_and_health(watched: Bus) -> None:
    bus = watched
    with Publisher(bus.config(), producer_id="scraped") as pub:
        for i in range(100):
            pub.publish("scraped.t", b"%d" % i)
        pub.flush(timeout=10)
    bus.request("BUS_READ_ENDPOINT", "history", {})
    time.sleep(1.2)  # each process publishes its snapshot once a second
    writer = metrics(bus["BUS_WRITER_HTTP"])
    assert writer["bus_writer_messages_received_total"] >= 100
    assert writer["bus_writer_rows_committed_total"] >= 100
    assert writer["bus_writer_batch_commit_seconds_count"] >= 1
    assert writer["bus_writer_batch_rows_sum"] >= 100
    assert writer["bus_writer_batch_wait_seconds_count"] >= 1
    assert writer["process_resident_memory_bytes"] > 10 << 20
    proxy = metrics(bus["BUS_PROXY_HTTP"])
    assert proxy["bus_proxy_frames_in_total"] >= 300  # three frames a message
    assert proxy["bus_proxy_paused"] == 0
    reader = metrics(bus["BUS_READER_HTTP"])
    assert reader["bus_reader_pages_served_total"] >= 1 and reader["bus_reader_database_readable"] == 1
    for name in ("BUS_WRITER_HTTP", "BUS_PROXY_HTTP", "BUS_READER_HTTP"):
        assert scrape(bus[name], "/healthz") == (200, '{"status": "ok"}')
        assert scrape(bus[name], "/nothing")[0] == 404
        assert scrape(bus[name], "/metrics", method="POST")[0] == 405


def test_the_writer_serves_the_origin_designs_batch_and_load_pages(watched: Bus) -> None:
    """GET /metrics/batch and /metrics/load in exactly the shapes of the origin
    design (../shared/DESIGN.md), extra fields beside them."""
    bus = watched
    publish_acked(bus, "paged", "paged.t", 10)
    time.sleep(1.2)
    status, text = scrape(bus["BUS_WRITER_HTTP"], "/metrics/batch")
    batch = json.loads(text)
    assert status == 200 and batch["batch_enabled"] is True
    assert {"total_flushes", "total_writes", "total_batched_items", "flush_by_size",
            "flush_by_time", "flush_by_shutdown", "avg_batch_size", "max_batch_size",
            "min_batch_size"} <= set(batch["metrics"])
    assert batch["metrics"]["total_writes"] >= 10
    assert set(batch["buffer_sizes"]) == {"messages", "consumptions", "subscriptions"}
    assert isinstance(batch["db_queue_size"], int)
    assert batch["config"] == {"batch_size": 100, "flush_interval_ms": 50,
                               "max_buffer_size": 10000}
    status, text = scrape(bus["BUS_WRITER_HTTP"], "/metrics/load")
    load = json.loads(text)
    assert status == 200 and load["load_monitoring_enabled"] is True
    assert {"requests_per_second", "is_low_load", "threshold", "window_seconds"} <= set(load)


def test_healthz_says_why_a_process_is_not_healthy(make_bus, tmp_path: Path) -> None:
    """503 with a reason: the writer's database not writable, the proxy's
    capture stalled (writer down, queue full), the reader's database not
    there; 200 again once it is over."""
    bus = make_bus(BUS_WRITER_HTTP=f"127.0.0.1:{free_port()}",
                   BUS_PROXY_HTTP=f"127.0.0.1:{free_port()}",
                   BUS_READER_HTTP=f"127.0.0.1:{free_port()}", BUS_CAPTURE_HWM=10,
                   BUS_CAPTURE_HWM_WRITER_DOWN=10)
    bus.start_reader()  # before the writer: no database yet
    # 503 "starting" comes first, until the reader's first snapshot (a second).
    wait_for(lambda: scrape(bus["BUS_READER_HTTP"], "/healthz")[1] != '{"status": '
             '"unavailable", "reason": "starting"}', message="the reader's first snapshot")
    status, body = scrape(bus["BUS_READER_HTTP"], "/healthz")
    assert status == 503 and "database not readable" in body, body
    bus.start_writer()
    bus.start_proxy()
    wait_for(lambda: scrape(bus["BUS_READER_HTTP"], "/healthz")[0] == 200,
             message="the reader healthy once the database exists")
    with Publisher(bus.config(), producer_id="health") as pub:
        holder = sqlite3.connect(bus.db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            pub.publish("health.t", b"x")
            wait_for(lambda: scrape(bus["BUS_WRITER_HTTP"], "/healthz")[0] == 503,
                     message="the writer to say it cannot commit")
            assert "database not writable" in scrape(bus["BUS_WRITER_HTTP"], "/healthz")[1]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        pub.flush(timeout=10)
    wait_for(lambda: scrape(bus["BUS_WRITER_HTTP"], "/healthz")[0] == 200,
             message="the writer healthy once it commits again")
    assert bus.writer.stop() == 0
    ctx = zmq.Context()
    plain = ctx.socket(zmq.PUB)  # no session: the writer is down
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(bus["BUS_PUB_ENDPOINT"])
    try:
        def stalled() -> bool:
            for i in range(50):  # more than the proxy's capture queue and what it holds (10 each)
                plain.send_multipart([b"stalled.t", b"%d" % i])
            return scrape(bus["BUS_PROXY_HTTP"], "/healthz")[0] == 503
        wait_for(stalled, interval=0.2, message="the proxy to say its capture is stalled")
        assert "capture stalled" in scrape(bus["BUS_PROXY_HTTP"], "/healthz")[1]
    finally:
        plain.close()
        ctx.term()
    bus.start_writer()
    wait_for(lambda: scrape(bus["BUS_PROXY_HTTP"], "/healthz")[0] == 200,
             message="the proxy healthy once the writer is back")


def test_a_stuck_loop_makes_healthz_unhealthy(make_bus) -> None:
    """The HTTP side answers from its own threads; what it serves is the
    loop's last snapshot, so a loop stuck (a commit on another process's lock,
    30 s busy timeout here) shows as a stale snapshot: 503."""
    bus = make_bus(BUS_WRITER_HTTP=f"127.0.0.1:{free_port()}",
                   BUS_SQLITE_BUSY_TIMEOUT_MS=30_000).start()
    with Publisher(bus.config(), producer_id="stale") as pub:
        holder = sqlite3.connect(bus.db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            pub.publish("stale.t", b"x")
            wait_for(lambda: scrape(bus["BUS_WRITER_HTTP"], "/healthz")[0] == 503, timeout=20,
                     interval=0.5, message="/healthz to see the stuck loop")
            assert "has not turned" in scrape(bus["BUS_WRITER_HTTP"], "/healthz")[1]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        pub.flush(timeout=10)


def test_up_waits_for_its_own_children_and_prints_their_http_sides(make_bus) -> None:
    """`bus-cli up` reads its children's READY=1 as systemd would, and prints
    where each serves /metrics and /healthz (free loopback ports)."""
    bus = make_bus()
    up = bus.run("up")
    up.stdout.wait_line(lambda line: line == "Ctrl-C stops all three.")
    shown = "\n".join(up.stdout.collect())
    for name in ("BUS_WRITER_HTTP", "BUS_PROXY_HTTP", "BUS_READER_HTTP"):
        [address] = [line.split("http://")[1].split()[0] for line in shown.splitlines()
                     if f"({name})" in line]
        assert scrape(address, "/healthz")[0] in (200, 503), address  # answered
        assert metrics(address)["process_resident_memory_bytes"] > 0
    assert up.stop(signal.SIGINT) == 0


def test_a_second_up_on_ports_in_use_fails_and_creates_no_database(make_bus,
                                                                   tmp_path: Path) -> None:
    """It printed "bus is up" because the first bus answered its pings, then
    failed and left an empty database behind."""
    bus = make_bus().start()
    other_db = tmp_path / "other.db"
    second = bus.cli("--config", "/dev/null", "up", "--db", str(other_db), timeout=30)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "bus is up" not in second.stdout
    assert "in use" in second.stderr
    assert not other_db.exists()


def test_ping_health_and_stats_watch_answer_for_every_process(bus: Bus) -> None:
    """The operator's first commands: all processes at once, a short timeout,
    an exit status (nats and redis-cli are the reference)."""
    ping_all = bus.cli("ping")
    assert ping_all.returncode == 0, ping_all.stdout + ping_all.stderr
    assert [line.split()[0] for line in ping_all.stdout.splitlines()] == \
        ["writer", "proxy", "reader"] and ping_all.stdout.count(" ok ") == 3
    healthy = bus.cli("health")
    assert healthy.returncode == 0 and healthy.stdout.count(" ok") == 3, healthy.stdout
    watch = bus.run("stats", "--watch", "0.2")
    watch.stdout.wait_line(lambda line: line.split()[:1] == ["stored/s"])
    publish_acked(bus, "watched", "watched.t", 50)
    lines = wait_for(lambda: next((line for line in watch.stdout.collect()
                                   if line.split()[:1] not in ([], ["stored/s"])
                                   and line.split()[0] != "0"), None),
                     message=f"a line of rates; stderr: {watch.stderr.collect()[-3:]}")
    assert len(lines.split()) == 10, lines  # one figure a column: every process answered
    assert watch.stop(signal.SIGINT) == 130
    assert bus.reader.stop() == 0
    down = bus.cli("ping", "--timeout-ms", "200")
    assert down.returncode == 1 and "reader" in down.stdout and "DOWN" in down.stdout
    unhealthy = bus.cli("health", "--timeout-ms", "200")
    assert unhealthy.returncode == 1 and "reader  UNHEALTHY" in unhealthy.stdout
    as_json = bus.cli("health", "--timeout-ms", "200", "--json")
    said = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and said["writer"] == {"healthy": True, "reason": None}
    assert said["reader"]["healthy"] is False and "no reply" in said["reader"]["reason"]


def test_topics_consumers_and_the_last_messages_from_the_command_line(bus: Bus) -> None:
    publish_acked(bus, "cli-last", "last.a", 30)
    publish_acked(bus, "cli-other", "other.b", 5)
    last = bus.cli("history", "last.", "--last", "3")
    assert last.returncode == 0, last.stderr
    assert [line.split()[-1] for line in last.stdout.splitlines()] == ["27", "28", "29"]
    everything = bus.cli("history", "--last", "2")
    assert [line.split()[-1] for line in everything.stdout.splitlines()] == ["3", "4"]
    grouped = bus.cli("topics", "--depth", "1")
    assert grouped.returncode == 0, grouped.stderr
    rows = {line.split()[0]: line.split()[1] for line in grouped.stdout.splitlines()[1:]}
    assert rows == {"other": "5", "last": "30"}
    bus.request("BUS_CONTROL_ENDPOINT", "consumer_ack", {"consumer": "audit", "last_id": 10})
    bus.request("BUS_CONTROL_ENDPOINT", "flush")
    listed = bus.cli("consumers", "ls")
    assert listed.returncode == 0 and "audit" in listed.stdout and " 25" in listed.stdout
    info = bus.cli("consumers", "info", "audit")
    assert info.returncode == 0 and json.loads(info.stdout)["last_id"] == 10
    assert bus.cli("consumers", "info", "nobody").returncode == 1
    assert bus.cli("consumers", "rm", "audit").returncode == 0
    gone = bus.cli("consumers", "rm", "audit")
    assert gone.returncode == 1 and "no consumer 'audit'" in gone.stderr


def test_bench_measures_what_it_published_and_every_subscriber_received(bus: Bus) -> None:
    """`bus-cli bench` (like `nats bench`): the figures are of messages that
    really passed: each subscriber saw every one, the writer stored each once."""
    run = bus.cli("bench", "bench.t", "--msgs", "3000", "--pub", "2", "--sub", "2", "--acked",
                  "--rate", "3000", "--size", "64", "--json", timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["publish"]["messages"] == result["acknowledged"]["messages"] == 3000
    assert result["subscribe"]["messages"] == 6000 and result["subscribe"]["received_min"] == 3000
    assert bus.count("bench.t.data") == 3000
    producers = query(bus.db, "SELECT producer_id, contiguous_seq FROM producers WHERE "
                              "producer_id IN (?, ?) ORDER BY producer_id", tuple(result["producers"]))
    assert [seq for _, seq in producers] == [1500, 1500], producers
    for part in ("acknowledged", "subscribe"):
        latency = result[part]["latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"], (part, latency)
    text = bus.cli("bench", "--msgs", "500", "--sub", "1", timeout=120)
    assert text.returncode == 0, text.stderr
    assert "publish" in text.stdout and "end-to-end latency: p50" in text.stdout


def test_bench_says_which_side_it_cannot_reach_and_leaves_nothing_running(bus: Bus) -> None:
    wrong = bus.cli("bench", "bench.lost", "--msgs", "10", "--sub", "1", "--sub-endpoint",
                    f"tcp://127.0.0.1:{free_port()}", "--request-timeout-ms", "1000")
    assert wrong.returncode == 1
    assert "saw nothing through the proxy" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr
    unreachable = bus.cli("bench", "bench.lost", "--msgs", "10", "--pub-endpoint",
                          f"tcp://127.0.0.1:{free_port()}", "--request-timeout-ms", "1000")
    assert unreachable.returncode == 1 and "publisher 1:" in unreachable.stderr, \
        unreachable.stderr
    assert not [t for t in process_titles() if b"bench.lost" in t and b"bus-bench" in t]
    for flag, value in (("--timeout", "nan"), ("--rate", "inf"), ("--timeout", "-1")):
        refused = bus.cli("bench", "--msgs", "10", flag, value)
        assert refused.returncode == 2 and flag in refused.stderr, refused.stderr


def test_bench_stopped_by_sigterm_or_killed_leaves_no_process_behind(bus: Bus) -> None:
    """SIGTERM killed only the parent: its publishers and subscribers waited
    forever under init. Now it stops them and exits 143; and a parent killed
    with SIGKILL takes them along (PR_SET_PDEATHSIG)."""
    for sig, status in ((signal.SIGTERM, 143), (signal.SIGKILL, -signal.SIGKILL)):
        topic = f"bench.sig{int(sig)}"
        run = bus.run("bench", topic, "--msgs", "1000000", "--rate", "2000", "--sub", "1",
                      "--pub", "2")
        wait_for(lambda: bus.count(f"{topic}.data") > 100, message="the bench to publish")
        run.send_signal(sig)
        assert run.wait() == status
        wait_for(lambda: not [t for t in process_titles() if topic.encode() in t
                              and b"bus-bench" in t], message="no bench process left")


def process_titles() -> list[bytes]:
    titles = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            titles.append(path.read_bytes())
        except OSError:  # gone meanwhile
            pass
    return titles


def test_publish_reads_files_and_names_the_line_of_bad_input(bus: Bus, tmp_path: Path) -> None:
    """A payload over the limit or non-JSON from stdin printed a traceback;
    non-UTF-8 stdin crashed after the previous line was published."""
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    sent = bus.cli("publish", "files.bin", "--file", str(blob), "--wait")
    assert sent.returncode == 0, sent.stderr
    [(payload, meta)] = query(bus.db, "SELECT payload, meta FROM messages WHERE topic = ?",
                              ("files.bin",))
    assert payload == blob.read_bytes() and b"application/octet-stream" in meta
    lines = '{"a": 1}\n{"a": 2}\nnot json\n{"a": 4}\n'
    bad = bus.cli("publish", "files.json", "--json", "--wait", input=lines)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "line 3 of standard input" in bad.stderr and "after 2 published" in bad.stderr
    big = "x" * (bus.config().max_message_bytes + 1)
    too_large = bus.cli("publish", "files.big", "--wait", input=f"small\n{big}\n")
    assert too_large.returncode == 1 and "line 2 of standard input" in too_large.stderr
    assert "Traceback" not in too_large.stderr
    raw = subprocess.run([BUS_CLI, "publish", "files.raw", "--wait"], env=bus.env,
                         input=b"ok\n\xff\xfe not utf-8\n", capture_output=True, timeout=30)
    assert raw.returncode == 0, raw.stderr  # bytes are published as they are
    missing = bus.cli("publish", "files.none", "--file", str(tmp_path / "missing.bin"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    blank = bus.cli("publish", "files.lines", "--json", "--wait", input='{"a": 1}\n\n{"a": 2}\n')
    assert blank.returncode == 0 and bus.count("files.lines") == 2  # blank lines are no JSON
    empty = bus.cli("publish", "files.empty", input="")
    assert empty.returncode == 0 and "nothing to publish" in empty.stderr
    assert bus.count("files.json") == 2 and bus.count("files.big") == 1
    assert query(bus.db, "SELECT payload FROM messages WHERE topic = 'files.raw' ORDER BY id")[1][0] \
        == b"\xff\xfe not utf-8"


def test_publish_stopped_by_sigterm_commits_what_it_sent_and_exits_0(bus: Bus) -> None:
    """SIGTERM killed a long publish (143) with messages still queued; now it
    stops after the message at hand, flushes, says how many, and exits 0 as
    tail and the bus processes do."""
    publish = bus.run("publish", "term.t", "x", "--count", "1000000", "--rate", "200", "--wait")
    wait_for(lambda: bus.count("term.t") >= 20, message="some messages stored")
    assert publish.stop(signal.SIGTERM) == 0
    [said] = [line for line in publish.stderr.collect() if "published" in line]
    sent = int(said.split("published ")[1].split()[0])
    assert said.startswith("stopped by SIGTERM: ") and said.endswith(", committed"), said
    assert bus.count("term.t") == sent >= 20


def test_odd_arguments_get_one_line_errors_not_tracebacks(bus: Bus, tmp_path: Path) -> None:
    """From a hostile pass over the CLI: each of these printed a traceback or
    waited forever."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    cases = [
        (["history", "--since", "99999999d", "-n", "1"], 0, None),  # before the epoch: all
        (["history", "--since", "9999-12-31T23:59:59", "-n", "1"], 0, "no stored message"),
        (["history", "--since", "1e300d"], 2, "--since"),
        (["stats", "--watch", "nan"], 2, "not a finite number"),
        (["stats", "--json", "--watch", "1"], 2, "--watch"),
        (["publish", "t", "x", "--wait", "--wait-timeout", "nan"], 2, "not a finite number"),
        (["consumers", "ls", "--control-endpoint", bus["BUS_READ_ENDPOINT"]], 1,
         "not as the writer does"),
        (["consumers", "info", "nobody"], 1, "no consumer 'nobody'"),
        (["anchor", "submit", "--hash", "ab" * 32, "--ref", "r" * 300], 2, "at most 256"),
        (["anchor", "submit", "--hash", "ab" * 32, "--wait", "--timeout", "nan"], 2, "finite"),
        (["anchor", "verify", str(deep)], 1, "INVALID"),
        (["publish", "a\udcff", "x"], 2, "not valid UTF-8"),
    ]
    for args, status, said in cases:
        run = subprocess.run([BUS_CLI, *args], env=bus.env, cwd=tmp_path, capture_output=True,
                             timeout=30, errors="surrogateescape")
        assert run.returncode == status, (args, run.stderr)
        assert "Traceback" not in run.stderr, (args, run.stderr)
        if said:
            assert said in run.stderr, (args, run.stderr)
        if args[:2] == ["consumers", "info"]:
            assert run.stdout == ""  # no JSON object of nulls before the error


MIB = 1 << 20


@pytest.mark.parametrize("role, env, named", [
    # the proxy dropped the publisher of a message the writer accepts: no nack, acks stalled
    ("proxy", {"BUS_MAX_MESSAGE_BYTES": 2_000_000, "BUS_PROXY_MAX_FRAME_BYTES": 1_000_000},
     ["BUS_MAX_MESSAGE_BYTES (2000000)", "BUS_PROXY_MAX_FRAME_BYTES (1000000)"]),
    ("writer", {"BUS_MAX_MESSAGE_BYTES": 16 * MIB, "BUS_CURVE_DIR": "/nonexistent"},
     ["BUS_MAX_MESSAGE_BYTES (16777216)", "BUS_PROXY_MAX_FRAME_BYTES (16777216) less 33"]),
    ("writer", {"BUS_MAX_TOPIC_BYTES": 4000, "BUS_MAX_MESSAGE_BYTES": 4096},
     ["BUS_MAX_TOPIC_BYTES (4000)", "BUS_MAX_MESSAGE_BYTES (4096)"]),
    ("reader", {"BUS_READER_MEMORY_LIMIT_BYTES": 128 * MIB, "BUS_HISTORY_PAGE_BYTES": 64 * MIB},
     ["BUS_READER_MEMORY_LIMIT_BYTES (134217728)", "BUS_HISTORY_PAGE_BYTES (67108864)"]),
    ("writer", {"BUS_WRITER_MEMORY_LIMIT_BYTES": 128 * MIB, "BUS_MAX_MESSAGE_BYTES": 64 * MIB,
                "BUS_PROXY_MAX_FRAME_BYTES": 128 * MIB},
     ["BUS_WRITER_MEMORY_LIMIT_BYTES (134217728)", "BUS_MAX_MESSAGE_BYTES (67108864)"]),
    ("proxy", {"BUS_PROXY_MEMORY_LIMIT_BYTES": 128 * MIB, "BUS_MAX_MESSAGE_BYTES": 64 * MIB,
               "BUS_PROXY_MAX_FRAME_BYTES": 128 * MIB},
     ["BUS_PROXY_MEMORY_LIMIT_BYTES (134217728)", "BUS_MAX_MESSAGE_BYTES (67108864)"]),
    ("anchor", {"BUS_ANCHOR_LEASE_S": 7200, "BUS_UTXO_MAX_LEASE_S": 3600},
     ["BUS_ANCHOR_LEASE_S (7200)", "BUS_UTXO_MAX_LEASE_S (3600)"]),
    ("anchor", {"BUS_ANCHOR_MAX_DOCUMENTS": 60_000}, ["BUS_ANCHOR_MAX_DOCUMENTS", "49,990"]),
    ("reader", {"BUS_MAX_TOPIC_BYTES": 70_000}, ["BUS_MAX_TOPIC_BYTES", "65,000"]),
], ids=["message-over-frame", "message-over-frame-with-curve", "topic-leaves-no-meta",
        "reader-memory-under-a-page", "writer-memory-under-a-message",
        "proxy-memory-under-a-message", "anchor-lease-over-utxo-lease",
        "anchor-documents-over-a-request", "topic-over-a-history-request"])
def test_settings_that_cannot_work_together_stop_the_process_at_start(
        make_bus, role: str, env: dict[str, Any], named: list[str]) -> None:
    """Each value is valid alone; together the bus would accept what it then
    cannot deliver, store or serve. The process exits 2 (as for any bad
    setting) with one line naming both settings, their values, and where each
    came from."""
    bus = make_bus(**env)
    refused = bus.run(role)
    assert refused.wait(20) == 2, refused.stderr.collect()
    [line] = [ln for ln in refused.stderr.collect() if ln.startswith("Error: ")]
    assert all(part in line for part in named), line
    claim, _, origins = line.rpartition(" (from ")
    assert [name for name in env if name in claim and name != "BUS_CURVE_DIR"
            and f"environment {name}" not in origins] == [], line


def test_the_default_settings_and_their_edges_work_together(tmp_path: Path) -> None:
    """The defaults pass, and so do the limits at the edge of each rule: a
    message limit equal to the frame limit (no CURVE), a topic leaving exactly
    room for a session's meta, memory limits that just hold a message or a page."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BUS_", "BATCH_"))}
    for settings in ({}, {"BUS_MAX_MESSAGE_BYTES": MIB, "BUS_PROXY_MAX_FRAME_BYTES": MIB},
                     {"BUS_MAX_TOPIC_BYTES": 3072, "BUS_MAX_MESSAGE_BYTES": 4096},
                     {"BUS_MAX_TOPIC_BYTES": 65_000},
                     {"BUS_READER_MEMORY_LIMIT_BYTES": 101 * MIB,
                      "BUS_WRITER_MEMORY_LIMIT_BYTES": 97 * MIB,
                      "BUS_PROXY_MEMORY_LIMIT_BYTES": 97 * MIB},
                     {"BUS_ANCHOR_LEASE_S": 3600, "BUS_ANCHOR_MAX_DOCUMENTS": 49_990}):
        shown = subprocess.run([BUS_CLI, "config", "--json"], cwd=tmp_path, timeout=60,
                               env={**env, **{k: str(v) for k, v in settings.items()}},
                               capture_output=True, text=True)
        assert shown.returncode == 0, (settings, shown.stderr)


@pytest.mark.parametrize("args", [
    ("history", "x", "--read-endpoint", "tcp://*:5555"),
    ("topics", "--read-endpoint", "tcp://*:5555"),
    ("stats", "--control-endpoint", "tcp://*:5553"),
    ("ping", "--control-endpoint", "tcp://*:5553"),
    ("tail", "x", "-n", "1", "--sub-endpoint", "tcp://*:5551"),
    ("publish", "x", "p", "--pub-endpoint", "tcp://*:5550"),
    # The anchor worker's own clients: logged as "anchor", they connect to it.
    ("anchor", "submit", "--hash", "00" * 32, "--wait", "--anchor-control-endpoint",
     "tcp://*:5556"),
])
def test_a_client_given_a_wildcard_endpoint_says_so_at_once(make_bus, args: tuple[str, ...]
                                                              ) -> None:
    """Issue 25, item 1: `history --read-endpoint 'tcp://*:5555'` printed
    nothing for 10 minutes, `stats`/`ping` hung and swallowed Ctrl-C, `tail`
    and `publish` printed libzmq's traceback. A client connects to an
    address; * is for the process that binds."""
    bus = make_bus()  # not started: nothing is waited for
    done = bus.cli(*args, timeout=20)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])
    assert "Traceback" not in done.stderr
    flag = args[args.index(next(a for a in args if a.startswith("tcp://"))) - 1]
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: ") and flag in error and "tcp://127.0.0.1:" in error, error


def test_a_wildcard_is_still_what_a_process_binds(make_bus) -> None:
    """The check is for clients: the proxy binds `tcp://*:PORT` as before (on
    loopback here: the test's ports), and `config` shows such a setting."""
    port = free_port()
    bus = make_bus(BUS_SUB_ENDPOINT=f"tcp://*:{port}")
    bus.start()
    shown = bus.cli("config")
    assert shown.returncode == 0 and f"tcp://*:{port}" in shown.stdout
    assert bus.proxy_stats()["endpoints"]["sub"] == f"tcp://*:{port}"
    assert bus.cli("ping", timeout=20).returncode == 0


def run_on_a_terminal(bus: Bus, *args: str, timeout: float = 20) -> tuple[int, bytes]:
    """`bus-cli ARGS` with standard output a pseudo-terminal, as a person runs
    it: (exit status, what it wrote)."""
    import pty
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([BUS_CLI, *args], env=bus.env, stdout=secondary,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        os.close(secondary)
        written = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal's other side closed: the command is done
                break
            if not chunk:
                break
            written += chunk
        return proc.wait(timeout=max(0.1, deadline - time.monotonic())), written
    finally:
        os.close(primary)


def test_what_was_published_cannot_drive_the_terminal_of_who_reads_it(bus: Bus) -> None:
    """Issue 25, item 3: `publish $'esc.\\x1b[31mRED' $'payload\\x1b[2J'`, then
    `history esc.` or `tail` on a terminal cleared the screen and left it red.
    A terminal now gets control characters escaped; a pipe and --raw get
    them as they are."""
    topic, payload = "esc.\x1b[31mRED\u202e", "payload\x1b[2J\r\x9b"
    published = bus.cli("publish", topic, payload, "--wait")
    assert published.returncode == 0, published.stderr
    for command in (("history", "esc."), ("tail", "esc.", "--from-id", "1", "-n", "1"),
                    ("topics", "--depth", "1")):
        status, written = run_on_a_terminal(bus, *command)
        assert status == 0, (command, written)
        assert b"\x1b" not in written and b"\xe2\x80\xae" not in written, (command, written)
    status, written = run_on_a_terminal(bus, "history", "esc.")
    assert b"esc.\\x1b[31mRED\\u202e" in written and b"payload\\x1b[2J\\x0d\\x9b" in written
    assert b"\x1b[2J" in run_on_a_terminal(bus, "history", "esc.", "--raw")[1]
    # topics too, as tail and history (it had no --raw: the topic could not be seen as it is)
    assert b"esc.\x1b[31mRED" in run_on_a_terminal(bus, "topics", "--raw")[1]
    assert "\x1b[2J" in bus.cli("history", "esc.").stdout  # a pipe: as it was published


def test_tail_waits_at_most_its_timeout(bus: Bus) -> None:
    """Issue 25, item 2: `tail never.arrives -n 1` could only be killed.
    --timeout bounds it: fewer than -n N messages is exit 1, in one line;
    without -n it is a bounded watch, exit 0."""
    started = time.monotonic()
    waited = bus.cli("tail", "never.arrives", "-n", "1", "--timeout", "1", timeout=30)
    assert waited.returncode == 1, (waited.returncode, waited.stderr)
    assert waited.stderr.strip().splitlines() == \
        ["Error: 0 of 1 message within --timeout 1s"], waited.stderr
    watched = bus.cli("tail", "never.arrives", "--timeout", "1", timeout=30)
    assert watched.returncode == 0 and watched.stdout == "", watched.stderr
    assert time.monotonic() - started < 20
    publish_acked(bus, "timeout-pub", "arrives.t", 1)
    came = bus.cli("tail", "arrives.", "--from-id", "1", "--count", "1", "--timeout", "20",
                   timeout=30)
    assert came.returncode == 0 and "arrives.t" in came.stdout, came.stderr


@pytest.mark.parametrize("args", [("config",), ("history", "pipe."), ("ping",), ("stats",)])
def test_a_reader_of_standard_output_gone_is_a_quiet_exit_141(bus: Bus, args: tuple[str, ...]
                                                               ) -> None:
    """`bus-cli config | head -0`-like: the reader of standard output has
    gone. click took the broken pipe first and exited 1, saying nothing, as
    if the command had failed; `history` then said "no stored message
    matches" (new-user review). Now: 141, what a shell reports for a command
    ended by SIGPIPE, and nothing on stderr."""
    publish_acked(bus, "pipe-pub", "pipe.t", 3)
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the first line
    try:
        done = subprocess.run([BUS_CLI, *args], env=bus.env, stdout=write_end,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              timeout=30)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, ""), (done.returncode, done.stderr)


def test_publish_refuses_two_payload_encodings(bus: Bus) -> None:
    """Issue 25, item 4: `publish --json --msgpack` was accepted, the last
    flag silently winning. Now a usage error, in one line; each alone works."""
    both = bus.cli("publish", "enc.t", '{"a": 1}', "--json", "--msgpack")
    assert both.returncode == 2, (both.returncode, both.stderr)
    assert both.stderr.strip().splitlines()[-1] == \
        "Error: give one of --raw, --json and --msgpack, not --json and --msgpack"
    for flag in ("--json", "--msgpack", "--raw"):
        alone = bus.cli("publish", "enc.t", '{"a": 1}', flag, "--wait")
        assert alone.returncode == 0, (flag, alone.stderr)
    stored = bus.cli("history", "enc.", "--json")
    payloads = [json.loads(line).get("payload") for line in stored.stdout.splitlines()]
    assert payloads == [{"a": 1}, {"a": 1}, '{"a": 1}'], payloads


def test_every_process_tells_its_version_and_the_settings_it_runs_with(make_bus) -> None:
    """`bus-cli ping` and `stats` name the version and revision each process
    runs, /metrics has bus_build_info, and `bus-cli config --running` shows
    the settings of the running processes, not those of the calling shell."""
    bus = make_bus(BUS_WRITER_HTTP=f"127.0.0.1:{free_port()}", BUS_MAX_TOPIC_BYTES=300,
                   BUS_HISTORY_PAGE_ROWS=77).start()
    expected = {"version": importlib.metadata.version("zmq-sqlite-bus"),
                "revision": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                           text=True, cwd=Path(__file__).parent
                                           ).stdout.strip() or "unknown"}
    pinged = bus.cli("ping", "--json")
    assert pinged.returncode == 0, pinged.stderr
    answers = json.loads(pinged.stdout)
    for name, proc in (("writer", bus.writer), ("proxy", bus.proxy), ("reader", bus.reader)):
        assert {k: answers[name][k] for k in ("process", "pid", "version", "revision")} == \
            {"process": name, "pid": proc.pid, **expected}
    for endpoint in ("BUS_CONTROL_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT", "BUS_READ_ENDPOINT"):
        build = bus.request(endpoint, "stats")["build"]
        assert {k: build[k] for k in expected} == expected
    text = bus.cli("ping").stdout
    assert f"0.1.0 {expected['revision'][:12]}" in text or expected["revision"] == "unknown"
    # The logs and the client say it too.
    started = [e for e in bus.writer.log_events() if e.get("event") == "started"]
    assert {k: started[0][k] for k in expected} == expected, started
    assert bus.cli("--version").stdout.strip() == \
        f"bus-cli, version {expected['version']} ({expected['revision']})"
    info = wait_for(lambda: {k: v for k, v in metrics(bus["BUS_WRITER_HTTP"]).items()
                             if k.startswith("bus_build_info")}, message="bus_build_info")
    assert list(info.values()) == [1.0] and "('process', 'writer')" in next(iter(info))

    # The shell that asks has neither setting: its own config shows the defaults.
    shell_env = {k: v for k, v in bus.env.items()
                 if k not in ("BUS_MAX_TOPIC_BYTES", "BUS_HISTORY_PAGE_ROWS")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([BUS_CLI, *args], env=shell_env, capture_output=True, text=True,
                              timeout=30)
    shell = json.loads(cli("config", "--json").stdout)
    assert shell["BUS_MAX_TOPIC_BYTES"] == {"value": 256, "from": "default"}
    running = cli("config", "--running", "--json")
    assert running.returncode == 0, running.stderr
    processes = json.loads(running.stdout)
    writer, reader = processes["writer"]["settings"], processes["reader"]["settings"]
    assert writer["BUS_MAX_TOPIC_BYTES"] == {"value": 300,
                                             "from": "environment BUS_MAX_TOPIC_BYTES"}
    assert reader["BUS_HISTORY_PAGE_ROWS"]["value"] == 77
    assert "BUS_HISTORY_PAGE_ROWS" not in writer, "a process shows the settings of its role"
    assert processes["proxy"]["process"] == "proxy"
    table = cli("config", "--running").stdout
    assert re.search(r"^BUS_MAX_TOPIC_BYTES +300 +environment BUS_MAX_TOPIC_BYTES$", table, re.M)

    bus.proxy.stop()
    down = cli("config", "--running")
    assert down.returncode == 1 and "# proxy: DOWN" in down.stdout


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler of its own for `sig` (SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("point", ["handler+0s", "handler+0.2s", "handler+0.4s", "writer started",
                                   "proxy and reader started"])
def test_ctrl_c_while_up_starts_stops_what_started_and_exits_0(make_bus, point: str) -> None:
    """Issue 25, item 1: Ctrl-C 0.4 s into `bus-cli up` exited 1 blaming "an
    endpoint in use". Once `up` runs (its handler set), Ctrl-C at any point of
    its start stops the children started so far and exits 0, as it does
    once the bus is up."""
    bus = make_bus()
    up = bus.run("up")
    wait_for(lambda: catches(up.pid, signal.SIGTERM) or up.popen.poll() is not None,
             message="up's signal handler")
    if point.startswith("handler+"):
        time.sleep(float(point[len("handler+"):-1]))  # a point in its start, by time
    else:
        wanted = 1 if point == "writer started" else 3
        wait_for(lambda: len(children_of(up.pid)) >= wanted or up.popen.poll() is not None,
                 message=point)
    children = children_of(up.pid)
    assert up.popen.poll() is None, up.stderr.collect()
    up.send_signal(signal.SIGINT)
    code = up.wait(30)
    said = up.stderr.collect()
    assert code == 0, said
    assert not any("in use" in line or "Traceback" in line for line in said), said
    assert said[-1] == "bus stopped", said
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), "a child left running"


def test_ctrl_c_while_bus_cli_still_imports_exits_130_without_a_traceback(make_bus) -> None:
    """Before any command's handler exists, Python is still importing bus-cli
    (click, pyzmq, the commands: a few tenths of a second), and a Ctrl-C
    there printed a KeyboardInterrupt traceback (the new-user review, 0.1 s
    into `bus-cli up`). The console script (cli/entry.py) exits 130 then."""
    bus = make_bus()
    for _ in range(3):
        up = bus.run("up")
        # Importing the commands (libzmq is loaded: pyzmq, which cli.main's
        # imports bring), up's handler not set yet.
        wait_for(lambda: "libzmq" in Path(f"/proc/{up.pid}/maps").read_text()
                 or up.popen.poll() is not None, interval=0.001, message="libzmq loaded")
        if catches(up.pid, signal.SIGTERM):
            continue  # up's handler was quicker than this test: nothing to show this round
        up.send_signal(signal.SIGINT)
        code = up.wait(30)
        said = up.stderr.collect()
        assert code == 130 and not any("Traceback" in line for line in said), (code, said)
        return
    pytest.skip("bus-cli imported faster than this test could signal it three times")


def test_make_up_then_ctrl_c_on_a_terminal_exits_as_bus_cli_up_does(make_bus) -> None:
    """Issue 25, item 2: `make up`, then Ctrl-C, exited 130 through make
    (make, given the terminal's SIGINT, kills itself with it) although
    `bus-cli up` stopped the bus and exited 0. Run on a pseudo-terminal, with
    Ctrl-C typed as a terminal sends it (the INTR character)."""
    import pty
    import select
    bus = make_bus()
    venv = Path(sys.executable).parent.parent
    repo = Path(__file__).resolve().parent.parent
    pid, terminal = pty.fork()
    if pid == 0:  # the child: make on the terminal, the bus's settings
        try:
            os.chdir(bus.tmp_path)
            os.execvpe("make", ["make", "-s", "-C", str(repo), f"VENV={venv}",
                                "-o", f"{venv}/.installed", "up"], bus.env)
        finally:
            os._exit(127)
    output = b""

    def read_some(timeout: float) -> bool:
        if not select.select([terminal], [], [], timeout)[0]:
            return True
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # EIO: the terminal's last holder closed it
            return False
        nonlocal output
        output += chunk
        return bool(chunk)

    try:
        wait_for(lambda: b"Ctrl-C stops all three." in output or not read_some(0.2),
                 timeout=60, message="make up's bus")
        assert b"Ctrl-C stops all three." in output, output[-2000:]
        os.write(terminal, b"\x03")
        deadline = time.monotonic() + 30
        while read_some(1) and time.monotonic() < deadline:
            pass
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(terminal)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "bus stopped" in text and "Interrupt" not in text, text[-2000:]


def test_bench_says_on_stderr_what_it_does_and_how_far_it_is(bus: Bus) -> None:
    """Issue 25, item 2: `bench` printed nothing for the whole run (12 s and
    more). Its progress goes to stderr, at most about once a second;
    stdout is the figures alone (here one JSON object)."""
    started = time.monotonic()
    run = bus.run("bench", "bench.progress", "--msgs", "6000", "--rate", "2000", "--sub", "1",
                  "--acked", "--json")
    first = run.stderr.wait_line(lambda line: line.startswith("bench: "), timeout=10)
    assert time.monotonic() - started < 2.0, f"first progress line after 2 s: {first}"
    counted = run.stderr.wait_line(lambda line: line.startswith("bench: publishing")
                                   and "sent " in line and not line.count("sent 0 "))
    assert "acknowledged" in counted and "received" in counted, counted
    assert run.wait(60) == 0, run.stderr.collect()[-5:]
    result = json.loads("\n".join(run.stdout.collect()))
    assert result["publish"]["messages"] == 6000
    publishing = [line for line in run.stderr.collect() if line.startswith("bench: publishing")]
    assert 2 <= len(publishing) <= 6, publishing  # about 3 s of publishing, once a second


def test_an_unknown_variable_is_named_once_with_the_closest_setting(make_bus,
                                                                     tmp_path: Path) -> None:
    """Issue 25, item 4: a misspelt BUS_* variable is named on stderr with the
    closest setting, once (`up` named it four times: itself and each child),
    and is not an error; an unknown key of the config file is refused, with
    the closest setting too."""
    bus = make_bus(BUS_BATCH_SIZ="5")
    up = bus.run("up")
    up.stdout.wait_line(lambda line: line == "Ctrl-C stops all three.")
    assert up.stop(signal.SIGINT) == 0
    named = [e for e in up.log_events() if e.get("event") == "unknown_setting"]
    assert [(e["variable"], e["closest"]) for e in named] == [("BUS_BATCH_SIZ", "BATCH_SIZE")]
    config = tmp_path / "bus.toml"
    config.write_text("BATCH_SIZ = 5\n")
    done = bus.cli("--config", str(config), "config")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        f"Error: {config}: unknown settings BATCH_SIZ (closest: BATCH_SIZE)"


class ImpostorControl:
    """A local process bound at a control endpoint before the bus process
    (a ROUTER on a thread of the test): it answers every request with the
    next of `replies`, a reply's raw bytes or a function of the request's id."""

    def __init__(self, endpoint: str) -> None:
        import threading
        self.replies: list[Any] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import msgpack
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            *envelope, request = self._sock.recv_multipart()
            request_id = msgpack.unpackb(request)["id"]
            reply = self.replies.pop(0) if self.replies else b"\xc1"
            self._sock.send_multipart([*envelope, reply(request_id) if callable(reply)
                                       else reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)
        self._ctx.term()


def test_an_impostor_at_an_endpoint_cannot_drive_the_terminal_or_crash_ping_and_config(
        make_bus) -> None:
    """Issue 25, item 4: `bus-cli ping` and `config --running` print what each
    process answered. A local process bound at the proxy's control endpoint
    before it wrote escapes to the operator's terminal (\\x1b[2J cleared it)
    and, answering other types than the bus's, made both end in a traceback."""
    import msgpack
    bus = make_bus()
    bus.start_writer()
    bus.start_reader()
    impostor = ImpostorControl(bus["BUS_PROXY_CONTROL_ENDPOINT"])

    def ok(result: Any) -> Callable[[Any], bytes]:
        return lambda request_id: msgpack.packb({"id": request_id, "ok": True,
                                                 "result": result})

    escapes = "\x1b[2J\x1b]0;owned\x07\u202e\x9b"
    error = lambda request_id: msgpack.packb(  # noqa: E731
        {"id": request_id, "ok": False, "error": {"code": escapes, "reason": escapes}})
    answers = {
        "ping": [ok({"pong": True, "process": escapes, "pid": escapes, "version": escapes,
                     "revision": escapes}), ok({"pong": True, "revision": 7}),
                 ok({b"bytes": b"\x1b[2J"}), error, ok(["pong"]), b"\xc1"],
        "config": [ok({"process": escapes, "source": escapes,
                       "settings": {escapes: {"value": escapes, "from": escapes}}}),
                   ok("pong"), ok({"process": "proxy", "source": "", "settings": [1, 2]}),
                   ok({"process": "proxy", "source": "", "settings": {"BUS_X": "v"}}),
                   ok({"process": "proxy", "source": b"\x1b", "settings": {b"\x1b": {}}}),
                   error, b"\xc1"]}
    # health and stats read the proxy's stats (older than the issue: a
    # traceback for a map that is not the proxy's, escapes printed raw).
    answers["stats"] = answers["health"] = [
        ok({"steering": escapes, escapes: {escapes: escapes}}), ok("pong"), ok([1, 2]),
        ok({b"\x1b": b"\x1b[2J"}), error, b"\xc1"]
    try:
        for command, replies in answers.items():
            args = {"ping": ("ping", "--timeout-ms", "2000"), "config": ("config", "--running"),
                    "stats": ("stats",), "health": ("health",)}[command]
            for reply in replies:
                for as_json in ((), ("--json",)) if command != "health" else ((),):
                    impostor.replies = [reply]
                    out = bus.cli(*args, *as_json)
                    shown = (command, reply, as_json, out.stdout, out.stderr)
                    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, shown
                    assert not re.search("[\x1b\x07\x9b\u202e]", out.stdout + out.stderr), shown
                    assert "writer" in out.stdout and "reader" in out.stdout, shown
    finally:
        impostor.close()
