"""CURVE authentication (issue #10): with BUS_CURVE_DIR every endpoint needs a
known key, three lists decide who publishes, who reads and who changes state,
a producer id belongs to the key that opened it, and the capture pipe lets in
the proxy alone. Refused connections and commands are counted."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.auth

from bus import protocol, security
from bus.client import BusError, BusTimeout, ControlClient, HistoryClient, Publisher, Subscriber
from bus.config import with_overrides
from tests.conftest import Bus, query, wait_for

ROLE_OF_CLIENT = {"pub1": "publishers", "reader1": "readers", "admin1": "admins"}


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A BUS_CURVE_DIR with the bus's pairs and the three lists, and a directory
    of client certificates: pub1, reader1, admin1, and stranger (in no list)."""
    curve = tmp_path / "curve"
    clients = tmp_path / "clients"
    curve.mkdir()
    clients.mkdir()
    for name in ("server", "proxy"):
        zmq.auth.create_certificates(curve, name)
    for name, role in [*ROLE_OF_CLIENT.items(), ("stranger", None)]:
        public, _secret = zmq.auth.create_certificates(clients, name)
        if role:
            (curve / role).mkdir(exist_ok=True)
            Path(public).rename(curve / role / f"{name}.key")
    security.load_keyring.cache_clear()
    return tmp_path


def as_client(bus: Bus, keys: Path, name: str):
    """The bus's config as the client `name` sees it."""
    return with_overrides(bus.config(), curve_key=str(keys / "clients" / f"{name}.key_secret"))


@pytest.fixture
def secure_bus(make_bus, keys: Path) -> Bus:
    return make_bus(BUS_CURVE_DIR=keys / "curve",
                    BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                    BUS_REQUEST_TIMEOUT_MS=1000).start()


def test_known_keys_publish_subscribe_and_read_and_everything_is_stored(secure_bus: Bus,
                                                                         keys: Path) -> None:
    bus = secure_bus
    with Subscriber(["sec."], as_client(bus, keys, "reader1")) as sub, \
            Publisher(as_client(bus, keys, "pub1"), producer_id="sec-pub") as pub:
        wait_for(lambda: pub.publish("sec.probe", b"p") and sub.receive(timeout=0.1),
                 message="a reader's subscriber to receive")
        for i in range(200):
            pub.publish("sec.t", b"%d" % i)
        pub.flush(timeout=10)
        assert pub.acked_seq == pub.last_seq
    assert bus.count("sec.t") == 200
    with HistoryClient(as_client(bus, keys, "reader1")) as history:
        assert len(list(history.messages(["sec.t"]))) == 200
    done = bus.cli("stats", "--json")
    assert done.returncode == 0, done.stderr
    assert '"curve": true' in done.stdout


def test_an_unknown_key_can_do_nothing_and_is_counted(secure_bus: Bus, keys: Path) -> None:
    bus = secure_bus
    stranger = as_client(bus, keys, "stranger")
    with pytest.raises(BusTimeout):
        Publisher(stranger, producer_id="intruder", connect_timeout=1).connect()
    with pytest.raises(BusTimeout):
        with HistoryClient(stranger, timeout_ms=500) as history:
            history.page(["sec."])
    with pytest.raises(BusTimeout):
        with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=500,
                           curve=security.client_keys(stranger)) as control:
            control.request("utxo_reserve", {"request_id": "r1", "min_amount_sat": 1,
                                             "lease_seconds": 10})
    # A subscriber with an unknown key hears nothing while a known one does.
    with Subscriber(["sec."], stranger) as outsider, \
            Subscriber(["sec."], as_client(bus, keys, "reader1")) as insider, \
            Publisher(as_client(bus, keys, "pub1"), producer_id="sec-pub") as pub:
        wait_for(lambda: pub.publish("sec.live", b"x") and insider.receive(timeout=0.1),
                 message="the known subscriber to receive")
        pub.publish("sec.live", b"last", wait=True)
        assert insider.receive(timeout=1) is not None
        assert outsider.receive(timeout=0.2) is None
    # Straight into the capture pipe: with the stranger's key, and with none.
    ctx = zmq.Context()
    pushes = []
    try:
        for curve in (security.client_keys(stranger), None):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            security.secure_client(push, curve)
            push.connect(bus["BUS_CAPTURE_ENDPOINT"])
            push.send_multipart([b"pushed.t", b"x"], zmq.NOBLOCK)  # queued: never delivered
            pushes.append(push)

        def refused() -> dict[str, int]:
            return {**bus.writer_stats()["security"]["connections_refused"],
                    **bus.proxy_stats()["security"]["connections_refused"],
                    **bus.request("BUS_READ_ENDPOINT", "stats")["security"][
                        "connections_refused"]}
        domains = ("pub", "sub", "control", "read", "notify", "capture")
        counted = wait_for(lambda: all(refused().get(d, 0) >= 1 for d in domains) and refused(),
                           message="a refused connection counted at every endpoint")
    finally:
        for push in pushes:
            push.close()
        ctx.term()
    assert set(domains) <= set(counted)
    assert bus.count("pushed.") == 0 and bus.count("intruder") == 0
    for proc in (bus.writer, bus.proxy, bus.reader):
        keys_logged = Counter((e["endpoint"], e["client_key"]) for e in proc.log_events()
                              if e["event"] == "connection_refused")
        assert keys_logged and max(keys_logged.values()) == 1, \
            "each refused key logged once per endpoint"


