"""`bus-cli purge PREFIX [--before ID|TIME]` (issue 25, item 4): the writer's
admin command deletes the stored messages of a topic prefix, a window of ids
per transaction; sealed topics and the newest message are kept; durable
consumers skip what is gone. On both engines."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bus import protocol
from bus.client import BusError, HistoryClient, Subscriber
from tests.conftest import BUS_CLI, Bus, query, wait_for
from tests.test_anchor import bus_for, start_worker
from tests.test_audit import anchored_seals, broadcast, seals
from tests.test_auth import keys  # noqa: F401  (the fixture)
from tests.test_hostile import publish_acked


def topics(bus: Bus) -> dict[str, int]:
    return dict(query(bus.db, "SELECT topic, count(*) FROM messages GROUP BY topic"))


def test_purge_deletes_a_prefix_and_leaves_other_topics(make_bus) -> None:
    bus = make_bus(BUS_RETENTION_CHUNK_ROWS=7).start()  # many windows of ids
    publish_acked(bus, "p1", "orders.new", 40)
    publish_acked(bus, "p2", "ordersx", 5)          # a prefix of its own: 'orders.' is not
    publish_acked(bus, "p3", "prices.tick", 20)
    publish_acked(bus, "p1", "orders.old", 10)
    publish_acked(bus, "p4", "zeta", 1)             # the newest message
    refused = bus.cli("purge", "orders.")             # no terminal, no --yes
    assert refused.returncode == 2 and "add --yes" in refused.stderr, refused
    assert topics(bus)["orders.new"] == 40
    out = bus.cli("purge", "orders.", "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "purged 50 messages of topics starting with 'orders.'\n"
    assert topics(bus) == {"ordersx": 5, "prices.tick": 20, "zeta": 1}
    # History reads and counts go on over the hole.
    with HistoryClient(bus.config()) as history:
        assert [m.topic for m in history.messages(["orders"])] == ["ordersx"] * 5
    again = bus.cli("purge", "orders.", "--yes", "--json")
    assert again.returncode == 0, again.stderr
    [(newest,)] = query(bus.db, "SELECT max(id) FROM messages")
    assert json.loads(again.stdout) == {"prefix": "orders.", "deleted": 0, "upto": newest - 1,
                                        "newest_kept": None}
    # The newest message is kept (its id would be handed out again), and said so.
    kept = bus.cli("purge", "zeta", "--yes")
    assert kept.returncode == 0, kept.stderr
    assert "purged 0 messages of topics starting with 'zeta' (kept the newest message" \
        in kept.stdout
    assert topics(bus)["zeta"] == 1
    # '' is every topic (but the newest); a '$' prefix names nothing stored.
    assert bus.cli("purge", "", "--yes").stdout.startswith("purged 25 messages of every topic")
    dollar = bus.cli("purge", "$bus.", "--yes")
    assert dollar.returncode == 2 and "never stored" in dollar.stderr, dollar  # usage
    publish_acked(bus, "p5", "after.purge", 3)
    assert query(bus.db, "SELECT count(*), count(DISTINCT id) FROM messages") == [(4, 4)]


def purge_answering(bus: Bus, prefix: str, answer: str) -> subprocess.CompletedProcess:
    """`bus-cli purge PREFIX` on a terminal (a pty), answering its question."""
    primary, secondary = pty.openpty()
    try:
        os.write(primary, answer.encode() + b"\n")
        return subprocess.run([BUS_CLI, "purge", prefix], env=bus.env, stdin=secondary,
                              capture_output=True, text=True, timeout=30)
    finally:
        os.close(primary)
        os.close(secondary)


def test_purge_asks_on_a_terminal(make_bus) -> None:
    bus = make_bus().start()
    publish_acked(bus, "p1", "ask.t", 3)
    publish_acked(bus, "p2", "zeta", 1)
    declined = purge_answering(bus, "ask.", "n")
    assert "Delete the stored messages of topics starting with 'ask.'?" in declined.stdout
    assert declined.returncode == 1 and "nothing purged" in declined.stderr, declined
    assert topics(bus) == {"ask.t": 3, "zeta": 1}
    accepted = purge_answering(bus, "ask.", "y")
    assert accepted.returncode == 0, accepted
    assert accepted.stdout.rstrip().endswith("purged 3 messages of topics starting with 'ask.'")
    assert topics(bus) == {"zeta": 1}


def test_purge_before_an_id_or_a_time(make_bus) -> None:
    bus = make_bus().start()
    publish_acked(bus, "p1", "log.a", 10)
    publish_acked(bus, "p2", "other", 10)
    cut_time = dt.datetime.now(dt.timezone.utc)      # after the first 20 were committed
    publish_acked(bus, "p1", "log.b", 10)
    publish_acked(bus, "p2", "other", 1)
    ids = [row[0] for row in query(bus.db, "SELECT id FROM messages WHERE substr(topic, 1, 4)"
                                           " = 'log.' ORDER BY id")]
    by_id = bus.cli("purge", "log.", "--before", str(ids[5]), "--yes", "--json")
    assert by_id.returncode == 0, by_id.stderr
    assert json.loads(by_id.stdout)["deleted"] == 5
    assert query(bus.db, "SELECT min(id) FROM messages WHERE topic = 'log.a'") == [(ids[5],)]
    by_time = bus.cli("purge", "log.", "--before", cut_time.isoformat(), "--yes")
    assert by_time.returncode == 0, by_time.stderr
    assert by_time.stdout.startswith("purged 5 messages of topics starting with 'log.', "
                                     "committed before")
    assert topics(bus) == {"log.b": 10, "other": 11}
    assert bus.cli("purge", "log.", "--before", "1h", "--yes").stdout == \
        "purged 0 messages of topics starting with 'log.', committed more than 1h ago\n"
    wrong = bus.cli("purge", "log.", "--before", "yesterday", "--yes")
    assert wrong.returncode == 2 and "--before" in wrong.stderr, wrong.stderr
    # A client pages on from where a request got (`after_id`), up to the same id.
    reply = bus.request("BUS_CONTROL_ENDPOINT", "purge",
                        {"prefix": "log.", "before_id": ids[-1], "after_id": ids[15]})
    assert reply["deleted"] == 10 - 6 - 1 and reply["more"] is False
    assert query(bus.db, "SELECT id FROM messages WHERE topic = 'log.b' ORDER BY id") == \
        [(i,) for i in ids[10:16] + ids[-1:]]


def test_a_durable_consumer_inside_the_purged_range_skips_it(make_bus) -> None:
    bus = make_bus().start()
    publish_acked(bus, "p1", "work.item", 5)
    with Subscriber(["work."], bus.config(), durable="worker", after_id=0) as sub:
        assert sub.receive(timeout=5).payload == b"0"
        sub.ack()
    publish_acked(bus, "p1", "work.item", 5)
    publish_acked(bus, "p2", "tail", 1)
    assert bus.cli("purge", "work.", "--yes").returncode == 0
    publish_acked(bus, "p3", "work.new", 2)
    with Subscriber(["work."], bus.config(), durable="worker") as sub:
        got = [sub.receive(timeout=5) for _ in range(2)]
        assert [m.topic for m in got if m] == ["work.new", "work.new"]
        assert sub.receive(timeout=0.3) is None


def test_sealed_topics_are_not_purged(make_bus) -> None:
    bus = make_bus(BUS_AUDIT_PREFIXES="orders.").start()
    publish_acked(bus, "p1", "orders.new", 5)
    publish_acked(bus, "p2", "prices.tick", 5)
    publish_acked(bus, "p3", "zeta", 1)
    for prefix in ("orders.", "orders.new", "ord", ""):
        out = bus.cli("purge", prefix, "--yes")
        assert out.returncode == 1 and "sealed" in out.stderr, (prefix, out)
        # Inside a sealed prefix no narrower one helps: the error says so.
        assert ("narrower" not in out.stderr and
                ("are sealed" in out.stderr) == prefix.startswith("orders.")), out.stderr
        with pytest.raises(BusError) as refused:
            bus.request("BUS_CONTROL_ENDPOINT", "purge", {"prefix": prefix})
        assert refused.value.code == protocol.SEALED_TOPIC
    assert bus.cli("purge", "prices.", "--yes").returncode == 0
    assert topics(bus) == {"orders.new": 5, "zeta": 1}
    # A prefix a seal of the database names counts, BUS_AUDIT_PREFIXES set or not.
    bus.request("BUS_CONTROL_ENDPOINT", "audit_begin",
                {"request_id": "s1", "prefixes": ["zeta"], "seal_version": 2,
                 "digest_version": 2})
    out = bus.cli("purge", "zet", "--yes")
    assert out.returncode == 1 and "'zeta'" in out.stderr, out


def test_a_purge_needs_an_admin_key(make_bus, keys: Path) -> None:  # noqa: F811
    bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                   BUS_REQUEST_TIMEOUT_MS=1000).start()
    publish_acked(bus, "p1", "a.x", 3)
    publish_acked(bus, "p2", "b", 1)
    for name in ("pub1", "reader1"):
        out = bus.cli("purge", "a.", "--yes", "--curve-key",
                      str(keys / "clients" / f"{name}.key_secret"))
        assert out.returncode == 1 and "forbidden" in out.stderr, (name, out)
    assert topics(bus) == {"a.x": 3, "b": 1}
    assert bus.writer_stats()["security"]["commands_forbidden"] == 2
    out = bus.cli("purge", "a.", "--yes")
    assert out.returncode == 0 and out.stdout.startswith("purged 3 messages"), out
    assert topics(bus) == {"b": 1}


def test_audit_verify_is_ok_after_a_purge_of_an_unsealed_topic(make_bus, node,
                                                                tmp_path: Path) -> None:
    node.fund([500_000])
    bus = bus_for(make_bus, node, BUS_AUDIT_PREFIXES="orders.", BUS_AUDIT_INTERVAL_S=0.5)
    publish_acked(bus, "desk", "orders.new", 20)
    publish_acked(bus, "feed", "prices.tick", 20)
    publish_acked(bus, "desk", "orders.new", 5)
    start_worker(bus)
    wait_for(lambda: query(bus.db, "SELECT coalesce(sum(size), 0) FROM audit_seals"
                                   " WHERE status = 'sealed'")[0][0] == 25,
             message="25 messages sealed")
    broadcast(bus)
    node.mine(2)
    wait_for(lambda: anchored_seals(bus) == seals(bus), message="the seals' anchors confirmed")
    out = bus.cli("purge", "prices.", "--yes")
    assert out.returncode == 0 and out.stdout.startswith("purged 20 messages"), out
    verified = bus.cli("audit", "verify", timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "25 sealed messages checked" in verified.stdout
    [(sealed_id,)] = query(bus.db, "SELECT max(id) FROM messages WHERE topic = 'orders.new'")
    proof = bus.cli("audit", "proof", str(sealed_id))
    assert proof.returncode == 0, proof.stderr
    (tmp_path / "proof.json").write_text(proof.stdout)
    checked = bus.cli("anchor", "verify", str(tmp_path / "proof.json"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_purge_says_so_when_what_answered_is_not_the_writer(make_bus) -> None:
    """An impostor bound at the writer's control endpoint (while it restarts)
    answering purge with a map of other types ended bus-cli purge in a
    traceback (TypeError, KeyError, ValueError)."""
    import msgpack
    from tests.test_operations import ImpostorControl
    bus = make_bus()
    impostor = ImpostorControl(bus["BUS_CONTROL_ENDPOINT"])

    def ok(result: Any) -> Any:
        return lambda request_id: msgpack.packb({"id": request_id, "ok": True,
                                                 "result": result})
    try:
        for result in ({"deleted": 0, "more": True, "after_id": "5", "upto": 9},
                       {"deleted": 1, "more": True, "after_id": 1, "upto": "z"},
                       {"deleted": 0, "more": False, "after_id": 0, "upto": 0,
                        "newest_kept": "\x1b[2J"},
                       {"deleted": 0},
                       {"deleted": True, "more": False, "after_id": 0, "upto": 0,
                        "newest_kept": None}):
            impostor.replies = [ok(result)] * 3
            out = bus.cli("purge", "x.", "--yes")
            assert out.returncode == 1 and "Traceback" not in out.stderr, (result, out)
            assert "not as the writer does" in out.stderr, (result, out)
            assert "\x1b" not in out.stdout + out.stderr, (result, out)
    finally:
        impostor.close()
