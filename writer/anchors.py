"""Anchor records: which documents each Bitcoin transaction anchors.

The anchor worker records an anchoring through the writer *before* it
broadcasts the transaction: `anchor_record` stores the anchor (its Merkle
root, the signed transaction) and its documents, and spends the leased UTXO,
in one transaction. Whatever happens after, a restarted worker finds the
transaction and broadcasts it again; it never builds a second one for the
same documents. A document hash is anchored once (`anchor_documents` is keyed
by it). A fee bump (`anchor_replace`) swaps the transaction of an anchor and
keeps the txids it replaced, so whichever of them is mined is recognised.

Each command runs in one transaction (writer/commands.py, which stores the
replies of those with a request id); the proof of a document is built by the
reader, off the write path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bus.control import CommandFailed, check_hash32, check_int, check_str, check_txid
from bus.protocol import (ALREADY_ANCHORED, ANCHOR_UNCONFIRMED, BAD_REQUEST, NOT_FOUND,
                          OPEN_ANCHOR_STATUSES, AnchorStatus)
from proofs.merkle import MerkleTree
from storage import anchors as anchor_rows
from storage import utxos as utxo_rows

MAX_DOCUMENTS = 100_000      # one anchor's documents, at most
MAX_OPEN_LISTED = 1000


def _documents(args: dict[str, Any]) -> list[tuple[bytes, str | None, int | None]]:
    items = args.get("documents")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_DOCUMENTS:
        raise CommandFailed(BAD_REQUEST, f"'documents' must be a list of 1-{MAX_DOCUMENTS}")
    docs = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 3):
            raise CommandFailed(BAD_REQUEST, "a document is [hash, ref, message_id]")
        ref, message_id = item[1], item[2]
        if ref is not None and not (isinstance(ref, str) and len(ref) <= 256
                                    and "\x00" not in ref):
            raise CommandFailed(BAD_REQUEST, "a document's ref must be a string of at most 256,"
                                             " no NUL")
        if message_id is not None and type(message_id) is not int:
            raise CommandFailed(BAD_REQUEST, "a document's message_id must be an integer")
        docs.append((check_hash32(item[0], "document hash"), ref, message_id))
    return docs


def _check_root(root: bytes, docs: list[tuple[bytes, str | None, int | None]]) -> None:
    """A record's root must be its documents' (RFC 6962, in leaf order): a
    root stored otherwise makes every proof of them fail, and its documents,
    anchored, could never be anchored again. 100,000 documents: ~0.1 s."""
    if MerkleTree([hash_ for hash_, _ref, _message_id in docs]).root != root:
        raise CommandFailed(BAD_REQUEST, "'root' is not the RFC 6962 Merkle root of "
                                         "'documents' in their order")


class AnchorBook:
    """The `anchor_*` commands over the writer's connection. `spend` spends a
    leased UTXO (UtxoBook.spend: an anchor's transaction spends the UTXO the
    worker reserved), in the same transaction as the anchor's rows."""

    def __init__(self, conn: Any,
                 spend: Callable[[dict[str, Any], int], dict[str, Any]]) -> None:
        self.conn = conn
        self.spend = spend
        self.counters = {"recorded": 0, "documents": 0, "replaced": 0, "confirmed": 0,
                         "failed": 0, "unconfirmed": 0}

    def record(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{request_id, root, size, txid, raw_tx, fee_sat, vsize, lease_id, change,
        documents: [[hash, ref, message_id]...] in leaf order, tip_height}
        -> {anchor_id, txid}: status `signed`, the leased UTXO spent."""
        root = check_hash32(args.get("root"), "root")
        docs = _documents(args)
        if check_int(args, "size", 1, MAX_DOCUMENTS) != len(docs):
            raise CommandFailed(BAD_REQUEST, "'size' must be the number of documents")
        _check_root(root, docs)
        raw_tx, fee, size, tip = self._tx_fields(args)
        hashes = [d[0] for d in docs]
        if len(set(hashes)) != len(hashes):
            raise CommandFailed(BAD_REQUEST, "a document hash appears twice")
        already = anchor_rows.known(self.conn, hashes)
        if already:
            raise CommandFailed(ALREADY_ANCHORED, f"{len(already)} of the documents are anchored "
                                                  f"already, e.g. {already[0].hex()}")
        spent = self.spend({"lease_id": args.get("lease_id"), "change": args.get("change"),
                            "spending_txid": args.get("txid")}, now_ns)
        if spent["replaced_txid"] is not None:  # rolled back by the dispatcher
            raise CommandFailed(BAD_REQUEST, "this lease already spent its UTXO in another anchor")
        anchor_id = anchor_rows.insert(self.conn, root, len(docs), args["txid"], raw_tx, fee, size,
                                       args["lease_id"], spent["txid"], spent["vout"], tip, now_ns)
        anchor_rows.insert_documents(self.conn, anchor_id, docs)
        self.counters["recorded"] += 1
        self.counters["documents"] += len(docs)
        return {"anchor_id": anchor_id, "txid": args["txid"]}

    def _tx_fields(self, args: dict[str, Any]) -> tuple[bytes, int, int, int]:
        check_txid(args.get("txid"))
        raw_tx = args.get("raw_tx")
        if not isinstance(raw_tx, bytes) or not raw_tx:
            raise CommandFailed(BAD_REQUEST, "'raw_tx' must be the signed transaction's bytes")
        return (raw_tx, check_int(args, "fee_sat", 0, 10**10), check_int(args, "vsize", 1, 10**6),
                check_int(args, "tip_height", 0, 10**9))

    def _anchor(self, args: dict[str, Any]) -> dict[str, Any]:
        anchor_id = check_int(args, "anchor_id", 1, 2**62)
        anchor = anchor_rows.get(self.conn, anchor_id)
        if anchor is None:
            raise CommandFailed(NOT_FOUND, f"no anchor {anchor_id}")
        return anchor

    def replace(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{request_id, anchor_id, txid, raw_tx, fee_sat, vsize, change, tip_height}
        -> {anchor_id, txid, replaced_txid}: a fee bump of the same input."""
        anchor = self._anchor(args)
        raw_tx, fee, size, tip = self._tx_fields(args)
        if anchor["status"] not in OPEN_ANCHOR_STATUSES:
            raise CommandFailed(BAD_REQUEST, f"anchor {anchor['anchor_id']} is {anchor['status']}")
        if fee <= anchor["fee_sat"]:
            raise CommandFailed(BAD_REQUEST, "a replacement must pay a higher fee")
        spent = self.spend({"lease_id": anchor["lease_id"], "change": args.get("change"),
                            "spending_txid": args["txid"]}, now_ns)
        anchor_rows.replace(self.conn, anchor["anchor_id"], args["txid"], raw_tx, fee, size,
                            anchor["replaced_txids"] + [anchor["txid"]], tip)
        self.counters["replaced"] += 1
        return {"anchor_id": anchor["anchor_id"], "txid": args["txid"],
                "replaced_txid": spent["replaced_txid"]}

    def update(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{anchor_id, status: submitted|confirmed|unconfirmed, txid?, block_hash?,
        block_height?}: `submitted` once broadcast, `confirmed` with the block of
        whichever of its transactions was mined (`txid`, if an earlier one; again
        with another block after a reorg), `unconfirmed` when a reorg took its
        block away (it is `submitted` again)."""
        anchor = self._anchor(args)
        status = args.get("status")
        allowed = {AnchorStatus.SUBMITTED: OPEN_ANCHOR_STATUSES,
                   ANCHOR_UNCONFIRMED: (AnchorStatus.CONFIRMED,),
                   AnchorStatus.CONFIRMED: (*OPEN_ANCHOR_STATUSES, AnchorStatus.CONFIRMED),
                   }.get(status)
        if allowed is not None and anchor["status"] not in allowed:
            raise CommandFailed(BAD_REQUEST, f"anchor {anchor['anchor_id']} is {anchor['status']}:"
                                             f" it cannot become {status}")
        if status == AnchorStatus.SUBMITTED:
            anchor_rows.mark_submitted(self.conn, anchor["anchor_id"], now_ns)
        elif status == AnchorStatus.CONFIRMED:
            txid = check_txid(args.get("txid", anchor["txid"]))
            if txid not in [anchor["txid"], *anchor["replaced_txids"]]:
                raise CommandFailed(BAD_REQUEST, f"{txid} is not a transaction of this anchor")
            if txid != anchor["txid"]:
                # A replaced transaction was mined, not the newest: the newest's
                # change never existed; the mined one's comes with the wallet sync.
                utxo_rows.drop_unspent_outputs(self.conn, anchor["txid"])
                utxo_rows.set_spender(self.conn, anchor["utxo_txid"], anchor["utxo_vout"], txid,
                                      now_ns)
            anchor_rows.mark_confirmed(self.conn, anchor["anchor_id"], txid,
                                   check_txid(args.get("block_hash"), "block_hash"),
                                   check_int(args, "block_height", 0, 10**9), now_ns)
            self.counters["confirmed"] += anchor["status"] != AnchorStatus.CONFIRMED
        elif status == ANCHOR_UNCONFIRMED:
            # A reorg took its block away: tracked (and confirmed) again.
            self.counters["unconfirmed"] += anchor_rows.mark_unconfirmed(self.conn,
                                                                     anchor["anchor_id"])
            status = AnchorStatus.SUBMITTED
        else:
            raise CommandFailed(BAD_REQUEST, "'status' must be submitted, confirmed or unconfirmed")
        return {"anchor_id": anchor["anchor_id"], "status": status}

    def fail(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{anchor_id, reason, inputs_spent}: bitcoind refused the transaction for
        good. Its documents are forgotten (so they can be anchored again) and its
        UTXO goes back to the pool, unless `inputs_spent` (spent elsewhere)."""
        anchor = self._anchor(args)
        reason = check_str(args, "reason", max_len=500)
        if anchor["status"] != AnchorStatus.SIGNED:
            raise CommandFailed(BAD_REQUEST, f"anchor {anchor['anchor_id']} is {anchor['status']};"
                                             " only a transaction never accepted can fail")
        anchor_rows.mark_failed(self.conn, anchor["anchor_id"], reason)
        utxo_rows.drop_unspent_outputs(self.conn, anchor["txid"])
        if not args.get("inputs_spent"):
            utxo_rows.return_to_pool(self.conn, anchor["utxo_txid"], anchor["utxo_vout"], now_ns)
        self.counters["failed"] += 1
        return {"anchor_id": anchor["anchor_id"], "status": AnchorStatus.FAILED}

    def open_anchors(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{} -> {anchors: [...]}: every anchor not yet confirmed, oldest first."""
        return {"anchors": anchor_rows.open_anchors(self.conn, MAX_OPEN_LISTED)}

    def confirmed_anchors(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{min_height} -> {anchors: [...]}: confirmed in a block at min_height
        or above, at most 1000, oldest block first."""
        return {"anchors": anchor_rows.confirmed_since(
            self.conn, check_int(args, "min_height", 0, 10**9), MAX_OPEN_LISTED)}

    def known(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{hashes: [32 bytes...]} -> {known: [...]}: those already anchored."""
        hashes = args.get("hashes")
        if not isinstance(hashes, list) or len(hashes) > MAX_DOCUMENTS:
            raise CommandFailed(BAD_REQUEST, f"'hashes' must be a list of at most {MAX_DOCUMENTS}")
        return {"known": anchor_rows.known(self.conn, [check_hash32(h) for h in hashes])}

    def leaves(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{anchor_id} -> {leaves: [[hash, ref, message_id]...]} in leaf order:
        what a restarted worker needs to announce an anchor it recorded."""
        anchor = self._anchor(args)
        return {"leaves": anchor_rows.leaves(self.conn, anchor["anchor_id"])}

    def snapshot(self) -> dict[str, Any]:
        return dict(self.counters)
