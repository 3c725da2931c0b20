"""The storage seam: `bus-cli db copy` from SQLite to PostgreSQL (verified,
resumable, and a bus that goes on where the copy left it), `bus-cli db
migrate` on an older database, on both engines."""

from __future__ import annotations

import json
from typing import Any

import apsw
import pytest

from anchor.reservations import UtxoClient
from bus.client import Publisher, Subscriber
from storage.schema import SCHEMA_VERSION
from tests.conftest import Bus, execute, query
from tests.test_hostile import publish_acked


def txid(n: int) -> str:
    return f"{n:064x}"


def fill(bus: Bus) -> None:
    """Messages of three producers, a durable consumer's position, UTXOs with
    a reservation and a wallet tip: every table the copy carries."""
    for producer, topic, n in (("copy-a", "orders.new", 700), ("copy-b", "trades.x", 450),
                               ("copy-c", "orders.cancel", 3)):
        publish_acked(bus, producer, topic, n)
    bus.request("BUS_CONTROL_ENDPOINT", "consumer_ack", {"consumer": "audit", "last_id": 600})
    with UtxoClient(bus["BUS_CONTROL_ENDPOINT"]) as client:
        client.upsert([{"txid": txid(i), "vout": 0, "amount_sat": 10_000 + i, "block_height": 90}
                       for i in range(1, 6)])
        client.set_tip(100, "ab" * 32)
        client.reserve(10_000, 600)
    bus.request("BUS_CONTROL_ENDPOINT", "flush")


def sequences(db: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in query(db, "SELECT producer_id, count(*), min(producer_seq),"
                                        " max(producer_seq) FROM messages GROUP BY producer_id"
                                        " ORDER BY producer_id")]


def test_db_copy_from_sqlite_to_postgresql_is_verified_resumable_and_goes_on(
        make_bus, pg_server, tmp_path) -> None:
    source = make_bus(BUS_DB=str(tmp_path / "source.db")).start()
    fill(source)
    assert source.stop() == (0, 0)
    url = pg_server.create_database()
    copied = source.cli("db", "copy", "--from", f"sqlite:///{source.db}", "--to", url,
                        "--chunk-rows", "200", timeout=120)
    assert copied.returncode == 0, copied.stderr
    assert "copied 1,153 messages" in copied.stdout and "3 producers" in copied.stdout
    assert sequences(url) == sequences(source.db) == [("copy-a", 700, 1, 700),
                                                      ("copy-b", 450, 1, 450),
                                                      ("copy-c", 3, 1, 3)]
    for table in ("consumers", "utxos", "producers", "utxo_requests"):
        assert query(url, f"SELECT count(*) FROM {table}") == \
            query(source.db, f"SELECT count(*) FROM {table}"), table

    # More messages in the source, then the same command: it goes on after the
    # last message the destination has (nothing is copied twice).
    source.start()
    publish_acked(source, "copy-a", "orders.new", 50)
    assert source.stop() == (0, 0)
    again = source.cli("db", "copy", "--from", source.db, "--to", url, timeout=120)
    assert again.returncode == 0, again.stderr
    assert sequences(url) == sequences(source.db)
    assert query(url, "SELECT count(*), max(id) FROM messages") == [(1203, 1203)]

    # A bus on the copy: ids, producer sequences and consumer positions go on.
    moved = make_bus(BUS_DB=url).start()
    publish_acked(moved, "copy-a", "orders.new", 1)
    assert query(url, "SELECT max(id), max(producer_seq) FROM messages WHERE producer_id ="
                      " 'copy-a'") == [(1204, 751)]
    with Subscriber(["orders."], moved.config(), durable="audit") as sub:
        first = sub.receive(timeout=10)
    assert first is not None and first.id == 601, "the durable consumer resumes after 600"
    utxos = moved.cli("utxo", "stats", "--json")
    assert json.loads(utxos.stdout)["writer"] is not None
    assert query(url, "SELECT count(*) FROM utxos WHERE status = 1") == [(1,)]
    assert moved.stop() == (0, 0)

    # A destination that went its own way is refused; one that lost a message
    # is found out by the verification, not silently accepted.
    diverged = source.cli("db", "copy", "--from", source.db, "--to", url, timeout=120)
    assert diverged.returncode == 1 and "beyond the source's last" in diverged.stderr
    other = pg_server.create_database()
    assert source.cli("db", "copy", "--from", source.db, "--to", other,
                      timeout=120).returncode == 0
    execute(other, "DELETE FROM messages WHERE id = 10")
    wrong = source.cli("db", "copy", "--from", source.db, "--to", other, timeout=120)
    assert wrong.returncode == 1 and "messages: source has 1203" in wrong.stderr, wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_db_copy_refuses_what_it_cannot_do_in_one_line(make_bus, pg_server, tmp_path) -> None:
    other = make_bus(BUS_DB=str(tmp_path / "other.db")).start()
    publish_acked(other, "p", "t.x", 5)
    assert other.stop() == (0, 0)
    bus = make_bus(BUS_DB=str(tmp_path / "a.db")).start()
    busy = bus.cli("db", "copy", "--from", other.db, "--to", bus.db)  # its writer holds it
    assert busy.returncode == 1 and "open in another bus writer" in busy.stderr, busy.stderr
    same = bus.cli("db", "copy", "--from", bus.db, "--to", f"sqlite:///{bus.db}")
    assert same.returncode == 2 and "the same database" in same.stderr
    empty = pg_server.create_database()  # no bus has written it: no schema
    missing = bus.cli("db", "copy", "--from", empty, "--to", str(tmp_path / "c.db"))
    assert missing.returncode == 1 and "holds no bus database" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("db_engine", ["sqlite", "postgresql"], indirect=True)
