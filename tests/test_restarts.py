"""The restart window (issue 21, item 1): while a bus process restarts
(systemd's RestartSec= is 2 s) its port is free, and any local user can bind
it. A CURVE client of libzmq 4.3 that meets such a squatter (a NULL listener:
no key needed) fails the handshake and never connects there again; on the
proxy's capture that blocked the forwarding loop for good.

Two answers, each tested with real processes: socket activation (systemd
keeps the port bound across the restart: the squatter cannot bind), and
clients and the proxy that connect again after a wrong peer (whatever bound
the port meanwhile, once the real process is back everything returns to full
service by itself, and no acknowledged message is lost).

The squatter (tests/squatter.py) runs as `nobody` where the tests run as root,
else as the test's own user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from bus.client import HistoryClient, Publisher, Subscriber
from tests.conftest import BUS_CLI, Bus, Proc, ping, query, wait_for, wait_until_delivered
from tests.test_auth import keys  # noqa: F401 (a fixture)

SQUATTER = Path(__file__).resolve().parent / "squatter.py"
SQUAT_S = 1.5
RECOVERY_S = 30.0


def squatter_argv(*args: str) -> list[str]:
    """tests/squatter.py ARGS as `nobody` (root can switch users), else as us."""
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() == 0 and shutil.which("runuser") and system_python:
        probe = subprocess.run(["runuser", "-u", "nobody", "--", system_python, "-c", "1"],
                               capture_output=True, timeout=10)
        readable = subprocess.run(["runuser", "-u", "nobody", "--", "test", "-r",
                                   str(SQUATTER)], capture_output=True, timeout=10)
        if probe.returncode == 0 and readable.returncode == 0:
            return ["runuser", "-u", "nobody", "--", system_python, str(SQUATTER), *args]
    return [sys.executable, str(SQUATTER), *args]


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def squat(bus: Bus, endpoint: str, seconds: float = SQUAT_S) -> Proc:
    """A NULL listener on `endpoint`'s port, bound (its "bound" line seen)."""
    squatter = bus.spawn(squatter_argv("null", str(port_of(endpoint)), str(seconds)))
    line = squatter.stdout.wait_line(lambda ln: ln in ("bound",) or ln.startswith("bind failed"))
    assert line == "bound", (line, squatter.stderr.collect())
    return squatter


def met(squatter: Proc) -> None:
    """Until a client of the bus connected to the squatter (and met its greeting)."""
    squatter.stdout.wait_line(lambda ln: ln == "accepted")


@pytest.fixture
def curve_bus(make_bus, keys: Path) -> Bus:  # noqa: F811 (the fixture)
    """A bus with CURVE on, every endpoint on tcp (the capture too: its CURVE
    handshake is what a NULL squatter breaks)."""
    return make_bus(BUS_CURVE_DIR=keys / "curve",
                    BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                    BUS_REQUEST_TIMEOUT_MS=1000).start()


def kill_9(proc: Proc) -> None:
    proc.popen.kill()
    proc.popen.wait(10)


def test_a_null_listener_on_the_capture_port_while_the_writer_restarts_costs_nothing(
        curve_bus: Bus) -> None:
    """Reproduced on libzmq 4.3.5: 1 of 101 messages stored, the proxy's
    forwarding loop blocked for good, live delivery stopped, no log line.
    Now the proxy connects the capture again once the writer is back: the
    100 messages published while the squatter held the port are all
    acknowledged and stored once, live delivery goes on, and the proxy logged
    and counted the wrong peer."""
    bus = curve_bus
    cfg = bus.config()
    with Subscriber(["squat."], cfg) as sub, Publisher(cfg, producer_id="squat-a") as pub:
        wait_until_delivered(pub, sub, "squat.probe")
        pub.flush(timeout=10)
        kill_9(bus.writer)
        squatter = squat(bus, bus["BUS_CAPTURE_ENDPOINT"])
        met(squatter)  # the proxy's capture reconnected to it
        for i in range(100):
            pub.publish("squat.t", b"%d" % i)
        assert squatter.wait(timeout=SQUAT_S + 35) == 0
        bus.start_writer()
        pub.flush(timeout=RECOVERY_S)
        assert pub.acked_seq == pub.last_seq
        assert bus.count("squat.t") == 100
        payloads = query(bus.db, "SELECT payload FROM messages WHERE topic = ?", ("squat.t",))
        assert len({row[0] for row in payloads}) == 100  # each once
        wait_until_delivered(pub, sub, "squat.after")  # live delivery is back
        pub.flush(timeout=10)
    stats = bus.proxy_stats()
    assert stats["forwarding"] == "running"
    assert stats["capture"]["wrong_peers"] >= 1 and stats["capture"]["redials"] >= 1
    events = [e for e in bus.proxy.log_events() if e.get("event") == "capture_wrong_peer"]
    assert events and "mechanism" in events[0]["reason"], events


