"""Issue 21: "acknowledged means stored" holds against a local process, with
CURVE off as with CURVE on. A session's messages carry a MAC over the whole
message and the writer's acknowledgements and nacks a MAC under the same
session key, so nobody without the key can store in a session's name or make
its publisher count a message as stored that is not."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth

from bus import protocol, security
from bus.client import BusTimeout, ControlClient, Publisher
from tests.conftest import HOLD_ROWS, Bus, RawProducer, query, wait_for
from tests.forger import forged_acks
from tests.test_auth import as_client, keys  # noqa: F401  (the CURVE fixture)


def payloads(bus: Bus, producer: str) -> list[bytes]:
    return [row[0] for row in query(bus.db, "SELECT payload FROM messages WHERE producer_id = ?"
                                            " ORDER BY producer_seq", (producer,))]


def not_authentic(bus: Bus) -> int:
    return bus.writer_stats()["security"]["messages_not_authentic"]


def test_acknowledgements_forged_while_the_writer_is_down_are_not_believed(bus: Bus) -> None:
    """Item 2: the writer is killed and another local user binds its notify
    and capture endpoints, answering `$bus.ack.victim {contiguous_seq:
    1000000}`. The victim's flush used to succeed with nothing stored, and its
    re-send buffer was emptied: now it waits, and once the writer is back
    everything is stored."""
    with Publisher(bus.config(), producer_id="victim", connect_timeout=10) as victim:
        victim.publish("trust.t", b"first", wait=True, timeout=10)
        bus.writer.kill()
        squatter = forged_acks(bus["BUS_NOTIFY_ENDPOINT"], bus["BUS_CAPTURE_ENDPOINT"],
                               "victim", victim.epoch, seconds=30)
        try:
            assert squatter.wait_bound() == "bound"
            for i in range(100):
                victim.publish("trust.t", b"%d" % i)
            with pytest.raises(BusTimeout):
                victim.flush(timeout=3)
            assert victim.acked_seq == 1 and victim.unacked == 100
            assert victim.notifications_ignored.get("not_authentic", 0) > 0
        finally:
            squatter.stop()
        bus.start_writer()
        victim.flush(timeout=40)
    assert payloads(bus, "victim") == [b"first", *(b"%d" % i for i in range(100))]


def test_an_authentic_ack_past_the_last_seq_sent_is_ignored_and_counted() -> None:
    from bus.config import load_config
    pub = Publisher(load_config(env={}), producer_id="p")
    pub.epoch, pub.last_seq, pub.acked_seq = 2, 10, 4
    pub._mac = protocol.SessionMac(b"k" * 32)
    topic = protocol.ack_topic("p")
    ack = {"producer": "p", "epoch": 2, "max_seq": 11, "refused": 0, "committed_ns": 1}
    pub._apply_ack(topic, pub._mac.notification(topic, {**ack, "contiguous_seq": 11}))
    assert pub.acked_seq == 4 and pub.notifications_ignored == {"beyond_sent": 1}
    pub._apply_ack(topic, protocol.SessionMac(b"x" * 32).notification(
        topic, {**ack, "contiguous_seq": 9}))
    assert pub.acked_seq == 4 and pub.notifications_ignored["not_authentic"] == 1
    pub._apply_ack(topic, pub._mac.notification(topic, {**ack, "contiguous_seq": 9}))
    assert pub.acked_seq == 9
    pub.close()


def test_without_curve_nobody_without_the_session_key_stores_in_its_name(bus: Bus) -> None:
    """Item 3: `producer_status` tells anyone a session's epoch and next seq;
    messages sent in its name before the victim's own used to be stored, and
    the victim's own acknowledged as duplicates."""
    with Publisher(bus.config(), producer_id="victim3") as victim:
        status = bus.request("BUS_CONTROL_ENDPOINT", "producer_status",
                             {"producer": "victim3"})
        first = status["max_seq"] + 1
        forged = 0
        with RawProducer(bus, "forger", session=False) as forger:
            for seq in range(first, first + 10):
                meta = {"producer": "victim3", "epoch": status["epoch"], "seq": seq}
                forger.send_frames(
                    [b"orders.x", b"FORGED", msgpack.packb(meta)],
                    [b"orders.x", b"FORGED", msgpack.packb({**meta, "mac": os.urandom(16)})],
                    [b"orders.x", b"FORGED", protocol.SessionMac(os.urandom(32)).signed_meta(
                        b"orders.x", b"FORGED", meta)])
                forged += 3
            # Without an epoch: no session to check, so refused, not stored
            # beside the victim's rows as (victim3, seq).
            forger.send_frames([b"orders.x", b"FORGED", msgpack.packb(
                {"producer": "victim3", "seq": first})])
            wait_for(lambda: not_authentic(bus) >= forged,
                     message="the forged messages dropped and counted")
            wait_for(lambda: bus.writer_stats()["ingest"]["rejected"].get(
                protocol.SESSION_REQUIRED) == 1, message="the sessionless one refused")
        for i in range(10):
            victim.publish("orders.x", b"real-%d" % i)
        victim.flush(timeout=10)
    assert payloads(bus, "victim3") == [b"real-%d" % i for i in range(10)]
    assert bus.writer_stats()["producers"]["duplicates_skipped"] == 0