def test_a_publish_only_key_cannot_change_state(secure_bus: Bus, keys: Path) -> None:
    bus = secure_bus
    publisher = security.client_keys(as_client(bus, keys, "pub1"))
    reader = security.client_keys(as_client(bus, keys, "reader1"))
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=2000, curve=publisher) as control:
        for cmd, args in (("utxo_reserve", {"request_id": "r1", "min_amount_sat": 1,
                                            "lease_seconds": 10}),
                          ("consumer_delete", {"consumer": "billing"}), ("flush", {}),
                          ("consumer_ack", {"consumer": "billing", "last_id": 5})):
            with pytest.raises(BusError) as refused:
                control.request(cmd, args)
            assert refused.value.code == protocol.FORBIDDEN, cmd
        assert control.request("producer_open", {"producer": "pub1-own"})["epoch"] == 1
        assert control.request("ping") == "pong"
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=2000, curve=reader) as control:
        with pytest.raises(BusError, match="changes state|admins"):
            control.request("producer_open", {"producer": "reader-own"})
        assert control.request("consumer_get", {"consumer": "billing"})["last_id"] is None
    security_stats = bus.writer_stats()["security"]
    assert security_stats["commands_forbidden"] == 5
    # What is valid is still stored and acknowledged.
    with Publisher(as_client(bus, keys, "pub1"), producer_id="after") as pub:
        pub.publish("after.t", b"ok", wait=True, timeout=10)
    assert bus.count("after.t") == 1


def test_a_producer_id_belongs_to_the_key_that_opened_it(secure_bus: Bus, keys: Path) -> None:
    bus = secure_bus
    with Publisher(as_client(bus, keys, "pub1"), producer_id="owned") as pub:
        pub.publish("own.t", b"1", wait=True, timeout=10)
        # Another key, even an admin's, can neither open nor so fence it.
        with pytest.raises(BusError) as refused:
            Publisher(as_client(bus, keys, "admin1"), producer_id="owned").connect()
        assert refused.value.code == protocol.FORBIDDEN
        pub.publish("own.t", b"2", wait=True, timeout=10)
    with Publisher(as_client(bus, keys, "pub1"), producer_id="owned") as again:
        assert again.epoch == 2  # its owner may open it again
    assert bus.count("own.t") == 2


def test_without_keys_stats_says_authentication_is_off(bus: Bus) -> None:
    done = bus.cli("stats")
    assert done.returncode == 0, done.stderr
    assert "authentication is off" in done.stdout


