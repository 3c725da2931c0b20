"""Anchor records: one row per Merkle root put in a transaction
(`anchors`), one per document it anchors (`anchor_documents`, keyed by the
document hash: a document is anchored once)."""

from __future__ import annotations

from typing import Any

import msgpack

STATUSES = ("signed", "submitted", "confirmed", "failed")
ANCHOR_COLUMNS = ("id, root, size, txid, raw_tx, fee_sat, vsize, lease_id, utxo_txid, utxo_vout,"
                  " replaced_txids, status, broadcast_height, created_ns, submitted_ns,"
                  " confirmed_ns, block_hash, block_height")
_ANCHOR_KEYS = [k.strip() for k in ANCHOR_COLUMNS.split(",")]


def describe(row: tuple[Any, ...]) -> dict[str, Any]:
    """A stored anchor row as a map (`id` as `anchor_id`, replaced txids unpacked)."""
    anchor = dict(zip(_ANCHOR_KEYS, row))
    anchor["anchor_id"] = anchor.pop("id")
    anchor["replaced_txids"] = msgpack.unpackb(anchor["replaced_txids"]) \
        if anchor["replaced_txids"] else []
    return anchor


def proof_rows(conn: Any, document_hash: bytes
               ) -> tuple[dict[str, Any], int, str | None, list[bytes]] | None:
    """(anchor, leaf index, ref, every leaf of its tree in order) of an
    anchored document, or None: what its inclusion proof is built from."""
    row = conn.execute("SELECT anchor_id, leaf_index, ref FROM anchor_documents"
                       " WHERE doc_hash = ?", (document_hash,)).fetchone()
    if row is None:
        return None
    anchor_id, index, ref = row
    anchor = describe(conn.execute(f"SELECT {ANCHOR_COLUMNS} FROM anchors WHERE id = ?",
                                   (anchor_id,)).fetchone())
    leaves = [r[0] for r in conn.execute("SELECT doc_hash FROM anchor_documents WHERE"
                                         " anchor_id = ? ORDER BY leaf_index", (anchor_id,))]
    return anchor, index, ref, leaves
