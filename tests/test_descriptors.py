"""File descriptors (issue 22, item 1): idle TCP connections past a process's
open-file limit neither stop it nor keep it from serving the clients it has.

Before: 1,100 connections that send nothing (CURVE on) filled the descriptor
table (the units set no LimitNOFILE, so 1,024), the memory guard's
open('/proc/self/statm') failed with EMFILE and every process exited 1. Now
each bound endpoint keeps at most BUS_MAX_CONNECTIONS connections (the newest
above it shut down at once), a process fits that cap to its open-file limit,
and what the loops read needs no new descriptor. The processes here run with
a soft and hard RLIMIT_NOFILE of 256, so a few hundred connections are enough.
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bus import security, sockets
from bus.client import ControlClient
from bus.runner import resident_bytes
from tests.conftest import BUS_CLI, Bus, Proc, ping, wait_for
from tests.fuzz import idle_connections, open_idle
from tests.test_auth import as_client, keys  # noqa: F401 (the fixture)

OPEN_FILE_LIMIT = 256
# Idle connections to each endpoint: past the whole table of the process
# that serves it.
IDLE_PER_ENDPOINT = 300
# Runs a program with RLIMIT_NOFILE soft and hard set to argv[1]; what
# preexec_fn would do, with Proc as every test starts processes.
LIMITED = ("import os, resource, sys; n = int(sys.argv[1]); "
           "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])")


def start_limited(bus: Bus, role: str, control_endpoint: str) -> Proc:
    """`bus-cli ROLE` under OPEN_FILE_LIMIT, once it answers ping."""
    proc = bus.spawn([sys.executable, "-c", LIMITED, str(OPEN_FILE_LIMIT), BUS_CLI, role])
    setattr(bus, role, proc)
    wait_for(lambda: ping(bus[control_endpoint], bus.curve()) or proc.popen.poll() is not None,
             message=f"{role} ping")
    assert proc.popen.poll() is None, proc.stderr.collect()[-5:]
    return proc


@pytest.fixture
def enough_descriptors() -> None:
    """This test process opens more connections than the default soft limit
    (1,024 on many hosts) allows: raised toward the hard one for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_past_the_open_file_limit_stop_no_process_and_starve_no_client(
        make_bus: Any, keys: Path, enough_descriptors: None) -> None:  # noqa: F811
    bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                   BUS_REQUEST_TIMEOUT_MS=3000)
    start_limited(bus, "writer", "BUS_CONTROL_ENDPOINT")
    start_limited(bus, "proxy", "BUS_PROXY_CONTROL_ENDPOINT")
    start_limited(bus, "reader", "BUS_READ_ENDPOINT")
    result = idle_connections(bus, IDLE_PER_ENDPOINT, rounds=2, hold_s=3.0,
                              client=as_client(bus, keys, "pub1"))
    # Six endpoints x 300, twice: past each process's 256 descriptors.
    assert result["opened"] == 2 * 6 * IDLE_PER_ENDPOINT
    assert result["alive"] == {"writer": True, "proxy": True, "reader": True}, \
        [line for proc in bus.procs for line in proc.stderr.collect()
         if "crashed" in line or "exit_status" in line]
    # Served throughout: every message acknowledged in time, every ping answered.
    assert result["unacknowledged_waves"] == 0
    assert result["acknowledged"] == result["published"] > 0
    assert tuple(result["stored"]) == (result["published"],) * 2  # each once
    assert result["pings"]["missed"] == 0 and result["pings"]["answered"] > 0
    # The cap fitted to the limit: (256 - 64) / (2 x 3 endpoints), (256 - 64) / 2.
    writer, proxy, reader = (result["connections"][role] for role in ("writer", "proxy",
                                                                      "reader"))
    assert {counts["max"] for counts in (*writer.values(), *proxy.values())} == {32}
    assert reader["read"]["max"] == 96
    # Cut on every endpoint. (How many depends on how many the listen backlog,
    # 100, let in during a wave: the rest wait out SYN retransmissions.)
    for name, counts in (("control", writer["control"]), ("notify", writer["notify"]),
                         ("publishers", proxy["publishers"]),
                         ("subscribers", proxy["subscribers"]),
                         ("control", proxy["control"]), ("read", reader["read"])):
        assert counts["refused"] > 0, (name, counts)
    lowered = [event for event in bus.writer.log_events()
               if event["event"] == "max_connections_lowered"]
    assert lowered and lowered[0]["max_connections"] == 32
    assert any(event["event"] == "connection_refused" for event in bus.proxy.log_events())
    # After the waves: new clients are served, and every process stops cleanly.
    assert ping(bus["BUS_CONTROL_ENDPOINT"], bus.curve())
    assert bus.stop() == (0, 0)