def test_bus_cli_keys_generate_writes_a_pair_and_never_overwrites(tmp_path: Path,
                                                                  bus: Bus) -> None:
    done = bus.cli("keys", "generate", str(tmp_path / "k"), "alice")
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "k" / "alice.key", tmp_path / "k" / "alice.key_secret"
    assert zmq.auth.load_certificate(public)[1] is None
    assert zmq.auth.load_certificate(secret)[1] is not None
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    again = bus.cli("keys", "generate", str(tmp_path / "k"), "alice")
    assert again.returncode == 1 and "never overwritten" in again.stderr


def test_bad_keys_are_refused_at_start_in_one_line(make_bus, keys: Path) -> None:
    curve = keys / "curve"
    (curve / "proxy.key").rename(keys / "proxy.key.away")
    bus = make_bus(BUS_CURVE_DIR=curve)
    done = bus.cli("writer", timeout=20)
    assert done.returncode == 1 and "proxy.key is missing" in done.stderr
    assert "Traceback" not in done.stderr
    (keys / "proxy.key.away").rename(curve / "proxy.key")
    server_key = (curve / "server.key").read_text()
    (curve / "server.key").write_text((keys / "clients" / "stranger.key").read_text())
    done = bus.cli("writer", timeout=20)
    assert done.returncode == 2 and "not the public half" in done.stderr
    (curve / "server.key").write_text(server_key)
    short = keys / "clients" / "short.key_secret"
    short.write_text('metadata\ncurve\n    public-key = "short"\n    secret-key = "short"\n')
    done = bus.cli("stats", "--curve-key", str(short))
    assert done.returncode == 2 and "40 Z85 characters" in done.stderr


def test_a_key_in_two_lists_has_the_rights_of_both(make_bus, keys: Path) -> None:
    curve = keys / "curve"
    (curve / "readers" / "pub1.key").write_text((curve / "publishers" / "pub1.key").read_text())
    bus = make_bus(BUS_CURVE_DIR=curve,
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret").start()
    both = security.client_keys(as_client(bus, keys, "pub1"))
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=2000, curve=both) as control:
        assert control.request("producer_open", {"producer": "both"})["epoch"] == 1
        assert control.request("consumer_get", {"consumer": "both"})["last_id"] is None
        with pytest.raises(BusError, match="needs a key in admins/"):
            control.request("flush")
    logged = wait_for(lambda: [e for e in bus.writer.log_events()
                               if e["event"] == "command_forbidden"],
                      message="the refusal logged")  # (the log is read by a thread)
    assert logged[0]["client_key"] == both.public.decode()


def test_another_key_cannot_pre_empt_a_producers_messages(secure_bus: Bus, keys: Path) -> None:
    """pub2 (another publisher key) learns the victim's epoch and next seqs and
    sends messages in its name first: they are dropped and counted; the
    victim's own messages are stored and acknowledged."""
    bus = secure_bus
    curve = keys / "curve"
    public, _ = zmq.auth.create_certificates(keys / "clients", "pub2")
    Path(public).rename(curve / "publishers" / "pub2.key")
    bus.writer.stop()
    bus.proxy.stop()
    security.load_keyring.cache_clear()
    bus.start_writer()
    bus.start_proxy()
    pub2 = as_client(bus, keys, "pub2")
    with Publisher(as_client(bus, keys, "pub1"), producer_id="victim-1") as victim:
        victim.publish("victim.t", b"real-1", wait=True, timeout=10)
        with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=2000,
                           curve=security.client_keys(pub2)) as control:
            status = control.request("producer_status", {"producer": "victim-1"})
        ctx = zmq.Context()
        forger = ctx.socket(zmq.XPUB)
        forger.setsockopt(zmq.LINGER, 2000)
        security.secure_client(forger, security.client_keys(pub2))
        forger.connect(bus["BUS_PUB_ENDPOINT"])
        try:
            assert forger.poll(5000)
            forger.recv()
            for seq in range(2, 5):
                for mac in (None, b"x" * 16):
                    meta = {"producer": "victim-1", "epoch": status["epoch"], "seq": seq}
                    if mac:
                        meta["mac"] = mac
                    forger.send_multipart([b"victim.t", b"FORGED-%d" % seq,
                                           msgpack.packb(meta)])
            wait_for(lambda: bus.writer_stats()["security"]["messages_not_authentic"] >= 6,
                     message="the forged messages counted")
        finally:
            forger.close()
            ctx.term()
        for seq in range(2, 5):
            victim.publish("victim.t", b"real-%d" % seq)
        victim.flush(timeout=10)
    rows = [r[0] for r in query(bus.db, "SELECT payload FROM messages WHERE producer_id = "
                                        "'victim-1' ORDER BY producer_seq")]
    assert rows == [b"real-1", b"real-2", b"real-3", b"real-4"]


