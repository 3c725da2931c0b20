"""The tamper-evident message log, end to end with the real processes: the
anchor worker seals the stored messages of BUS_AUDIT_PREFIXES, anchors the
seal's root, and `bus-cli audit verify` names the first message altered,
deleted or inserted behind the bus's back; `bus-cli audit proof` proves one
message, checked by `bus-cli anchor verify`. On both engines."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgpack
from click.testing import CliRunner

from cli.main import main

from proofs.audit import message_digest
from proofs.merkle import MerkleTree
from storage import retention
from tests.conftest import Bus, execute, query, wait_for
from tests.test_anchor import bus_for, start_worker
from tests.test_hostile import publish_acked


def sealed(bus: Bus) -> int:
    return query(bus.db, "SELECT coalesce(sum(size), 0) FROM audit_seals"
                         " WHERE status = 'sealed'")[0][0]


def anchored_seals(bus: Bus) -> int:
    """Seals whose anchor is confirmed (the anchor documents named audit-seal:N)."""
    return query(bus.db, "SELECT count(*) FROM anchor_documents d JOIN anchors a"
                         " ON a.id = d.anchor_id WHERE a.status = 'confirmed'"
                         " AND substr(d.ref, 1, 11) = 'audit-seal:'")[0][0]


def seals(bus: Bus) -> int:
    """Non-empty seals (the ones anchored)."""
    return query(bus.db, "SELECT count(*) FROM audit_seals WHERE status = 'sealed'"
                         " AND size > 0")[0][0]


def broadcast(bus: Bus) -> None:
    """Every seal in an anchor (the writer knows of none left to anchor), and
    every anchor sent."""
    wait_for(lambda: not bus.request("BUS_CONTROL_ENDPOINT", "audit_unanchored", {})["seals"]
             and query(bus.db, "SELECT count(*) FROM anchor_documents WHERE"
                               " substr(ref, 1, 11) = 'audit-seal:'")[0][0] == seals(bus)
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


def verify_while_retention_takes(bus: Bus, monkeypatch: Any) -> Any:
    """`bus-cli audit verify` run here, with retention taking the oldest
    message (and recording it, as the writer's does) right after verify read
    how far retention went."""
    read = retention.retained_upto

    def then_retention_takes_one(conn: Any) -> int:
        upto = read(conn)
        oldest = query(bus.db, "SELECT min(id) FROM messages")[0][0]
        execute(bus.db, "DELETE FROM messages WHERE id = ?", (oldest,))
        execute(bus.db, "UPDATE bus_meta SET value = ? WHERE key = ?",
                (str(oldest), retention.RETAINED_KEY))
        return upto

    monkeypatch.setattr(retention, "retained_upto", then_retention_takes_one)
    try:
        return CliRunner().invoke(main, ["audit", "verify"], env=bus.env)
    finally:
        monkeypatch.undo()


def test_retention_keeps_unsealed_messages_and_the_seals_stay_checkable(make_bus, node,
                                                                       monkeypatch) -> None:
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
    bus.stop()
    # Verify reads how far retention went, then the messages: in one snapshot,
    # or retention going on in between (the running writer's) makes the
    # message it took look deleted behind the bus's back.
    retained = verify_while_retention_takes(bus, monkeypatch)
    assert retained.exit_code == 0, retained.output
    # Retention recorded how far it went: the oldest message left, deleted by
    # hand, is a deletion, not retention (the bus stopped: its retention would
    # go on as the worker's events are stored).
    oldest = ids_of(bus, "orders.")[0]
    execute(bus.db, "DELETE FROM messages WHERE id = ?", (oldest,))
    deleted = verify(bus)
    assert deleted.returncode == 1, deleted.stdout
    assert f"the first change is message {oldest:,}, deleted" in deleted.stderr


def confirmed(bus: Bus, node: Any) -> None:
    """Every seal anchored, broadcast and confirmed."""
    broadcast(bus)
    node.mine(2)
    wait_for(lambda: anchored_seals(bus) == seals(bus), message="the seals' anchors confirmed")


def edited(proof: dict[str, Any], path: Any, **seal_fields: Any) -> Any:
    """The proof with some of its seal's fields changed, written to `path`."""
    changed = json.loads(json.dumps(proof))
    changed["seal"].update(seal_fields)
    path.write_text(json.dumps(changed))
    return path


def test_what_is_anchored_for_a_seal_binds_its_id_range_and_size(make_bus, node,
                                                                 tmp_path) -> None:
    """The issue's edited proof (seal 42, a tree of 8,000 where it had 5,000)
    verified: neither was committed on chain, and any size from 4,097 to
    8,192 fits the same path. Here 5 messages: sizes 5 to 8 fit leaf 2's."""
    node.fund([500_000])
    bus = bus_for(make_bus, node, BUS_AUDIT_PREFIXES="orders.", BUS_AUDIT_INTERVAL_S=0.5)
    publish_acked(bus, "feed", "prices.tick", 10)  # not sealed: the seal's ids span 15
    publish_acked(bus, "desk-1", "orders.new", 5)
    start_worker(bus)
    wait_for(lambda: sealed(bus) == 5, message="5 messages sealed")
    confirmed(bus, node)
    target = ids_of(bus, "orders.")[2]
    out = bus.cli("audit", "proof", str(target))
    assert out.returncode == 0, out.stderr
    proof = json.loads(out.stdout)
    # The edit: refused.
    forged = bus.cli("anchor", "verify", str(edited(proof, tmp_path / "f.json", tree_size=8,
                                                    seal_id=42)), "--node")
    assert forged.returncode == 1, forged.stdout
    assert proof["format"] == "bus-audit-proof/2"
    seal = proof["seal"]
    assert (seal["leaf_index"], seal["tree_size"], seal["first_id"], seal["prefixes"],
            seal["digest_version"]) == (2, 5, 1, ["orders."], 2)
    assert proof["anchor"]["document"] == seal["record"] != seal["root"]
    good = tmp_path / "proof.json"
    good.write_text(out.stdout)
    checked = bus.cli("anchor", "verify", str(good), "--node")
    assert checked.returncode == 0, checked.stderr
    assert f"leaf 2 of 5 of seal {seal['seal_id']} (ids 1..{seal['last_id']} of orders.)" \
        in checked.stdout
    assert "the anchored document" in checked.stdout and "NOT CHECKED: that it is leaf" \
        not in checked.stdout

    # Every field a proof prints of its seal is bound: each edit is refused.
    for fields in ({"tree_size": 8, "seal_id": 42}, {"tree_size": 8}, {"seal_id": 42},
                   {"last_id": seal["last_id"] + 1}, {"prefixes": ["orders.", "trades."]},
                   {"first_id": 0}):
        refused = bus.cli("anchor", "verify", str(edited(proof, tmp_path / "e.json", **fields)))
        assert refused.returncode == 1, (fields, refused.stdout)
        assert "INVALID: the anchor proof's document is not the seal record's hash" \
            in refused.stderr, fields
    # ... and one that contradicts its message says so before any hashing.
    outside = bus.cli("anchor", "verify", str(edited(proof, tmp_path / "o.json",
                                                     first_id=target + 1)))
    assert outside.returncode == 1 and "outside the seal's ids" in outside.stderr


def test_a_version_1_seal_still_verifies_saying_what_it_does_not_bind(make_bus, node,
                                                                    tmp_path) -> None:
    """A seal made before seal records (its root anchored bare): this test
    plays the worker of then, through the writer's commands as it sent them."""
    node.fund([500_000])
    bus = bus_for(make_bus, node)  # no BUS_AUDIT_PREFIXES: the worker does not seal
    publish_acked(bus, "desk-1", "orders.new", 5)
    rows = query(bus.db, "SELECT id, topic, payload, meta, producer_id, producer_seq FROM"
                         " messages ORDER BY id")
    digests = [message_digest(*row) for row in rows]
    root = MerkleTree(digests).root
    seal_id = bus.request("BUS_CONTROL_ENDPOINT", "audit_begin",
                          {"request_id": "old-begin", "prefixes": ["orders."]})["seal_id"]
    bus.request("BUS_CONTROL_ENDPOINT", "audit_leaves", {
        "seal_id": seal_id, "chunk": 0, "digests": b"".join(digests),
        "ids": b"".join(row[0].to_bytes(8, "big") for row in rows)})
    finished = bus.request("BUS_CONTROL_ENDPOINT", "audit_finish", {
        "request_id": "old-finish", "seal_id": seal_id, "last_id": rows[-1][0], "size": 5,
        "root": root})
    assert finished["document"] == root  # version 1: its root is what is anchored
    start_worker(bus)
    out = bus.cli("anchor", "submit", "--hash", root.hex(), "--ref", f"audit-seal:{seal_id}",
                  "--wait", "--timeout", "30")
    assert out.returncode == 0, out.stderr
    confirmed(bus, node)
    ok = verify(bus)
    assert ok.returncode == 0, ok.stderr
    assert "1 seal(s) of version 1 (their root anchored bare" in ok.stdout

    out = bus.cli("audit", "proof", str(rows[2][0]))
    assert out.returncode == 0, out.stderr
    proof = json.loads(out.stdout)
    assert proof["format"] == "bus-audit-proof/1" and proof["anchor"]["document"] == root.hex()
    checked = bus.cli("anchor", "verify", str(edited(proof, tmp_path / "p.json")), "--node")
    assert checked.returncode == 0, checked.stderr
    assert f"NOT CHECKED: that it is leaf 2 of 5 of seal {seal_id} (a seal of version 1" \
        in checked.stdout
    # The edit still verifies, and says what the chain does not vouch for.
    loose = bus.cli("anchor", "verify", str(edited(proof, tmp_path / "e.json", tree_size=8,
                                                   seal_id=42)))
    assert loose.returncode == 0, loose.stderr
    assert "NOT CHECKED: that it is leaf 2 of 8 of seal 42" in loose.stdout


def test_the_digest_covers_every_column_and_verify_names_what_changed(make_bus, node) -> None:
    """The issue's item 3: committed_ns and publish_ns changed went unseen;
    the oldest message deleted with retention off passed for retention; one
    stored digest flipped was blamed on a message nobody touched."""
    node.fund([500_000])
    bus = bus_for(make_bus, node, BUS_AUDIT_PREFIXES="orders.", BUS_AUDIT_INTERVAL_S=0.5)
    publish_acked(bus, "desk-1", "orders.new", 10)
    start_worker(bus)
    wait_for(lambda: sealed(bus) == 10, message="10 messages sealed")
    confirmed(bus, node)
    assert verify(bus).returncode == 0
    orders = ids_of(bus, "orders.")

    # The bus's clock and the publisher's, as stored: both digested.
    for column in ("committed_ns", "publish_ns"):
        execute(bus.db, f"UPDATE messages SET {column} = {column} + 1 WHERE id = ?",
                (orders[4],))
        out = verify(bus)
        assert out.returncode == 1, (column, out.stdout)
        assert f"the first change is message {orders[4]:,} (orders.new), altered" in out.stderr
        execute(bus.db, f"UPDATE messages SET {column} = {column} - 1 WHERE id = ?",
                (orders[4],))
    assert verify(bus).returncode == 0

    # The oldest message deleted, retention off (it never deleted anything).
    [row] = query(bus.db, "SELECT id, topic, payload, meta, producer_id, producer_seq,"
                          " publish_ns, committed_ns FROM messages WHERE id = ?", (orders[0],))
    execute(bus.db, "DELETE FROM messages WHERE id = ?", (orders[0],))
    deleted = verify(bus)
    assert deleted.returncode == 1, deleted.stdout
    assert f"the first change is message {orders[0]:,}, deleted" in deleted.stderr
    assert "deleted by retention" not in deleted.stdout + deleted.stderr
    execute(bus.db, "INSERT INTO messages (id, topic, payload, meta, producer_id, producer_seq,"
                    " publish_ns, committed_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
    assert verify(bus).returncode == 0

    # One stored digest flipped (leaf 2): the seal's digests changed, and the
    # message, untouched, is not blamed.
    [(seal_id, digests)] = query(bus.db, "SELECT seal_id, digests FROM audit_leaves")
    digests = bytes(digests)
    flipped = digests[:64] + bytes([digests[64] ^ 1]) + digests[65:]
    execute(bus.db, "UPDATE audit_leaves SET digests = ? WHERE seal_id = ?", (flipped, seal_id))
    out = verify(bus)
    assert out.returncode == 1, out.stdout
    assert f"the stored digest of message {orders[2]:,} (orders.new) was changed" in out.stdout
    assert f"message {orders[2]:,} (orders.new) altered" not in out.stdout
    assert "the first change is message" not in out.stderr
    assert "the seals themselves were changed" in out.stderr
    refused = bus.cli("audit", "proof", str(orders[2]))
    assert refused.returncode == 1 and "altered after sealing" not in refused.stderr


def test_a_database_from_before_the_retention_record_keeps_what_was_gone_as_retention(
        make_bus) -> None:
    """Schema 9 kept no record of retention, and verify took every message
    below the oldest stored as retention's: the upgrade keeps that reading for
    what was gone then, and no more."""
    bus = make_bus()
    bus.start()
    publish_acked(bus, "desk", "orders.new", 6)
    assert bus.writer.stop() == 0
    execute(bus.db, "DELETE FROM messages WHERE id <= 3")
    execute(bus.db, "UPDATE bus_meta SET value = '9' WHERE key = 'schema_version'")
    migrated = bus.cli("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert query(bus.db, "SELECT value FROM bus_meta WHERE key = 'retention_upto'") == [("3",)]
    execute(bus.db, "DELETE FROM messages WHERE id = 4")
    execute(bus.db, "UPDATE bus_meta SET value = '9' WHERE key = 'schema_version'")
    assert bus.cli("db", "migrate").returncode == 0  # recorded once: not moved on
    assert query(bus.db, "SELECT value FROM bus_meta WHERE key = 'retention_upto'") == [("3",)]


def verify_node(bus: Bus) -> Any:
    return bus.cli("audit", "verify", "--node", timeout=60)


def seal_txids(bus: Bus) -> dict[int, str]:
    """seal id -> the transaction of the anchor its record is in."""
    return dict(query(bus.db, "SELECT CAST(substr(d.ref, 12) AS INTEGER), a.txid FROM"
                              " anchor_documents d JOIN anchors a ON a.id = d.anchor_id"
                              " WHERE substr(d.ref, 1, 11) = 'audit-seal:'"))


def drop_seals(bus: Bus, after: int = 0) -> None:
    """The seals after seal `after` removed, with their digests."""
    execute(bus.db, "DELETE FROM audit_leaves WHERE seal_id > ?", (after,))
    execute(bus.db, "DELETE FROM audit_seals WHERE id > ?", (after,))


def drop_anchors(bus: Bus, txids: list[str]) -> None:
    """Anchor rows removed with their documents."""
    for txid in txids:
        execute(bus.db, "DELETE FROM anchor_documents WHERE anchor_id IN (SELECT id FROM"
                        " anchors WHERE txid = ?)", (txid,))
        execute(bus.db, "DELETE FROM anchors WHERE txid = ?", (txid,))


def test_the_chain_is_the_ground_truth_a_laundered_database_is_found_out(make_bus, node,
                                                                        tmp_path) -> None:
    """The issue's item 1: seal, confirm, alter a sealed message, remove the
    seals, their digests and their anchor rows, restart the worker: it seals
    the altered messages again and anchors them, and the database agrees with
    itself. Only the chain still holds what was anchored before: `audit
    verify --node` requires the database to account for every anchor
    transaction of the worker's wallet. A fee bump's replaced transaction
    carries the same root as its replacement: not a missing seal."""
    node.fund([500_000] * 4)
    bus = bus_for(make_bus, node, BUS_AUDIT_PREFIXES="orders.", BUS_AUDIT_INTERVAL_S=0.5)
    node.mine_min_fee_rate = 2.5   # seal 1's anchor is left in the mempool, then fee-bumped
    worker = start_worker(bus)
    for n in (1, 2, 3):            # three seals, each in an anchor of its own
        publish_acked(bus, f"desk-{n}", "orders.new", 10)
        wait_for(lambda: sealed(bus) == 10 * n, message=f"{10 * n} messages sealed")
        broadcast(bus)
        if n == 1:
            node.mine(2)           # BUS_ANCHOR_BUMP_AFTER_BLOCKS
            wait_for(lambda: query(bus.db, "SELECT count(*) FROM anchors WHERE replaced_txids"
                                           " IS NOT NULL AND status = 'submitted'")[0][0],
                     message="seal 1's anchor fee-bumped")
            node.mine_min_fee_rate = 0.0
    confirmed(bus, node)
    txids = seal_txids(bus)
    # The seals with messages (empty ones between), by the anchor they are in:
    # each round's, one seal or more (a seal may begin while a round is
    # being published: it takes what is stored by then).
    rounds: dict[str, list[int]] = {}
    for seal_id in sorted(txids):
        rounds.setdefault(txids[seal_id], []).append(seal_id)
    assert len(rounds) == 3, rounds
    first, second, third = (max(seals) for seals in rounds.values())
    later = [seal_id for seal_id in txids if seal_id > first]
    [(replaced,)] = query(bus.db, "SELECT replaced_txids FROM anchors WHERE txid = ?",
                          (txids[first],))
    [replaced] = msgpack.unpackb(replaced)

    plain = verify(bus)
    assert plain.returncode == 0, plain.stderr
    assert "checked the database against itself only" in plain.stdout
    clean = verify_node(bus)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert f"{len(txids)} of {len(txids)} seal(s) checked here anchored in it" in clean.stdout
    assert "CHANGED" not in clean.stdout and replaced not in clean.stdout
    assert "checked the database against itself only" not in clean.stdout
    # An anchor the database says is confirmed, which the chain does not hold.
    execute(bus.db, "INSERT INTO anchors (root, size, txid, raw_tx, fee_sat, vsize, lease_id,"
                    " utxo_txid, utxo_vout, status, broadcast_height, created_ns, block_hash,"
                    " block_height) SELECT ?, size, ?, raw_tx, fee_sat, vsize, 'forged',"
                    " utxo_txid, utxo_vout, status, broadcast_height, created_ns, block_hash,"
                    " block_height FROM anchors WHERE txid = ?",
            (b"\x11" * 32, "ab" * 32, txids[first]))
    claimed = verify_node(bus)
    assert claimed.returncode == 1, claimed.stdout
    assert f"the database says transaction {'ab' * 32} confirmed it in block" in claimed.stdout
    execute(bus.db, "DELETE FROM anchors WHERE txid = ?", ("ab" * 32,))

    orders = ids_of(bus, "orders.")
    worker.stop()
    # Seals 2 and 3 dropped with their digests, and a message of seal 2
    # altered: their anchor rows still name them, and the chain names them.
    drop_seals(bus, after=first)
    execute(bus.db, "UPDATE messages SET payload = ? WHERE id = ?", (b"forged", orders[15]))
    chain = verify_node(bus)
    assert chain.returncode == 1, chain.stdout
    for seal_id in later:
        assert f"seal {seal_id}, anchored in transaction {txids[seal_id]} (block" \
            in chain.stdout, chain.stdout
    # ... and their anchor rows dropped too: the database alone shows 20
    # messages not sealed yet, nothing changed; the chain still holds both.
    drop_anchors(bus, [txids[second], txids[third]])
    plain = verify(bus)
    assert plain.returncode == 0, plain.stderr
    assert "20 message(s) of orders. stored after the last seal" in plain.stdout
    chain = verify_node(bus)
    assert chain.returncode == 1, chain.stdout
    for seal_id in (second, third):
        assert f"transaction {txids[seal_id]} (block" in chain.stdout
    assert "which no anchor of the database has" in chain.stdout
    assert f"CHANGED: transaction {txids[first]}" not in chain.stdout
    assert "the database does not account for what the chain holds" in chain.stderr

    # Every seal, digest and anchor row dropped: "0 seals ... nothing changed".
    drop_seals(bus)
    drop_anchors(bus, list(txids.values()))
    plain = verify(bus)
    assert plain.returncode == 0 and "0 seals" in plain.stdout, plain.stderr
    chain = verify_node(bus)
    assert chain.returncode == 1, chain.stdout
    for txid in txids.values():
        assert f"transaction {txid}" in chain.stdout, txid

    # The laundering: a message of seal 1 altered too, the worker restarted. It
    # seals the altered messages and anchors them; the database agrees with
    # itself, and the altered message has a proof the chain confirms.
    execute(bus.db, "UPDATE messages SET payload = ? WHERE id = ?", (b"forged", orders[3]))
    start_worker(bus)
    wait_for(lambda: sealed(bus) == 30, message="the altered messages sealed again")
    confirmed(bus, node)
    plain = verify(bus)
    assert plain.returncode == 0, plain.stderr
    out = bus.cli("audit", "proof", str(orders[3]))
    assert out.returncode == 0, out.stderr
    laundered = tmp_path / "laundered.json"
    laundered.write_text(out.stdout)
    assert bus.cli("anchor", "verify", str(laundered), "--node").returncode == 0
    chain = verify_node(bus)
    assert chain.returncode == 1, chain.stdout
    for txid in txids.values():
        assert f"transaction {txid}" in chain.stdout, txid
    [relaundered] = set(seal_txids(bus).values())
    assert f"CHANGED: transaction {relaundered}" not in chain.stdout


def test_the_wallet_is_read_a_page_at_a_time_and_only_anchors_count(node) -> None:
    """anchor/chain.py reads the wallet with listtransactions pages (Core's:
    the newest `count` after `skip`, oldest first) of 2 entries here: every
    anchor transaction found once, a plain payment not taken for one."""
    from anchor.bitcoind import BitcoinRpc, to_btc
    from anchor.chain import wallet_anchors
    from proofs.document import op_return_payload
    from tests.bitcoind_double import OUTSIDE_ADDRESS
    node.fund([100_000] * 6)  # 5 anchors, 1 payment
    rpc = BitcoinRpc(node.url, node.user, node.password)
    roots = [bytes([n]) * 32 for n in range(5)]
    coins = [u for u in rpc.call("listunspent") if u["amount"] == Decimal("0.001")]
    for root, coin in zip(roots, coins):
        raw = rpc.call("createrawtransaction", [{"txid": coin["txid"], "vout": coin["vout"]}],
                       [{"data": op_return_payload(root, 1).hex()},
                        {rpc.call("getrawchangeaddress"): to_btc(99_000)}], 0, True)
        rpc.call("sendrawtransaction", rpc.call("signrawtransactionwithwallet", raw)["hex"])
    rpc.call("sendtoaddress", OUTSIDE_ADDRESS, to_btc(50_000))
    node.mine(1)
    found = wallet_anchors(rpc, page=2)
    rpc.close()
    assert set(found.roots) == set(roots) and found.transactions == 5
    assert found.sends == 6  # the payment was read, and is no anchor
    assert all(entry.confirmed and entry.size == 1 and len(entry.txids) == 1
               for entry in found.roots.values())