def ends(conn: socket.socket, within_s: float) -> bool:
    """Whether the other end closes the connection within `within_s` (what it
    sent before is read and dropped: libzmq's greeting)."""
    conn.setblocking(True)
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            if conn.recv(4096) == b"":
                return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
    return False


def closed_within(conns: list[socket.socket], seconds: float) -> set[socket.socket]:
    """The connections among `conns` whose other end closes within `seconds`."""
    closed: set[socket.socket] = set()
    with selectors.DefaultSelector() as selector:
        for conn in conns:
            conn.setblocking(False)
            selector.register(conn, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and len(closed) < len(conns):
            for key, _ in selector.select(left):
                try:
                    data = key.fileobj.recv(4096)
                except ConnectionResetError:
                    data = b""
                if data == b"":
                    closed.add(key.fileobj)
                    selector.unregister(key.fileobj)
    return closed


def test_the_newest_connection_over_the_cap_is_shut_down_and_counted(make_bus: Any) -> None:
    bus = make_bus(BUS_MAX_CONNECTIONS=4)
    bus.start_writer()
    reader = bus.start_reader()
    endpoint = bus["BUS_READ_ENDPOINT"]
    # A client connected first holds one of the 4 places, and keeps it.
    client = ControlClient(endpoint, timeout_ms=3000)
    assert client.request("ping") == "pong"
    held = open_idle(endpoint, 10)
    try:
        # The reader keeps the 3 oldest; the 7 newest see their connection end.
        stats = wait_for(lambda: (s := client.request("stats"))
                         ["connections"]["read"]["refused"] >= 7 and s,
                         message="the connections over the cap to be cut")
        assert stats["connections"]["read"] == {"open": 4, "max": 4, "refused": 7}
        # EOF after libzmq's greeting: the reader shut them down.
        assert all(ends(conn, within_s=5) for conn in held[3:])
        # Still open, waiting for a greeting that never comes.
        assert not any(ends(conn, within_s=0.2) for conn in held[:3])
        assert any(event["event"] == "connection_refused" and event["endpoint"] == "read"
                   for event in reader.log_events())
    finally:
        client.close()
        for conn in held:
            conn.close()
    # Their places free again: a new client is served.
    assert wait_for(lambda: ping(endpoint), message="a new client's ping")


def test_a_process_raises_its_soft_open_file_limit_to_what_its_cap_needs(
        make_bus: Any) -> None:
    bus = make_bus(BUS_MAX_CONNECTIONS=300)
    proc = bus.spawn([sys.executable, "-c",
                      "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                      "(256, 4096)); os.execv(sys.argv[1], sys.argv[1:])", BUS_CLI, "reader"])
    bus.reader = proc
    wait_for(lambda: ping(bus["BUS_READ_ENDPOINT"]), message="reader ping")
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    soft = next(line.split()[3] for line in limits.splitlines()
                if line.startswith("Max open files"))
    assert int(soft) == sockets.descriptors_needed(300, 1)
    stats = bus.request("BUS_READ_ENDPOINT", "stats")
    assert stats["connections"]["read"]["max"] == 300
    assert not [event for event in proc.log_events()
                if event["event"] == "max_connections_lowered"]


class FullTable:
    """This process's descriptor table full for the length of a `with`: the
    soft limit lowered to what is open, and the rest taken."""

    def __enter__(self) -> FullTable:
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8,
                                                    self.limits[1]))
        self.taken: list[int] = []
        try:
            while len(self.taken) < 64:
                self.taken.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd in self.taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