def test_the_session_macs_are_keyed_blake2b_as_documented() -> None:
    """docs/protocol.md's formulas, computed here with hashlib alone: a
    message's mac covers its topic, payload and every byte of its meta up to
    the tag; a notification's its topic and payload map up to the tag."""
    import hashlib
    import struct
    for key in (os.urandom(32), os.urandom(16)):
        signer = protocol.SessionMac(key)
        meta = protocol.encode_meta("p-1", 2**63 - 1, 7, signer, time_ns=-5,
                                    headers={"h": "v"}, topic=b"t.x", payload=b"payload")
        assert meta[-22:-16] == b"\xa3mac\xc4\x10" == protocol.MAC_ENTRY
        expected = hashlib.blake2b(b"M" + struct.pack(">II", 3, 7) + b"t.x" + b"payload"
                                   + meta[:-16], key=key, digest_size=16).digest()
        assert meta[-16:] == expected
        assert msgpack.unpackb(meta)["mac"] == expected
        assert signer.message_is_authentic(b"t.x", b"payload", meta)
        for topic, payload, altered in ((b"t.y", b"payload", meta), (b"t.x", b"payloaD", meta),
                                        (b"t.x", b"payload", meta[:5] + b"X" + meta[6:])):
            assert not signer.message_is_authentic(topic, payload, altered)
        topic = protocol.ack_topic("p-1")
        note = signer.notification(topic, {"producer": "p-1", "epoch": 7, "contiguous_seq": 9})
        assert note[-16:] == hashlib.blake2b(b"N" + struct.pack(">I", len(topic)) + topic
                                             + note[:-16], key=key, digest_size=16).digest()
        assert msgpack.unpackb(note)["contiguous_seq"] == 9
        assert signer.notification_is_authentic(topic, note)
        assert not signer.notification_is_authentic(protocol.nack_topic("p-1"), note)
        assert not protocol.SessionMac(key[::-1]).notification_is_authentic(topic, note)


def test_an_ipc_capture_is_the_bus_users_alone_and_needs_no_proxy_key(make_bus, keys: Path,
                                                                       tmp_path: Path) -> None:
    """With CURVE on, an ipc:// capture endpoint is guarded by its socket file
    (owner-only from the bind on) instead of CURVE: the proxy needs no key of
    its own, and everything is still stored and acknowledged."""
    curve = keys / "curve"
    for name in ("proxy.key", "proxy.key_secret"):
        (curve / name).unlink()
    # A directory others may enter: only the socket file's own mode keeps them out.
    run = tmp_path / "run"
    run.mkdir()
    for directory in (run, *run.parents):
        if directory == Path(directory.anchor):
            break
        directory.chmod(directory.stat().st_mode | 0o011)
    bus = make_bus(BUS_CURVE_DIR=curve, BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                   BUS_CAPTURE_ENDPOINT=f"ipc://{run}/capture.sock").start()
    mode = (run / "capture.sock").stat()
    assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o600
    assert mode.st_uid == os.geteuid()
    with Publisher(as_client(bus, keys, "pub1"), producer_id="ipc-pub") as pub:
        for i in range(300):
            pub.publish("ipc.t", b"%d" % i)
        pub.flush(timeout=10)
    assert bus.count("ipc.t") == 300
    assert bus.writer_stats()["security"]["capture"] == "ipc socket file, owner only"
    if os.geteuid() == 0:  # another user cannot connect at all
        assert connect_as_nobody(run / "capture.sock") == "PermissionError"