def test_a_null_listener_on_the_notify_port_while_the_writer_restarts_costs_nothing(
        curve_bus: Bus) -> None:
    """Reproduced: the connected Publisher's acknowledgement socket gave up on
    the squatter, and it timed out for ever although its rows were stored. Now
    it connects again and learns that all 100 are stored."""
    bus = curve_bus
    with Publisher(bus.config(), producer_id="squat-b") as pub:
        pub.publish("squatb.first", b"x", wait=True)
        kill_9(bus.writer)
        squatter = squat(bus, bus["BUS_NOTIFY_ENDPOINT"])
        met(squatter)  # the Publisher's SUB reconnected to it
        for i in range(100):
            pub.publish("squatb.t", b"%d" % i)
        assert squatter.wait(timeout=SQUAT_S + 35) == 0
        bus.start_writer()
        pub.flush(timeout=RECOVERY_S)
        assert pub.acked_seq == pub.last_seq
        assert bus.count("squatb.t") == 100


def test_null_listeners_on_the_proxys_and_the_readers_ports_cost_nothing(
        curve_bus: Bus) -> None:
    """The proxy and the reader restart while NULL listeners hold their ports:
    the Publisher's XPUB, the Subscriber's SUB and the history client's REQ
    (idle meanwhile: its next send blocked for ever) each connect again."""
    bus = curve_bus
    cfg = bus.config()
    history = HistoryClient(cfg, timeout_ms=2000)
    try:
        with Subscriber(["squatc."], cfg) as sub, Publisher(cfg, producer_id="squat-c") as pub:
            wait_until_delivered(pub, sub, "squatc.probe")
            pub.flush(timeout=10)
            assert history.page(["squatc."]).rows
            kill_9(bus.proxy)
            kill_9(bus.reader)
            squatters = [squat(bus, bus[name]) for name in
                         ("BUS_PUB_ENDPOINT", "BUS_SUB_ENDPOINT", "BUS_READ_ENDPOINT")]
            for squatter in squatters:
                met(squatter)
            for i in range(100):
                pub.publish("squatc.t", b"%d" % i)
            for squatter in squatters:
                assert squatter.wait(timeout=SQUAT_S + 35) == 0
            bus.start_proxy()
            bus.start_reader()
            pub.flush(timeout=RECOVERY_S)
            assert bus.count("squatc.t") == 100
            wait_until_delivered(pub, sub, "squatc.after")
            pub.flush(timeout=10)
            assert len(in_thread(lambda: list(history.messages(["squatc.t"])),
                                 RECOVERY_S)) == 100
    finally:
        history.close()