def test_memory_reads_and_key_list_reloads_need_no_free_descriptor(keys: Path) -> None:  # noqa: F811
    ring = security.load_keyring(str(keys / "curve"))
    members = dict(ring.members)
    (keys / "curve" / "readers" / "added.key").write_bytes(
        (keys / "curve" / "publishers" / "pub1.key").read_bytes())
    with FullTable():
        with pytest.raises(OSError):
            os.open("/dev/null", os.O_RDONLY)  # the table is full indeed
        assert resident_bytes() > 0
        # The lists stay as they were (no key dropped for a file it could not
        # open), and the failure is counted.
        assert ring.refresh(now=1e9) is False
        assert ring.members == members and ring.reload_failures == 1
    assert ring.refresh(now=2e9) is True
    assert len(ring.members["readers"]) == len(members["readers"]) + 1


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines()
                if line.startswith("Threads:"))


# The HTTP side's clients at once (bus/http.MAX_CLIENTS).
MAX_CLIENTS = 16


def test_idle_http_clients_take_at_most_sixteen_threads_and_descriptors(make_bus: Any) -> None:
    from bus.http import CLIENT_TIMEOUT_S
    from tests.conftest import free_port
    bus = make_bus(BUS_READER_HTTP=f"127.0.0.1:{free_port()}")
    bus.start_writer()
    reader = bus.start_reader()
    threads_before = threads_of(reader.pid)
    host, _, port = bus["BUS_READER_HTTP"].rpartition(":")
    idle = open_idle(f"tcp://{host}:{port}", 3 * MAX_CLIENTS)
    try:
        # 16 are served (by a thread each, waiting for a request that never
        # comes, until CLIENT_TIMEOUT_S, 5 s); the others are closed at once.
        assert len(closed_within(idle, seconds=1.5)) == 2 * MAX_CLIENTS
        assert threads_of(reader.pid) <= threads_before + MAX_CLIENTS
    finally:
        for conn in idle:
            conn.close()
    import urllib.request

    def metrics() -> str | None:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as page:
                return page.read().decode()
        except OSError:
            return None
    text = wait_for(metrics, timeout=CLIENT_TIMEOUT_S + 10, message="/metrics")
    # (and the scrapes refused while the 16 waited out their timeout)
    refused = float(re.search(r"^bus_reader_http_refused_total (\S+)$", text, re.M)[1])
    assert refused >= 2 * MAX_CLIENTS
    assert 'bus_reader_connections_open{endpoint="read"}' in text


def test_the_anchor_worker_lives_through_idle_connections_past_its_limit(
        make_bus: Any, node: Any, enough_descriptors: None) -> None:
    from tests.test_anchor import bus_for
    bus = bus_for(make_bus, node)
    worker = bus.spawn([sys.executable, "-c", LIMITED, str(OPEN_FILE_LIMIT), BUS_CLI, "anchor"])
    wait_for(lambda: any(e.get("event") == "anchor_ready" for e in worker.log_events())
             or worker.popen.poll() is not None, message="the worker ready")
    endpoint = bus["BUS_ANCHOR_CONTROL_ENDPOINT"]
    with ControlClient(endpoint, timeout_ms=3000) as client:
        assert client.request("ping") == "pong"
        idle = open_idle(endpoint, IDLE_PER_ENDPOINT)
        try:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:  # served while the idle ones are held
                assert client.request("ping") == "pong"
                assert worker.popen.poll() is None, worker.stderr.collect()[-5:]
            counts = wait_for(lambda: (c := client.request("stats")["connections"]["control"])
                              ["refused"] > 0 and c, message="connections over the cap cut")
            assert counts["max"] == 96 and counts["open"] <= 96  # (256 - 64) / 2
        finally:
            for conn in idle:
                conn.close()
    assert wait_for(lambda: ping(endpoint), message="a new client's ping")
    assert worker.stop() == 0