def connect_as_nobody(path: Path) -> str:
    """Connect to a Unix socket from a child process running as uid 65534: the
    name of the error, or "connected"."""
    import socket
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        outcome = b"connected"
        try:
            os.setgid(65534)
            os.setuid(65534)
            socket.socket(socket.AF_UNIX).connect(str(path))
        except OSError as exc:
            outcome = type(exc).__name__.encode()
        os.write(write_end, outcome)
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as result:
        return result.read().decode()


def test_a_consumer_name_belongs_to_the_key_that_acknowledged_it_first(make_bus,
                                                                       keys: Path) -> None:
    curve = keys / "curve"
    public, _ = zmq.auth.create_certificates(keys / "clients", "reader2")
    Path(public).rename(curve / "readers" / "reader2.key")
    bus = make_bus(BUS_CURVE_DIR=curve,
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret").start()
    with Publisher(as_client(bus, keys, "pub1"), producer_id="cons-src") as pub:
        for i in range(5):
            pub.publish("cons.t", b"%d" % i)
        pub.flush(timeout=10)

    def control(name: str) -> ControlClient:
        return ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=2000,
                             curve=security.client_keys(as_client(bus, keys, name)))
    with control("reader1") as owner:
        assert owner.request("consumer_ack", {"consumer": "billing", "last_id": 2})["last_id"] == 2
    bus.writer.stop()  # the owner is stored with the position
    bus.start_writer()
    with control("reader2") as other:
        with pytest.raises(BusError, match="belongs to another key") as refused:
            other.request("consumer_ack", {"consumer": "billing", "last_id": 5})
        assert refused.value.code == protocol.FORBIDDEN
        assert other.request("consumer_get", {"consumer": "billing"})["last_id"] == 2
    assert bus.writer_stats()["security"]["commands_forbidden"] == 1
    with control("reader1") as owner:
        assert owner.request("consumer_ack", {"consumer": "billing", "last_id": 3})["last_id"] == 3
    # A durable subscriber (`bus-cli tail --durable`) learns it before reading anything.
    with pytest.raises(BusError, match="belongs to another key"):
        Subscriber(["cons."], as_client(bus, keys, "reader2"), durable="billing")
    tail = bus.cli("tail", "cons.", "--durable", "billing", "-n", "1",
                   "--curve-key", str(keys / "clients" / "reader2.key_secret"))
    assert tail.returncode != 0 and "belongs to another key" in tail.stderr, tail
    assert tail.stdout == ""
    # A name from before CURVE (no owner) is claimed by the first key's ack,
    # even one that does not move it.
    bus.writer.stop()
    with sqlite3.connect(bus.db) as conn:
        conn.execute("UPDATE consumers SET owner = NULL WHERE name = 'billing'")
        assert conn.total_changes == 1
    conn.close()
    bus.start_writer()
    with control("reader1") as owner:
        assert owner.request("consumer_ack", {"consumer": "billing", "last_id": 1})["last_id"] == 3
    with control("reader2") as other:
        with pytest.raises(BusError, match="belongs to another key"):
            other.request("consumer_ack", {"consumer": "billing", "last_id": 5})
    assert bus.request("BUS_CONTROL_ENDPOINT", "consumer_delete",
                       {"consumer": "billing"})["deleted"] is True
    with control("reader2") as other:  # deleted by an admin: the name is free again
        assert other.request("consumer_ack", {"consumer": "billing", "last_id": 1})["last_id"] == 1
    bus.writer.stop()
    assert query(bus.db, "SELECT name, last_id, owner FROM consumers") == \
        [("billing", 1, security.client_keys(as_client(bus, keys, "reader2")).public.decode())]


def test_an_abstract_ipc_capture_still_needs_curve(make_bus, keys: Path) -> None:
    """ipc://@name has no socket file whose mode could keep anyone out."""
    bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                   BUS_CAPTURE_ENDPOINT=f"ipc://@bus-test-{os.getpid()}-{id(keys)}").start()
    assert bus.writer_stats()["security"]["capture"] == "curve, proxy.key only"
    with Publisher(as_client(bus, keys, "pub1"), producer_id="abstract") as pub:
        pub.publish("abs.t", b"x", wait=True, timeout=10)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)  # a key not in the proxy's place: refused, nothing stored
    push.setsockopt(zmq.LINGER, 0)
    try:
        security.secure_client(push, security.client_keys(as_client(bus, keys, "stranger")))
        push.connect(bus["BUS_CAPTURE_ENDPOINT"])
        push.send_multipart([b"pushed.t", b"x"], zmq.NOBLOCK)
        wait_for(lambda: bus.writer_stats()["security"]["connections_refused"].get("capture"),
                 message="the stranger's capture connection refused")
    finally:
        push.close()
        ctx.term()
    assert bus.count("pushed.") == 0 and bus.count("abs.t") == 1