def test_db_migrate_brings_an_older_schema_up_and_says_so(make_bus, db_engine) -> None:
    bus = make_bus()
    bus.start_writer()
    assert bus.writer.stop() == 0
    # Schema 5 had no consumer owners (added in 6).
    if db_engine == "sqlite":
        conn = apsw.Connection(bus.db)
        conn.execute("ALTER TABLE consumers DROP COLUMN owner")
        conn.close()
    else:
        execute(bus.db, "ALTER TABLE consumers DROP COLUMN owner")
    execute(bus.db, "UPDATE bus_meta SET value = '5' WHERE key = 'schema_version'")
    migrated = bus.cli("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert f"schema 5 -> {SCHEMA_VERSION}" in migrated.stdout
    assert query(bus.db, "SELECT owner FROM consumers") == []  # the column is back
    again = bus.cli("db", "migrate")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    bus.start_writer()
    refused = bus.cli("db", "migrate")
    assert refused.returncode == 1 and "open in another bus writer" in refused.stderr


def test_a_lost_postgresql_session_ends_the_writer_and_costs_nothing_acknowledged(
        make_bus, pg_server) -> None:
    """The writer's session is killed (a failover, an admin, a restarted
    server): its lock went with it, so the writer exits (75) instead of taking
    it again on another session, which stored a batch twice when only the
    commit's reply was lost. Restarted as its unit would, it goes on: nothing
    acknowledged is lost, nothing stored twice."""
    bus = make_bus(BUS_DB=pg_server.create_database(), BUS_SQLITE_BUSY_TIMEOUT_MS=200).start()
    publish_acked(bus, "lost", "lost.t", 100)
    killed = query(bus.db, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                           " application_name = 'bus-writer' AND datname = current_database()")
    assert killed == [(True,)]
    assert bus.writer.wait(15) == 75
    assert query(bus.db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]
    bus.start_writer()
    publish_acked(bus, "lost", "lost.t", 100)  # acknowledged only once stored
    assert query(bus.db, "SELECT count(*), count(DISTINCT producer_seq) FROM messages") == \
        [(200, 200)]
    assert bus.stop() == (0, 0)


def test_the_documented_advisory_lock_is_the_one_the_writer_takes() -> None:
    from pathlib import Path

    from storage import postgres
    protocol_md = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    assert f"pg_try_advisory_lock({postgres.WRITER_LOCK_KEY})" in protocol_md


def test_db_copy_refuses_another_buss_database_and_a_live_source(make_bus, tmp_path) -> None:
    """It appended one bus's messages to another's and said "verified"; with
    the source's writer running, its producer ledger ran ahead of the copy."""
    staging = make_bus(BUS_DB=str(tmp_path / "staging.db")).start()
    publish_acked(staging, "P", "staging.junk", 3)
    assert staging.stop() == (0, 0)
    real = make_bus(BUS_DB=str(tmp_path / "real.db")).start()
    publish_acked(real, "P", "orders.real", 5)
    live = real.cli("db", "copy", "--from", real.db, "--to", str(tmp_path / "new.db"))
    assert live.returncode == 1 and "a bus writer is running" in live.stderr, live.stderr
    assert real.stop() == (0, 0)
    mixed = real.cli("db", "copy", "--from", real.db, "--to", staging.db)
    assert mixed.returncode == 1 and "another bus's database" in mixed.stderr, mixed.stderr
    assert query(staging.db, "SELECT count(*) FROM messages") == [(3,)], "left as it was"
    execute(staging.db, "UPDATE bus_meta SET value = 'abc' WHERE key = 'schema_version'")
    for args in (["db", "migrate", "--db", staging.db],
                 ["db", "copy", "--from", staging.db, "--to", str(tmp_path / "x.db")]):
        garbage = real.cli(*args)
        assert garbage.returncode == 1 and "not a number" in garbage.stderr, garbage.stderr
        assert "Traceback" not in garbage.stderr
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    junk = real.cli("db", "copy", "--from", str(tmp_path / "notes.txt"), "--to",
                    str(tmp_path / "y.db"))
    assert junk.returncode == 1 and "Traceback" not in junk.stderr, junk.stderr


def test_a_postgresql_server_refusing_connections_for_a_while_costs_nothing(
        make_bus, pg_server) -> None:
    """The server ends the writer's session and refuses new ones for a while
    (a restart, a failover): the writer exits (75), a restart meanwhile is
    refused in one line (exit 1: its unit tries again), and once the server
    accepts, the restarted writer stores everything its publisher sent."""
    url = pg_server.create_database()
    database = url.rpartition("/")[2]
    bus = make_bus(BUS_DB=url).start()
    publish_acked(bus, "down", "down.t", 50)
    admin = pg_server.url()
    with Publisher(bus.config(), producer_id="down-2") as pub:  # its session is committed
        execute(admin, f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
        execute(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                       f" datname = '{database}' AND application_name = 'bus-writer'")
        for i in range(50):
            pub.publish("down.t", b"%d" % i)
        assert bus.writer.wait(15) == 75
        refused = bus.run("writer")
        assert refused.wait(30) == 1
        [line] = [e for e in refused.log_events() if e["level"] == "error"]
        assert line["event"] == "cannot_start" and "cannot connect" in line["error"]
        execute(admin, f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
        bus.start_writer()
        pub.flush(timeout=30)
    assert query(url, "SELECT count(*) FROM messages") == [(100,)]
    assert bus.stop() == (0, 0)


SECRET = "Sekr1tZ"


@pytest.mark.parametrize("spelling", [
    f"?pass%77ord={SECRET}",  # libpq percent-decodes the key: its password
    f"?sslpassword={SECRET}",
    f"?password={SECRET}1&password={SECRET}2",  # libpq takes the last
    f"@USERINFO:{SECRET}%40x%3Ay%25z",  # '@', ':' and '%' encoded in the user info
])
def test_a_database_urls_password_is_shown_nowhere(make_bus, pg_server, spelling) -> None:
    """A password libpq reads in BUS_DB, however it is written, is in no log
    line, no stats answer, and not in `bus-cli config` or `db migrate`: each
    shows the URL as libpq reads it, the password as ***."""
    url = pg_server.create_database()
    if spelling.startswith("@USERINFO:"):
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://{rest.replace('@', ':' + spelling.partition(':')[2] + '@', 1)}"
    else:
        url += spelling
    bus = make_bus(BUS_DB=url)
    bus.start_writer()
    bus.start_reader()
    shown = {"writer stats": json.dumps(bus.writer_stats()),
             "reader stats": json.dumps(bus.request("BUS_READ_ENDPOINT", "stats"))}
    for args in (("config",), ("config", "--json"), ("db", "migrate")):
        done = bus.cli(*args)
        shown[" ".join(args)] = done.stdout + done.stderr
    assert bus.stop() == (0, 0)
    started = next(e for e in bus.writer.log_events() if e["event"] == "started")
    assert started["db"].startswith("postgresql://bus") and "***" in started["db"], started
    shown.update(writer_log="\n".join(bus.writer.stderr.collect()),
                 reader_log="\n".join(bus.reader.stderr.collect()))
    assert {where: SECRET in text for where, text in shown.items()} == \
        dict.fromkeys(shown, False), shown


@pytest.mark.parametrize("spelling", [
    f"?password=%zz{SECRET}",  # libpq's parse error quotes the value
    f"?password={SECRET}&bogus=1",
])
def test_a_database_url_libpq_cannot_read_is_refused_without_its_password(
        make_bus, pg_server, tmp_path, spelling) -> None:
    url = pg_server.create_database() + spelling
    bus = make_bus(BUS_DB=url)
    writer = bus.run("writer")
    assert writer.wait() == 1
    refused = [e for e in writer.log_events() if e["event"] == "cannot_start"]
    assert refused and "percent-encode" in refused[0]["error"], writer.stderr.collect()
    copy = bus.cli("db", "copy", "--from", url, "--to", str(tmp_path / "copy.db"))
    assert copy.returncode == 2 and "percent-encode" in copy.stderr, copy.stderr
    shown = "\n".join(writer.stderr.collect()) + copy.stderr + bus.cli("config").stdout
    assert SECRET not in shown, shown