@pytest.fixture
def mallory_keys(keys: Path) -> Path:
    """test_auth's keys (pub1, reader1, admin1), and mallory, who both
    publishes and reads."""
    public, _ = zmq.auth.create_certificates(keys / "clients", "mallory")
    for role in ("publishers", "readers"):
        (keys / "curve" / role / "mallory.key").write_bytes(Path(public).read_bytes())
    security.load_keyring.cache_clear()
    return keys


@pytest.mark.parametrize("curve", [True, False], ids=["curve", "plain"])
def test_a_captured_message_altered_outside_topic_and_payload_is_not_stored(
        make_bus, mallory_keys: Path, curve: bool) -> None:
    """Item 4: the MAC covered topic, payload, epoch and seq only. A key that
    can publish and read captures a victim's message live and, the victim's
    copy lost (a writer crash), sends it first with its own headers,
    content_type, time_ns or an extra meta key and the same mac: it was stored
    as the victim's authentic message. Now the mac covers the whole meta."""
    settings: dict[str, Any] = {}
    if curve:
        settings = {"BUS_CURVE_DIR": mallory_keys / "curve",
                    "BUS_CURVE_KEY": mallory_keys / "clients" / "admin1.key_secret"}
    bus = make_bus(**settings).start()

    def config_of(name: str) -> Any:
        return bus.config() if not curve else \
            as_client(bus, mallory_keys, name)

    lost: list[tuple[bytes, bytes, bytes]] = []
    with Publisher(config_of("pub1"), producer_id="victim4") as victim:
        sent = victim._send
        victim._send = lost.append  # these copies never reach the proxy
        for i in range(4):
            victim.publish("v4.t", b"order-%d" % i, headers={"approved-by": "alice"},
                           content_type="application/json")
        victim._send = sent
        alterations = [
            lambda m: {**m, "headers": {"approved-by": "mallory"}},
            lambda m: {**m, "content_type": "text/plain"},
            lambda m: {**m, "time_ns": 1},
            lambda m: {**{k: v for k, v in m.items() if k != "mac"}, "approved": "mallory",
                       "mac": m["mac"]},
        ]
        ctx = zmq.Context()
        forger = ctx.socket(zmq.XPUB)
        forger.setsockopt(zmq.LINGER, 2000)
        if curve:
            security.secure_client(forger, security.client_keys(config_of("mallory")))
        forger.connect(bus["BUS_PUB_ENDPOINT"])
        try:
            assert forger.poll(5000), "the proxy did not subscribe to the forger"
            for (topic, payload, meta), alter in zip(lost, alterations):
                altered = alter(msgpack.unpackb(meta))
                assert altered["mac"] == msgpack.unpackb(meta)["mac"]
                forger.send_multipart([topic, payload, msgpack.packb(altered)])
            wait_for(lambda: not_authentic(bus) >= 4, message="the altered copies dropped")
        finally:
            forger.close()
            ctx.term()
        victim.flush(timeout=15)  # re-sends its own copies
    rows = query(bus.db, "SELECT meta FROM messages WHERE producer_id = 'victim4'"
                         " ORDER BY producer_seq")
    metas = [msgpack.unpackb(meta) for (meta,) in rows]
    assert len(metas) == 4
    assert all(m["headers"] == {"approved-by": "alice"} and m["content_type"] ==
               "application/json" and m["time_ns"] > 1 and "approved" not in m for m in metas)