def in_thread(call: Any, timeout: float) -> Any:
    """`call()`, failing the test if it does not return within `timeout` (a
    send that blocks for ever must not hang the test run)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # reported below
            errors.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"did not return within {timeout} s")
    if errors:
        raise errors[0]
    return result[0]


# --- socket activation -------------------------------------------------------------

ACTIVATE = ("import fcntl, os, sys\n"
            "fds = [int(fd) for fd in sys.argv[1].split(',')]\n"
            # out of the way of 3.. first: a source may be one of the targets
            "moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]\n"
            "for index, fd in enumerate(moved):\n"
            "    os.dup2(fd, 3 + index)\n"
            "    os.close(fd)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "os.execv(sys.argv[2], sys.argv[2:])\n")


def activated(bus: Bus, listeners: dict[str, socket.socket], *argv: str) -> Proc:
    """Start ARGV as systemd starts a socket-activated service: the listening
    sockets as fds 3, 4, ... (sd_listen_fds(3)), LISTEN_FDS, LISTEN_FDNAMES,
    and LISTEN_PID the pid of the process that reads them (an exec wrapper
    sets it, then execs: the pid stays)."""
    fds = [sock.fileno() for sock in listeners.values()]
    env = {**bus.env, "LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": ":".join(listeners)}
    proc = Proc([sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), *argv], env,
                cwd=bus.tmp_path, pass_fds=tuple(fds))
    bus.procs.append(proc)
    return proc


def test_socket_activation_keeps_the_writers_ports_across_a_kill_9(make_bus) -> None:
    """The writer takes its listening sockets from systemd (here: from the
    test, as systemd passes them) instead of binding: across a kill -9 and
    restart the ports stay bound by the socket's holder, a squatter (another
    user) cannot bind them, and the restarted writer serves on them again."""
    bus = make_bus()
    listeners = {}
    for name, variable in (("capture", "BUS_CAPTURE_ENDPOINT"),
                           ("control", "BUS_CONTROL_ENDPOINT"),
                           ("notify", "BUS_NOTIFY_ENDPOINT")):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as systemd does
        listener.bind(("127.0.0.1", port_of(bus[variable])))
        listener.listen(128)
        listeners[name] = listener
    try:
        writer = activated(bus, listeners, BUS_CLI, "writer")
        wait_for(lambda: ping(bus["BUS_CONTROL_ENDPOINT"]) or writer.popen.poll() is not None,
                 message="the socket-activated writer to answer")
        assert writer.popen.poll() is None, writer.stderr.collect()[-5:]
        bus.start_proxy()
        with Publisher(bus.config(), producer_id="activated") as pub:
            for i in range(50):
                pub.publish("act.t", b"%d" % i)
            pub.flush(timeout=10)
            kill_9(writer)
            for variable in ("BUS_CAPTURE_ENDPOINT", "BUS_CONTROL_ENDPOINT",
                             "BUS_NOTIFY_ENDPOINT"):
                attempt = subprocess.run(squatter_argv("bind", str(port_of(bus[variable]))),
                                         capture_output=True, text=True, timeout=30)
                assert attempt.stdout.startswith("bind failed"), (variable, attempt)
            for i in range(50, 100):
                pub.publish("act.t", b"%d" % i)
            writer = activated(bus, listeners, BUS_CLI, "writer")
            pub.flush(timeout=RECOVERY_S)
            assert writer.popen.poll() is None
        assert bus.count("act.t") == 100
    finally:
        for listener in listeners.values():
            listener.close()


def test_a_socket_passed_for_another_endpoint_is_refused(make_bus) -> None:
    """A .socket unit whose ListenStream= is not where bus.toml puts the
    endpoint: the process says so and exits, instead of serving where no
    client looks."""
    bus = make_bus()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        reader = activated(bus, {"read": listener}, BUS_CLI, "reader")
        assert reader.wait() == 78  # EX_CONFIG: the units do not restart it
        error = [e for e in reader.log_events() if e.get("event") == "cannot_start"]
        assert error and "ListenStream" in error[0]["error"], reader.stderr.collect()[-5:]
    finally:
        listener.close()


def test_zmq_use_fd_is_what_takes_the_socket_over() -> None:
    """What bus/sockets.bind relies on: libzmq serves a listening socket it is
    given (ZMQ_USE_FD) and closes that fd when its socket closes."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    ctx = zmq.Context()
    try:
        rep = ctx.socket(zmq.PULL)
        rep.setsockopt(zmq.USE_FD, os.dup(listener.fileno()))
        rep.bind(f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        push.send(b"through the passed socket")
        assert rep.poll(5000) and rep.recv() == b"through the passed socket"
        push.close(0)
        rep.close(0)
    finally:
        ctx.term()
        listener.close()
