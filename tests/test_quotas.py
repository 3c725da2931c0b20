"""Quotas per key, the producers and keys commands, and revoking a key while
the bus runs (issue 21, item 5: "No quotas and no way back"). One reader key
filled the 10,000-consumer cap in 2.9 s, one publisher key opened 21,517
producer ids in 10 s, nothing listed or freed producer ids, and a key could
only be taken back by a restart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import zmq.auth

from bus import protocol, security
from bus.client import BusError, BusTimeout, ControlClient, HistoryClient, Publisher
from tests.conftest import Bus, query, wait_for
from tests.test_auth import as_client, keys, secure_bus  # noqa: F401  (the CURVE fixtures)


def client(bus: Bus, keys: Path, name: str) -> ControlClient:
    return ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=2000,
                         curve=security.client_keys(as_client(bus, keys, name)))


def public_key(keys: Path, name: str) -> str:
    return zmq.auth.load_certificate(keys / "clients" / f"{name}.key_secret")[0].decode()


def add_client(keys: Path, name: str, role: str) -> None:
    public, _ = zmq.auth.create_certificates(keys / "clients", name)
    Path(public).rename(keys / "curve" / role / f"{name}.key")


def refused_with(call, quota: str, key: str) -> BusError:
    with pytest.raises(BusError) as refused:
        call()
    assert refused.value.code == protocol.QUOTA_EXCEEDED, refused.value
    assert f"quota {quota}: key {key}" in str(refused.value)
    return refused.value


@pytest.mark.parametrize("db_engine", ["sqlite", "postgresql"], indirect=True)
def test_a_key_owns_at_most_its_quota_of_producer_ids(make_bus, keys: Path) -> None:
    add_client(keys, "pub2", "publishers")
    bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                   BUS_MAX_PRODUCERS_PER_KEY=3).start()
    pub1 = public_key(keys, "pub1")
    with client(bus, keys, "pub1") as control:
        for producer in ("q-1", "q-2", "q-3"):
            assert control.request("producer_open", {"producer": producer})["epoch"] == 1
        refused_with(lambda: control.request("producer_open", {"producer": "q-4"}),
                     "producers_per_key", pub1)
        assert control.request("producer_open", {"producer": "q-1"})["epoch"] == 2, \
            "its own ids it may open again"
    with client(bus, keys, "pub2") as other:  # another key has a quota of its own
        assert other.request("producer_open", {"producer": "p2-1"})["epoch"] == 1
    quotas = bus.writer_stats()["quotas"]
    assert quotas["refused"] == {"producers_per_key": 1}
    assert quotas["refused_keys"] == {pub1: 1} and quotas["producers_per_key"] == 3
    assert bus.writer_stats()["control"]["failed"] == {protocol.QUOTA_EXCEEDED: 1}
    # Counted from the table at start.
    assert bus.writer.stop() == 0
    bus.start_writer()
    with client(bus, keys, "pub1") as control:
        refused_with(lambda: control.request("producer_open", {"producer": "q-4"}),
                     "producers_per_key", pub1)
    # An admin frees one; the key may take another id, and the freed one is
    # anyone's.
    freed = bus.cli("producers", "rm", "q-2")
    assert freed.returncode == 0 and f"owned by {pub1}" in freed.stderr, freed.stderr
    with client(bus, keys, "pub1") as control:
        assert control.request("producer_open", {"producer": "q-4"})["epoch"] == 1
    with client(bus, keys, "pub2") as other:
        reopened = other.request("producer_open", {"producer": "q-2"})
        assert reopened["epoch"] == 3, "never an epoch handed out before"
    assert bus.stop() == (0, 0)
    assert sorted(query(bus.db, "SELECT producer_id, owner FROM producers")) == [
        ("p2-1", public_key(keys, "pub2")), ("q-1", pub1), ("q-2", public_key(keys, "pub2")),
        ("q-3", pub1), ("q-4", pub1)]


@pytest.mark.parametrize("db_engine", ["sqlite", "postgresql"], indirect=True)
def test_a_key_owns_at_most_its_quota_of_durable_consumers(make_bus, keys: Path) -> None:
    add_client(keys, "reader2", "readers")
    bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                   BUS_MAX_CONSUMERS_PER_KEY=2, BUS_MAX_CONSUMERS=4).start()
    reader1 = public_key(keys, "reader1")
    with Publisher(as_client(bus, keys, "pub1"), producer_id="src") as pub:
        pub.publish("c.t", b"x", wait=True, timeout=10)
    ack = {"last_id": 1}
    with client(bus, keys, "reader1") as control:
        for name in ("c-1", "c-2"):
            assert control.request("consumer_ack", {"consumer": name, **ack})["last_id"] == 1
        refused_with(lambda: control.request("consumer_ack", {"consumer": "c-3", **ack}),
                     "consumers_per_key", reader1)
        assert control.request("consumer_ack", {"consumer": "c-1", **ack})["last_id"] == 1
    with client(bus, keys, "reader2") as other:
        assert other.request("consumer_ack", {"consumer": "c-3", **ack})["last_id"] == 1
    assert bus.writer_stats()["quotas"]["refused"] == {"consumers_per_key": 1}
    assert bus.writer.stop() == 0  # counted from the owners stored with the positions
    bus.start_writer()
    with client(bus, keys, "reader1") as control:
        refused_with(lambda: control.request("consumer_ack", {"consumer": "c-4", **ack}),
                     "consumers_per_key", reader1)
    assert bus.cli("consumers", "rm", "c-1").returncode == 0
    with client(bus, keys, "reader1") as control:
        assert control.request("consumer_ack", {"consumer": "c-4", **ack})["last_id"] == 1
    with client(bus, keys, "reader2") as other:  # the global cap still holds
        assert other.request("consumer_ack", {"consumer": "c-5", **ack})["last_id"] == 1
        with pytest.raises(BusError) as full:
            other.request("consumer_ack", {"consumer": "c-6", **ack})
        assert full.value.code == protocol.TOO_MANY_CONSUMERS


def test_a_key_over_its_request_rate_is_refused_and_no_other_key_is(make_bus,
                                                                    keys: Path) -> None:
    rate = 20
    bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                   BUS_MAX_REQUESTS_PER_KEY_S=rate).start()
    reader1 = public_key(keys, "reader1")
    served = refused = 0
    started = time.monotonic()
    with client(bus, keys, "reader1") as flood, client(bus, keys, "pub1") as other:
        for _ in range(200):
            try:
                flood.request("ping")
                served += 1
            except BusError as exc:
                assert exc.code == protocol.QUOTA_EXCEEDED
                assert f"quota requests_per_key_s: key {reader1}" in str(exc)
                refused += 1
        elapsed = time.monotonic() - started
        assert other.request("ping") == "pong", "another key is served meanwhile"
        assert refused and served <= rate + rate * elapsed + 1, (served, refused, elapsed)
        # Its bucket fills again with time.
        wait_for(lambda: _try(flood) == "pong", message="the key served again")
    assert bus.writer_stats()["quotas"]["refused"]["requests_per_key_s"] >= refused


def _try(control: ControlClient) -> object:
    try:
        return control.request("ping")
    except BusError as exc:
        return exc


def test_without_curve_there_is_one_principal_and_only_the_global_caps(make_bus) -> None:
    bus = make_bus(BUS_MAX_PRODUCERS_PER_KEY=1, BUS_MAX_CONSUMERS_PER_KEY=1,
                   BUS_MAX_REQUESTS_PER_KEY_S=1).start()
    for producer in ("anon-1", "anon-2", "anon-3"):
        assert bus.request("BUS_CONTROL_ENDPOINT", "producer_open",
                           {"producer": producer})["epoch"] == 1
    for name in ("a-1", "a-2"):
        bus.request("BUS_CONTROL_ENDPOINT", "consumer_ack", {"consumer": name, "last_id": 0})
    assert bus.writer_stats()["quotas"]["refused"] == {}


def test_the_producer_commands_are_for_admins(secure_bus: Bus, keys: Path) -> None:
    with client(secure_bus, keys, "pub1") as control:
        control.request("producer_open", {"producer": "mine"})
        for cmd in ("producers_list", "producer_info", "producer_remove"):
            with pytest.raises(BusError) as refused:
                control.request(cmd, {"producer": "mine"})
            assert refused.value.code == protocol.FORBIDDEN, cmd
    listed = secure_bus.cli("producers", "ls")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:2] == ["mine", "publishers/pub1"], \
        "the owner by its list and name, where BUS_CURVE_DIR has the lists"


# --- keys ------------------------------------------------------------------------


def test_a_revoked_key_is_refused_at_once_without_a_restart(secure_bus: Bus,
                                                             keys: Path) -> None:
    """`bus-cli keys revoke` while the bus runs: within a couple of seconds
    the key's new connections are refused, and its requests on the
    connections it already has are answered `forbidden`, by the writer and
    the reader; other keys go on. Put back, it is let in again."""
    bus = secure_bus
    curve = keys / "curve"
    reader = as_client(bus, keys, "reader1")
    with Publisher(as_client(bus, keys, "pub1"), producer_id="rv") as pub:
        pub.publish("rv.t", b"x", wait=True, timeout=10)
    writer_conn = client(bus, keys, "reader1")
    history_conn = HistoryClient(reader, timeout_ms=2000)
    try:
        assert writer_conn.request("consumer_get", {"consumer": "rv"})["last_id"] is None
        assert len(history_conn.page(["rv."]).rows) == 1
        listed = bus.cli("keys", "ls", str(curve), "--json")
        assert {"list": "readers", "name": "reader1", "public_key": public_key(keys, "reader1"),
                "problem": None} in json.loads(listed.stdout)
        revoked = bus.cli("keys", "revoke", str(curve), "reader1")
        assert revoked.returncode == 0, revoked.stderr
        assert not (curve / "readers" / "reader1.key").exists()

        def forbidden(call) -> bool:
            try:
                call()
            except BusError as exc:
                return exc.code == protocol.FORBIDDEN
            return False
        started = time.monotonic()
        wait_for(lambda: forbidden(lambda: writer_conn.request("consumer_get",
                                                               {"consumer": "rv"})),
                 timeout=5, message="the writer to refuse the revoked key's commands")
        wait_for(lambda: forbidden(lambda: history_conn.page(["rv."])), timeout=5,
                 message="the reader to refuse the revoked key's requests")
        assert time.monotonic() - started < 3
    finally:
        writer_conn.close()
        history_conn.close()
    with pytest.raises(BusTimeout):  # a new connection never completes its handshake
        with HistoryClient(reader, timeout_ms=500) as again:
            again.page(["rv."])
    assert bus.request("BUS_READ_ENDPOINT", "stats")["security"]["connections_refused"][
        "read"] >= 1
    assert bus.writer_stats()["security"]["key_reloads"] >= 1
    with client(bus, keys, "pub1") as other:  # the others go on
        assert other.request("ping") == "pong"
    listed = bus.cli("keys", "ls", str(curve))
    assert "reader1" not in listed.stdout and "pub1" in listed.stdout
    # Put back (a copy of its public key), it is let in again, still without a restart.
    (curve / "readers" / "reader1.key").write_text(
        f'curve\n    public-key = "{public_key(keys, "reader1")}"\n')

    def readable() -> bool:
        try:
            with HistoryClient(reader, timeout_ms=500) as back:
                return len(back.page(["rv."]).rows) == 1
        except BusError:
            return False
    wait_for(readable, timeout=10, message="the key put back to be let in")


def test_keys_ls_and_revoke_say_what_they_did_in_one_line(tmp_path: Path, keys: Path,
                                                          bus: Bus) -> None:
    curve = keys / "curve"
    (curve / "readers" / "pub1.key").write_text((curve / "publishers" / "pub1.key").read_text())
    (curve / "readers" / "broken.key").write_text("not a certificate\n")
    listed = bus.cli("keys", "ls", str(curve))
    assert listed.returncode == 0, listed.stderr
    rows = [line.split(None, 2) for line in listed.stdout.splitlines()]
    assert [row[:2] for row in rows] == [["admins", "admin1"], ["publishers", "pub1"],
                                         ["readers", "broken"], ["readers", "pub1"],
                                         ["readers", "reader1"]]
    assert rows[1][2] == public_key(keys, "pub1") and rows[2][2].startswith("UNREADABLE")
    only = bus.cli("keys", "revoke", str(curve), "pub1", "--list", "readers")
    assert only.returncode == 0 and (curve / "publishers" / "pub1.key").exists()
    assert not (curve / "readers" / "pub1.key").exists()
    everywhere = bus.cli("keys", "revoke", str(curve), "pub1")
    assert everywhere.returncode == 0 and "publishers/pub1.key" in everywhere.stdout
    for args in (("revoke", str(curve), "pub1"), ("revoke", str(tmp_path / "none"), "x"),
                 ("ls", str(tmp_path / "none"))):
        failed = bus.cli("keys", *args)
        assert failed.returncode == 1, (args, failed)
        assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr


def test_keys_generate_errors_are_one_line(tmp_path: Path, bus: Bus) -> None:
    """An unwritable directory, a path that is a file, one under a file, one
    that cannot exist: one line and exit 1, never a traceback."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    targets = [a_file, a_file / "below", Path("/proc/nope"), Path("/proc/self")]
    if os.geteuid() != 0:  # root writes anywhere: /proc/self stands for it above
        targets.append(read_only)
    for target in targets:
        done = bus.cli("keys", "generate", str(target), "alice")
        assert done.returncode == 1, (target, done)
        assert len(done.stderr.strip().splitlines()) == 1, (target, done.stderr)
        assert "Traceback" not in done.stderr and str(target) in done.stderr
    assert not list(read_only.iterdir())