def test_a_session_opened_by_another_process_fences_the_victim_without_curve(bus: Bus) -> None:
    """With CURVE off anyone may open a producer id; what it cannot do is send
    in the victim's session: it takes a new one, and the victim learns that it
    is fenced (from producer_status, asked when an unauthenticated notification
    says so) instead of having its messages mixed with the other's."""
    from bus.client import ProducerFenced
    with Publisher(bus.config(), producer_id="victim5") as victim:
        victim.publish("v5.t", b"mine", wait=True, timeout=10)
        with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=3000) as control:
            taken = control.request("producer_open", {"producer": "victim5"})
        assert taken["epoch"] == victim.epoch + 1
        with pytest.raises(ProducerFenced):
            victim.publish("v5.t", b"after", wait=True, timeout=10)
    assert payloads(bus, "victim5") == [b"mine"]



DOC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()


def test_the_documented_reporting_grant_reads_no_session_key(make_bus, pg_server) -> None:
    """Item 5: session keys sat in `producers.session_key`, which a reporting
    role granted SELECT reads: enough to forge in any producer's name. With
    docs/protocol.md's grant a role reads every table but producer_keys, and
    the reader process works under it."""
    import re
    import uuid

    import psycopg
    bus = make_bus(BUS_DB=pg_server.create_database()).start()
    with Publisher(bus.config(), producer_id="rep") as pub:
        pub.publish("rep.t", b"x", wait=True, timeout=10)
    grant = re.search(r"```sql\n(GRANT SELECT ON .*? TO reporting;)\n```", DOC, re.S)
    assert grant, "docs/protocol.md gives the reporting grant"
    role = f"reporting_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(bus["BUS_DB"], autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(grant.group(1).replace("TO reporting", f"TO {role}"))
    url = bus["BUS_DB"].replace(f"//{pg_server.user}@", f"//{role}@")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM producers").fetchone() == (1,)
        columns = [row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'producers'")]
        assert columns and not any("key" in column for column in columns)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT session_key FROM producer_keys")
    # The bus's reader needs no more than the grant.
    from tests.conftest import BUS_CLI, free_port
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    reader = bus.spawn([BUS_CLI, "reader"], env={"BUS_DB": url, "BUS_READ_ENDPOINT": endpoint})
    try:
        from bus.client import HistoryClient
        from bus.config import with_overrides
        with HistoryClient(with_overrides(bus.config(), read_endpoint=endpoint)) as history:
            assert [m.payload for m in history.messages(["rep."])] == [b"x"]
    finally:
        reader.stop()


def test_an_older_database_moves_its_session_keys_out_of_producers(make_bus) -> None:
    """Schema 8 kept the keys in producers.session_key: the migration moves
    them to producer_keys and drops the column."""
    import apsw
    bus = make_bus()
    bus.start_writer()
    assert bus.writer.stop() == 0
    conn = apsw.Connection(str(bus.db))
    conn.execute("DROP TABLE producer_keys")
    conn.execute("ALTER TABLE producers ADD COLUMN session_key BLOB")
    conn.execute("INSERT INTO producers (producer_id, contiguous_seq, max_seq, gaps, abandoned,"
                 " duplicates, first_seen_ns, last_seen_ns, epoch, session_key)"
                 " VALUES ('old', 3, 3, 0, 0, 0, 1, 1, 2, x'0102')")
    conn.execute("UPDATE bus_meta SET value = '8' WHERE key = 'schema_version'")
    conn.close()
    migrated = bus.cli("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert query(bus.db, "SELECT producer_id, epoch, session_key FROM producer_keys") == \
        [("old", 2, b"\x01\x02")]
    assert "session_key" not in [row[1] for row in query(bus.db,
                                                         "PRAGMA table_info(producers)")]


# --- from the hostile review of the change ------------------------------------


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def test_a_huge_meta_on_a_refused_message_costs_the_writer_nothing(bus: Bus) -> None:
    """A refused message (too large, a 4th frame) had its meta unpacked whole
    to find a session to nack: a 15 MiB meta of empty maps took the writer's
    thread 3 s and 1.3 GB, past its unit's MemoryMax. Now a refused message's
    meta over the message limit is not read, nor more of it than a session's
    few maps and arrays."""
    bomb = msgpack.packb({"producer": "v", "epoch": 1, "x": [{}] * (15 << 20)})
    many = msgpack.packb({"producer": "v", "epoch": 1, "seq": 1, "x": [{}] * (900 << 10)})
    with RawProducer(bus, "bomber", session=False) as raw:
        raw.send_frames([b"bomb.t", b"p", bomb], [b"bomb.t", b"p", bomb, b"4th"],
                        [b"bomb.t\xff", b"p", many], [b"bomb.after", b"ok"])
    bus.wait_count(1, "bomb.after")
    assert vm_kib(bus.writer.pid, "VmHWM") < 400 << 10, "the writer's peak stays in its limit"
    rejected = wait_for(lambda: (r := bus.writer_stats()["ingest"]["rejected"]) and
                        sum(r.values()) >= 3 and r, message="the three counted")
    assert rejected == {"message_too_large": 1, "too_many_frames": 1, "topic_not_utf8": 1}
    assert bus.writer_stats()["ingest"]["nacked"] == {}, "none attributed to a session"


def test_a_captured_message_with_a_frame_added_gets_no_seq_refused(bus: Bus) -> None:
    """The mac covers three frames, not their count: a copy of a lost message
    with a 4th frame was refused (too_many_frames) in the victim's name, its
    seq decided and a signed nack sent: the victim's flush raised
    MessageRefused and nothing was stored. Now only a message of exactly the
    frames its mac covers is attributed; this one is dropped unattributed."""
    lost: list[tuple[bytes, bytes, bytes]] = []
    with Publisher(bus.config(), producer_id="victim6") as victim:
        sent = victim._send
        victim._send = lost.append
        for i in range(3):
            victim.publish("v6.t", b"order-%d" % i)
        victim._send = sent
        with RawProducer(bus, "mallory", session=False) as forger:
            forger.send_frames(*([*frames, b""] for frames in lost))
        wait_for(lambda: bus.writer_stats()["ingest"]["rejected"].get("too_many_frames") == 3,
                 message="the 4-frame copies refused")
        victim.flush(timeout=15)
    assert payloads(bus, "victim6") == [b"order-0", b"order-1", b"order-2"]
    assert bus.writer_stats()["ingest"]["nacked"] == {}


def test_a_producer_named_without_a_whole_session_is_refused(bus: Bus) -> None:
    """With an epoch but no seq (or a seq but no epoch) a message naming a
    producer skipped both the session check and the mac, and was stored in
    that producer's name."""
    with Publisher(bus.config(), producer_id="victim7") as victim:
        victim.publish("v7.t", b"mine", wait=True, timeout=10)
        with RawProducer(bus, "forger7", session=False) as forger:
            forger.send_frames(
                [b"v7.t", b"forged", msgpack.packb({"producer": "victim7",
                                                    "epoch": victim.epoch})],
                [b"v7.t", b"forged", msgpack.packb({"producer": "victim7", "seq": 2,
                                                    "headers": {"approved-by": "ceo"}})],
                [b"v7.after", b"anonymous"])
        bus.wait_count(1, "v7.after")
    rejected = wait_for(lambda: bus.writer_stats()["ingest"]["rejected"].get(
        protocol.SESSION_REQUIRED) == 2, message="both refused")
    assert rejected
    assert payloads(bus, "victim7") == [b"mine"]


def test_a_new_sqlite_database_is_the_bus_users_alone(bus: Bus) -> None:
    """Created 0644 before (whatever the umask allowed): any local user read
    producer_keys, the live session keys, from the file or its -wal."""
    with Publisher(bus.config(), producer_id="mode") as pub:
        pub.publish("mode.t", b"x", wait=True, timeout=10)
    for path in (bus.db, Path(f"{bus.db}-wal")):
        assert os.stat(path).st_mode & 0o077 == 0, oct(os.stat(path).st_mode)


def test_a_notify_squatter_cannot_bloat_or_hold_a_publisher(bus: Bus) -> None:
    """16 MiB acknowledgements of a million empty maps, sent by whatever bound
    the notify endpoint while the writer is down: the publisher decoded each
    before checking anything (1.7 GB, read_acks held for the squatter's whole
    run). Now libzmq drops a frame over 64 KiB and a notification is decoded
    with a container budget."""
    with Publisher(bus.config(), producer_id="victim8") as victim:
        victim.publish("v8.t", b"first", wait=True, timeout=10)
        before = vm_kib(os.getpid(), "VmRSS")
        bus.writer.kill()
        squatter = forged_acks(bus["BUS_NOTIFY_ENDPOINT"], bus["BUS_CAPTURE_ENDPOINT"],
                               "victim8", victim.epoch, seconds=30, bombs=True)
        try:
            assert squatter.wait_bound() == "bound"
            victim.publish("v8.t", b"second")
            with pytest.raises(BusTimeout):
                victim.flush(timeout=4)
            grown = vm_kib(os.getpid(), "VmRSS") - before
            assert grown < 200 << 10, f"the publisher's process grew {grown} KiB"
        finally:
            squatter.stop()
        bus.start_writer()
        victim.flush(timeout=40)
    assert payloads(bus, "victim8") == [b"first", b"second"]


def test_a_producer_removed_still_gets_the_acknowledgement_of_what_was_committed(
        make_bus) -> None:
    """producer_remove commits what the writer holds, then the next epoch's
    acknowledgement replaced the committed session's in the same pass: its
    publisher never learned that its messages were stored."""
    bus = make_bus(BATCH_FLUSH_INTERVAL_MS=5000, BATCH_SIZE=10_000,
                   **HOLD_ROWS).start()
    with Publisher(bus.config(), producer_id="removed") as pub:
        for i in range(300):
            pub.publish("rm.t", b"%d" % i)
        wait_for(lambda: bus.writer_stats()["backlog"]["rows"] >= 300,
                 message="the 300 buffered at the writer")
        bus.request("BUS_CONTROL_ENDPOINT", "producer_remove", {"producer": "removed"})
        wait_for(lambda: pub.read_acks() == pub.last_seq,
                 message="the removed session's acknowledgement")
    assert len(payloads(bus, "removed")) == 300


def test_a_keys_request_rate_counts_its_bytes_before_they_are_decoded(
        make_bus, mallory_keys: Path) -> None:
    """Decoding is what a request costs the writer (a 4 MiB ping of small
    integers: 85 ms): at 12 such requests a second, about 1% of the request
    rate, another key's acknowledged publishing fell 20-fold. A request over
    4 KiB now draws one request a KiB from its key's bucket, before it is
    decoded; admins' keys (the anchor worker's records) are not counted."""
    from bus.client import BusError
    bus = make_bus(BUS_CURVE_DIR=mallory_keys / "curve",
                   BUS_CURVE_KEY=mallory_keys / "clients" / "admin1.key_secret").start()
    big = {"x": list(range(100_000))}  # about 300 KiB: 300 of the 1000 a second
    outcomes = []
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=5000, curve=security.client_keys(
            as_client(bus, mallory_keys, "pub1"))) as client:
        for _ in range(8):
            try:
                client.request("ping", big)
                outcomes.append("ok")
            except BusError as exc:
                outcomes.append(exc.code)
    assert outcomes.count(protocol.QUOTA_EXCEEDED) >= 4, outcomes
    assert bus.writer_stats()["quotas"]["refused"] == {
        "requests_per_key_s": outcomes.count(protocol.QUOTA_EXCEEDED)}
    with ControlClient(bus["BUS_CONTROL_ENDPOINT"], timeout_ms=5000, curve=security.client_keys(
            as_client(bus, mallory_keys, "admin1"))) as admin:
        assert all(admin.request("ping", big) == "pong" for _ in range(8))


def test_an_ipc_capture_is_guarded_by_its_file_without_curve_too(make_bus,
                                                                  tmp_path: Path) -> None:
    """Without CURVE the capture's socket file took the umask's mode and a
    directory any user could write was accepted: another user could put a
    socket of its own at the path before the writer, and the proxy would send
    it every message."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused = make_bus(BUS_CAPTURE_ENDPOINT=f"ipc://{shared}/capture.sock")
    writer = refused.run("writer")
    assert writer.wait() == 1
    assert any("writable by other users" in line for line in writer.stderr.collect())
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    bus = make_bus(BUS_CAPTURE_ENDPOINT=f"ipc://{private}/capture.sock").start()
    assert os.stat(private / "capture.sock").st_mode & 0o777 == 0o600
    with Publisher(bus.config(), producer_id="ipc") as pub:
        pub.publish("ipc.t", b"x", wait=True, timeout=10)


def test_revoking_a_key_removes_its_copies_under_other_names(mallory_keys: Path) -> None:
    """The lists admit a key, not a file name: `keys revoke NAME` removed
    NAME.key only, and the same public key copied as another name stayed in."""
    import shutil
    import subprocess

    from tests.conftest import BUS_CLI
    curve = mallory_keys / "curve"
    shutil.copy(curve / "publishers" / "mallory.key", curve / "publishers" / "m2.key")
    shutil.copy(curve / "readers" / "mallory.key", curve / "readers" / "alias.key")
    done = subprocess.run([BUS_CLI, "keys", "revoke", str(curve), "mallory"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "the same key as mallory.key" in done.stdout
    left = {(key.role, key.name) for key in security.listed_keys(curve)}
    assert left == {("publishers", "pub1"), ("readers", "reader1"), ("admins", "admin1")}


def test_the_id_of_a_request_refused_undecoded_is_read_only_if_it_is_one() -> None:
    """A request refused before decoding (its bytes over the key's rate) is
    answered with its id, read from the top map: an id of a million empty maps
    was built whole, the cost the refusal was there to avoid."""
    import msgpack as mp
    assert protocol.request_id_of([protocol.encode_request("r-1", "ping", {"x": [1] * 10})]) \
        == "r-1"
    assert protocol.request_id_of([mp.packb({"cmd": "ping", "args": {"x": [{}] * 10},
                                             "id": 7})]) == 7
    assert protocol.request_id_of([mp.packb({"id": [{}] * 1_000_000, "cmd": "ping"})]) is None
    assert protocol.request_id_of([mp.packb({"id": "x" * 2_000_000})]) is None
    assert protocol.request_id_of([b"\xc1", b""]) is None