def test_an_ipc_capture_in_a_directory_others_can_write_is_refused(make_bus, keys: Path,
                                                                   tmp_path: Path) -> None:
    """Another user's socket at the capture path would receive every message
    (the proxy is no CURVE client there): writer and proxy refuse to start
    unless only the bus's user can write the directory."""
    for mode in (0o777, 0o1777):  # sticky or not: others can create the path first
        shared = tmp_path / f"shared-{mode:o}"
        shared.mkdir()
        shared.chmod(mode)
        bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                       BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                       BUS_CAPTURE_ENDPOINT=f"ipc://{shared}/capture.sock")
        for role in ("writer", "proxy"):
            done = bus.cli(role, timeout=20)
            assert done.returncode != 0 and "writable by other users" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
        assert not (shared / "capture.sock").exists()


def test_with_curve_a_message_naming_a_producer_needs_its_session(secure_bus: Bus,
                                                                  keys: Path) -> None:
    """Without an epoch there is no MAC: any key could store rows in a
    producer's name. Refused (counted), while anonymous messages are stored."""
    bus = secure_bus
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 2000)
    security.secure_client(pub, security.client_keys(as_client(bus, keys, "pub1")))
    try:
        pub.connect(bus["BUS_PUB_ENDPOINT"])
        assert pub.poll(5000)
        pub.recv()
        pub.send_multipart([b"legacy.t", b"forged", msgpack.packb({"producer": "victim",
                                                                   "seq": 4})])
        pub.send_multipart([b"legacy.anon", b"anonymous"])
        bus.wait_count(1, "legacy.anon")
    finally:
        pub.close()
        ctx.term()
    stats = wait_for(lambda: (s := bus.writer_stats())["ingest"]["rejected"] and s,
                     message="the sessionless message counted")
    assert stats["ingest"]["rejected"] == {protocol.SESSION_REQUIRED: 1}
    assert bus.count("legacy.t") == 0


def test_curve_adds_the_framing_the_config_allows_for_to_each_frame() -> None:
    """BUS_PROXY_MAX_FRAME_BYTES is libzmq's MAXMSGSIZE, which counts a frame as
    sent: with CURVE, CURVE_FRAME_OVERHEAD_BYTES more than its payload. The
    config keeps BUS_MAX_MESSAGE_BYTES that far below it."""
    from bus.config import CURVE_FRAME_OVERHEAD_BYTES
    limit = 100_000

    def passes(size: int) -> bool:
        ctx = zmq.Context()
        try:
            server_public, server_secret = zmq.curve_keypair()
            client_public, client_secret = zmq.curve_keypair()
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.MAXMSGSIZE, limit)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.curve_server, sub.curve_secretkey = True, server_secret
            port = sub.bind_to_random_port("tcp://127.0.0.1")
            pub = ctx.socket(zmq.PUB)
            pub.curve_serverkey, pub.curve_publickey, pub.curve_secretkey = \
                server_public, client_public, client_secret
            pub.connect(f"tcp://127.0.0.1:{port}")
            wait_for(lambda: pub.send(b"") or sub.poll(50), message="the CURVE handshake")
            pub.send(b"x" * size)
            while sub.poll(1000):  # the probes still on their way, then the frame
                if len(sub.recv()) == size:
                    return True
            return False  # libzmq dropped the connection, and the frame with it
        finally:
            ctx.destroy(linger=0)
    assert passes(limit - CURVE_FRAME_OVERHEAD_BYTES)
    assert not passes(limit - CURVE_FRAME_OVERHEAD_BYTES + 1)
