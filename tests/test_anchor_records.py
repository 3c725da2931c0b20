"""The writer's anchor records (anchor_* commands) against the real writer
process: record-then-broadcast bookkeeping, fee bumps, failures, retries."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from proofs.merkle import MerkleTree
from anchor.reservations import UtxoClient
from bus.client import BusError
from tests.conftest import Bus, query
from tests.test_utxos import client, txid, utxo


def doc(n: int) -> bytes:
    return hashlib.sha256(b"doc %d" % n).digest()


@pytest.fixture
def writer(make_bus: Any) -> Bus:
    bus = make_bus()
    bus.start_writer()
    with client(bus) as c:
        c.upsert([utxo(1, 100_000), utxo(2, 200_000)])
        c.set_tip(100, txid("tip"))
    return bus


def record(c: UtxoClient, docs: list[bytes], tx: str, request_id: str = "rec-1",
           amount: int = 90_000) -> dict[str, Any]:
    lease = c.reserve(50_000, 60)
    tree = MerkleTree(docs)
    return c.call("anchor_record", {
        "request_id": request_id, "root": tree.root, "size": tree.size,
        "documents": [[d, None, i + 1] for i, d in enumerate(docs)], "txid": txid(tx),
        "raw_tx": b"\x02signed", "fee_sat": 300, "vsize": 150, "lease_id": lease["lease_id"],
        "change": [utxo(tx, amount, None, vout=1)], "tip_height": 100})


def test_a_record_spends_the_utxo_and_a_document_is_anchored_once(writer: Bus) -> None:
    with client(writer) as c:
        first = record(c, [doc(1), doc(2)], "a")
        assert c.call("anchor_known", {"hashes": [doc(1), doc(3)]}) == {"known": [doc(1)]}
        with pytest.raises(BusError) as err:
            record(c, [doc(2), doc(3)], "b", request_id="rec-2")
        assert err.value.code == "already_anchored"
        # A refused record leaves nothing behind: the second lease is still live.
        assert query(writer.db, "SELECT count(*) FROM anchors") == [(1,)]
        assert c.call("anchor_open", {})["anchors"][0]["status"] == "signed"
        assert c.call("anchor_leaves", {"anchor_id": first["anchor_id"]})["leaves"] == \
            [[doc(1), None, 1], [doc(2), None, 2]]
    assert query(writer.db, "SELECT status, spent_txid FROM utxos WHERE amount_sat = 100000") == \
        [(2, txid("a"))]


def test_the_replaced_transaction_mined_is_the_one_recorded(writer: Bus) -> None:
    with client(writer) as c:
        anchor = record(c, [doc(1)], "a")
        c.call("anchor_update", {"anchor_id": anchor["anchor_id"], "status": "submitted"})
        bumped = c.call("anchor_replace", {
            "request_id": "bump-1", "anchor_id": anchor["anchor_id"], "txid": txid("b"),
            "raw_tx": b"\x02bumped", "fee_sat": 600, "vsize": 150,
            "change": [utxo("b", 89_700, None, vout=1)], "tip_height": 102})
        assert bumped["replaced_txid"] == txid("a")
        # ... but the first one is mined.
        c.call("anchor_update", {"anchor_id": anchor["anchor_id"], "status": "confirmed",
                                 "txid": txid("a"), "block_hash": txid("blk"),
                                 "block_height": 103})
        assert c.call("anchor_open", {})["anchors"] == []
    assert query(writer.db, "SELECT txid, status FROM anchors") == [(txid("a"), "confirmed")]
    assert query(writer.db, "SELECT spent_txid FROM utxos WHERE amount_sat = 100000") == \
        [(txid("a"),)]
    assert query(writer.db, "SELECT count(*) FROM utxos WHERE txid = ?", (txid("b"),)) == [(0,)]


def test_a_refused_transaction_gives_back_its_documents_and_utxo(writer: Bus) -> None:
    with client(writer) as c:
        anchor = record(c, [doc(1), doc(2)], "a")
        c.call("anchor_fail", {"anchor_id": anchor["anchor_id"], "reason": "dust",
                               "inputs_spent": False})
        assert c.call("anchor_known", {"hashes": [doc(1)]}) == {"known": []}
        with pytest.raises(BusError) as err:
            c.call("anchor_fail", {"anchor_id": anchor["anchor_id"], "reason": "again"})
        assert err.value.code == "bad_request"
        # Anchored again (UTXO 1 is back). The same id with other arguments (a
        # new lease, on UTXO 2) is another request: refused, nothing changed.
        record(c, [doc(1), doc(2)], "c", request_id="rec-2")
        with pytest.raises(BusError) as err:
            record(c, [doc(1), doc(2)], "c", request_id="rec-2")
        assert err.value.code == "request_id_reused"
    assert query(writer.db, "SELECT amount_sat, status, spent_txid FROM utxos WHERE txid IN"
                 " (?, ?) ORDER BY amount_sat", (txid(1), txid(2))) == \
        [(100_000, 2, txid("c")), (200_000, 1, None)]
    assert query(writer.db, "SELECT count(*) FROM anchors WHERE status = 'signed'") == [(1,)]
    assert query(writer.db, "SELECT count(*) FROM utxos WHERE txid = ?", (txid("a"),)) == [(0,)]
    assert writer.writer_stats()["anchors"]["failed"] == 1


def test_the_writer_refuses_impossible_seals_and_anchor_states(writer: Bus) -> None:
    """From a hostile review: the writer took leaf ids out of order or outside
    the seal, chunks out of order, an empty seal with any root; and let a
    failed anchor be confirmed, or said `submitted` for an anchor it left
    `signed`."""
    def refused(cmd: str, args: dict[str, Any]) -> str:
        with pytest.raises(BusError) as err:
            c.call(cmd, args)
        return err.value.code

    ids = lambda *n: b"".join(i.to_bytes(8, "big") for i in n)  # noqa: E731
    with client(writer) as c:
        seal = c.call("audit_begin", {"request_id": "s1", "prefixes": ["orders."]})
        leaves = {"seal_id": seal["seal_id"], "digests": b"\x01" * 64}
        assert refused("audit_leaves", {**leaves, "chunk": 0, "ids": ids(3, 2)}) == "bad_request"
        assert refused("audit_leaves", {**leaves, "chunk": 0, "ids": ids(0, 2)}) == "bad_request"
        assert refused("audit_leaves", {**leaves, "chunk": 1, "ids": ids(1, 2)}) == "bad_request"
        c.call("audit_leaves", {**leaves, "chunk": 0, "ids": ids(1, 2)})
        # After a short chunk nothing may follow (chunks are full but the last).
        assert refused("audit_leaves", {**leaves, "chunk": 1, "ids": ids(3, 4)}) == "bad_request"
        assert refused("audit_finish", {"request_id": "f1", "seal_id": seal["seal_id"],
                                        "last_id": 0, "size": 0, "root": b"\x00" * 32}) \
            == "bad_request"
        first = record(c, [doc(1)], "a")
        c.call("anchor_fail", {"anchor_id": first["anchor_id"], "reason": "test"})
        assert refused("anchor_update", {"anchor_id": first["anchor_id"], "status": "confirmed",
                                         "txid": txid("a"), "block_hash": txid("b"),
                                         "block_height": 101}) == "bad_request"
        second = record(c, [doc(2)], "b", request_id="rec-2")
        assert refused("anchor_update", {"anchor_id": second["anchor_id"],
                                         "status": "unconfirmed"}) == "bad_request"
    assert query(writer.db, "SELECT status FROM anchors ORDER BY id") == [("failed",),
                                                                          ("signed",)]


def test_a_record_whose_root_is_not_its_documents_root_is_refused(writer: Bus) -> None:
    """Issue 25 (docs/protocol.md, anchor_record): the writer stored any 32
    bytes as an anchor's root. Every proof of its documents then failed
    (`proof_failed`: the leaves do not give the root) and, the hashes being
    anchored, none could be anchored again. The root must be the RFC 6962
    root of the documents in their order: otherwise bad_request, nothing
    stored, the lease still live."""
    docs = [doc(1), doc(2), doc(3)]
    with client(writer) as c:
        lease = c.reserve(50_000, 60)
        fields = {"request_id": "rec-bad", "size": 3, "txid": txid("a"), "raw_tx": b"\x02signed",
                  "fee_sat": 300, "vsize": 150, "lease_id": lease["lease_id"], "change": [],
                  "tip_height": 100, "documents": [[d, None, None] for d in docs]}
        for root in (bytes(32), MerkleTree(docs[::-1]).root, MerkleTree(docs[:2]).root):
            with pytest.raises(BusError) as err:
                c.call("anchor_record", {**fields, "root": root})
            assert err.value.code == "bad_request", err.value
            assert "root" in str(err.value)
        assert c.call("anchor_known", {"hashes": docs}) == {"known": []}
        assert query(writer.db, "SELECT count(*) FROM anchors") == [(0,)]
        recorded = c.call("anchor_record", {**fields, "request_id": "rec-good",
                                            "root": MerkleTree(docs).root})
        assert recorded["txid"] == txid("a")
