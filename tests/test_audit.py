"""The tamper-evident message log, end to end with the real processes: the
anchor worker seals the stored messages of BUS_AUDIT_PREFIXES, anchors the
seal's root, and `bus-cli audit verify` names the first message altered,
deleted or inserted behind the bus's back; `bus-cli audit proof` proves one
message, checked by `bus-cli anchor verify`. On both engines."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import Bus, execute, query, wait_for
from tests.test_anchor import bus_for, start_worker
from tests.test_hostile import publish_acked


def sealed(bus: Bus) -> int:
    return query(bus.db, "SELECT coalesce(sum(size), 0) FROM audit_seals"
                         " WHERE status = 'sealed'")[0][0]


def anchored_seals(bus: Bus) -> int:
    return query(bus.db, "SELECT count(*) FROM audit_seals s JOIN anchor_documents d"
                         " ON d.doc_hash = s.root JOIN anchors a ON a.id = d.anchor_id"
                         " WHERE a.status = 'confirmed'")[0][0]


def seals(bus: Bus) -> int:
    """Non-empty seals (the ones anchored)."""
    return query(bus.db, "SELECT count(*) FROM audit_seals WHERE status = 'sealed'"
                         " AND size > 0")[0][0]


def broadcast(bus: Bus) -> None:
    """Every seal's root in an anchor, and every anchor sent."""
    wait_for(lambda: query(bus.db, "SELECT count(*) FROM audit_seals s JOIN anchor_documents d"
                                   " ON d.doc_hash = s.root")[0][0] == seals(bus)
             and not query(bus.db, "SELECT count(*) FROM anchors WHERE status = 'signed'")[0][0],
             message="the seals anchored and broadcast")


def ids_of(bus: Bus, prefix: str) -> list[int]:
    return [row[0] for row in query(bus.db, "SELECT id FROM messages WHERE substr(topic, 1, ?)"
                                            " = ? ORDER BY id", (len(prefix), prefix))]


def verify(bus: Bus) -> Any:
    return bus.cli("audit", "verify", timeout=60)


def test_seals_name_the_first_message_altered_deleted_or_inserted(make_bus, node,
                                                                 tmp_path) -> None:
    node.fund([500_000])
    bus = bus_for(make_bus, node, BUS_AUDIT_PREFIXES="orders.,trades.",
                  BUS_AUDIT_INTERVAL_S=0.5)
    publish_acked(bus, "desk-1", "orders.new", 30)
    publish_acked(bus, "feed", "prices.tick", 10)        # not sealed
    publish_acked(bus, "desk-2", "trades.done", 5)
    start_worker(bus)
    wait_for(lambda: sealed(bus) == 35, message="35 messages sealed")
    broadcast(bus)
    node.mine(2)
    wait_for(lambda: anchored_seals(bus) == seals(bus), message="the seals' anchors confirmed")
    ok = verify(bus)
    assert ok.returncode == 0, ok.stderr
    assert "OK: seal" in ok.stdout and "confirmed in block" in ok.stdout
    assert "35 sealed messages checked" in ok.stdout and ok.stdout.endswith("nothing changed\n")

    orders, prices = ids_of(bus, "orders."), ids_of(bus, "prices.")
    target = orders[17]
    # One message's proof, checked by anchor verify with the node.
    out = bus.cli("audit", "proof", str(target))
    assert out.returncode == 0, out.stderr
    proof_file = tmp_path / "proof.json"
    proof_file.write_text(out.stdout)
    checked = bus.cli("anchor", "verify", str(proof_file), "--node")
    assert checked.returncode == 0, checked.stderr
    assert f"OK: message {target:,} (orders.new) has digest" in checked.stdout
    assert "OK: bitcoind holds it in block" in checked.stdout

    # Altered: a payload edited in place.
    [(payload,)] = query(bus.db, "SELECT payload FROM messages WHERE id = ?", (target,))
    execute(bus.db, "UPDATE messages SET payload = ? WHERE id = ?", (b"999", target))
    altered = verify(bus)
    assert altered.returncode == 1
    assert f"the first change is message {target:,} (orders.new), altered" in altered.stderr
    assert "CHANGED: seal" in altered.stdout
    refused = bus.cli("audit", "proof", str(target))
    assert refused.returncode == 1 and "altered after sealing" in refused.stderr
    tampered = json.loads(proof_file.read_text())
    tampered["message"]["payload"] = b"999".hex()
    proof_file.write_text(json.dumps(tampered))
    invalid = bus.cli("anchor", "verify", str(proof_file))
    assert invalid.returncode == 1 and "not the one sealed" in invalid.stderr
    execute(bus.db, "UPDATE messages SET payload = ? WHERE id = ?", (payload, target))
    assert verify(bus).returncode == 0

    # Renumbered: a producer's sequence changed, the payload left alone.
    execute(bus.db, "UPDATE messages SET producer_seq = producer_seq + 100 WHERE id = ?",
            (orders[3],))
    assert f"message {orders[3]:,} (orders.new), altered" in verify(bus).stderr
    execute(bus.db, "UPDATE messages SET producer_seq = producer_seq - 100 WHERE id = ?",
            (orders[3],))

    # Deleted: a sealed message removed (not the oldest: not retention).
    [row] = query(bus.db, "SELECT id, topic, payload, meta, producer_id, producer_seq,"
                          " publish_ns, committed_ns FROM messages WHERE id = ?", (orders[5],))
    execute(bus.db, "DELETE FROM messages WHERE id = ?", (orders[5],))
    deleted = verify(bus)
    assert deleted.returncode == 1
    assert f"the first change is message {orders[5]:,}, deleted" in deleted.stderr
    execute(bus.db, "INSERT INTO messages (id, topic, payload, meta, producer_id, producer_seq,"
                    " publish_ns, committed_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
    assert verify(bus).returncode == 0

    # Inserted: a message of a sealed topic where the seal had none (a
    # prices.tick row replaced by an orders.new one under its id).
    moved = prices[2]
    execute(bus.db, "UPDATE messages SET topic = 'orders.new' WHERE id = ?", (moved,))
    inserted = verify(bus)
    assert inserted.returncode == 1
    assert f"the first change is message {moved:,} (orders.new), inserted" in inserted.stderr
    execute(bus.db, "UPDATE messages SET topic = 'prices.tick' WHERE id = ?", (moved,))
    assert verify(bus).returncode == 0

    # The seals themselves: a root replaced (by one recomputed over forged
    # digests, say) no longer is the one anchored; a seal removed leaves its
    # anchoring behind, and a gap in the ids.
    [(seal_id, root)] = query(bus.db, "SELECT id, root FROM audit_seals WHERE size > 0"
                                      " ORDER BY id LIMIT 1")
    execute(bus.db, "UPDATE audit_seals SET root = ? WHERE id = ?", (b"\x11" * 32, seal_id))
    forged = verify(bus)
    assert forged.returncode == 1 and "is not the one anchored as audit-seal" in forged.stdout
    execute(bus.db, "UPDATE audit_seals SET root = ? WHERE id = ?", (root, seal_id))
    execute(bus.db, "DELETE FROM audit_leaves WHERE seal_id = ?", (seal_id,))
    execute(bus.db, "DELETE FROM audit_seals WHERE id = ?", (seal_id,))
    removed = verify(bus)
    assert removed.returncode == 1
    assert f"seal {seal_id} was anchored, and is not in the database" in removed.stdout


def test_retention_keeps_unsealed_messages_and_the_seals_stay_checkable(make_bus, node) -> None:
    node.fund([500_000])
    bus = bus_for(make_bus, node, BUS_AUDIT_PREFIXES="orders.", BUS_AUDIT_INTERVAL_S=0.5,
                  BUS_RETENTION_MAX_MESSAGES=5)
    publish_acked(bus, "desk", "orders.new", 40)
    # No seal yet: retention keeps everything (the newest 5 would be kept otherwise).
    bus.request("BUS_CONTROL_ENDPOINT", "flush")
    assert query(bus.db, "SELECT count(*) FROM messages")[0][0] == 40
    start_worker(bus)
    wait_for(lambda: sealed(bus) == 40, message="40 messages sealed")
    # Sealed: retention goes on, up to the last sealed message.
    wait_for(lambda: query(bus.db, "SELECT count(*) FROM messages")[0][0] <= 5,
             message="retention after the seal")
    broadcast(bus)
    node.mine(2)
    wait_for(lambda: anchored_seals(bus) == seals(bus), message="the seals' anchors confirmed")
    out = verify(bus)
    assert out.returncode == 0, out.stderr
    assert "deleted by retention" in out.stdout and "their digests still check" in out.stdout
