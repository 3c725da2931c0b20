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


# --- the writer's commands (writer/anchors.py) --------------------------------

def insert(conn: Any, root: bytes, size: int, txid: str, raw_tx: bytes, fee_sat: int,
           vsize: int, lease_id: str, utxo_txid: str, utxo_vout: int, tip_height: int,
           now_ns: int) -> int:
    """A new anchor, `signed`; its id."""
    return conn.execute(
        "INSERT INTO anchors (root, size, txid, raw_tx, fee_sat, vsize, lease_id, utxo_txid,"
        " utxo_vout, status, broadcast_height, created_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?,"
        " 'signed', ?, ?) RETURNING id", (root, size, txid, raw_tx, fee_sat, vsize, lease_id,
                                          utxo_txid, utxo_vout, tip_height, now_ns)
    ).fetchall()[0][0]


def insert_documents(conn: Any, anchor_id: int,
                     documents: list[tuple[bytes, str | None, int | None]]) -> None:
    """(hash, ref, message_id) in leaf order."""
    conn.executemany("INSERT INTO anchor_documents (doc_hash, anchor_id, leaf_index, ref,"
                     " message_id) VALUES (?, ?, ?, ?, ?)",
                     [(h, anchor_id, i, ref, mid) for i, (h, ref, mid) in enumerate(documents)])


def get(conn: Any, anchor_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {ANCHOR_COLUMNS} FROM anchors WHERE id = ?",
                       (anchor_id,)).fetchone()
    return None if row is None else describe(row)


def replace(conn: Any, anchor_id: int, txid: str, raw_tx: bytes, fee_sat: int, vsize: int,
            replaced_txids: list[str], tip_height: int) -> None:
    """A fee bump: the anchor's transaction is now this one (`signed` again)."""
    conn.execute("UPDATE anchors SET txid = ?, raw_tx = ?, fee_sat = ?, vsize = ?,"
                 " replaced_txids = ?, status = 'signed', broadcast_height = ? WHERE id = ?",
                 (txid, raw_tx, fee_sat, vsize, msgpack.packb(replaced_txids), tip_height,
                  anchor_id))


def mark_submitted(conn: Any, anchor_id: int, now_ns: int) -> None:
    conn.execute("UPDATE anchors SET status = 'submitted', submitted_ns ="
                 " coalesce(submitted_ns, ?) WHERE id = ? AND status = 'signed'",
                 (now_ns, anchor_id))


def mark_confirmed(conn: Any, anchor_id: int, txid: str, block_hash: str, block_height: int,
                   now_ns: int) -> None:
    conn.execute("UPDATE anchors SET status = 'confirmed', txid = ?, confirmed_ns = ?,"
                 " block_hash = ?, block_height = ? WHERE id = ?",
                 (txid, now_ns, block_hash, block_height, anchor_id))


def mark_unconfirmed(conn: Any, anchor_id: int) -> int:
    """A reorg took its block away: `submitted` again, no block."""
    conn.execute("UPDATE anchors SET status = 'submitted', confirmed_ns = NULL, block_hash ="
                 " NULL, block_height = NULL WHERE id = ? AND status = 'confirmed'", (anchor_id,))
    return conn.changes()


def confirmed_since(conn: Any, min_height: int, limit: int) -> list[dict[str, Any]]:
    """Confirmed anchors whose block is at `min_height` or above, oldest first:
    the ones a reorg can still take back."""
    return [describe(row) for row in conn.execute(
        f"SELECT {ANCHOR_COLUMNS} FROM anchors WHERE status = 'confirmed' AND block_height >= ?"
        " ORDER BY block_height, id LIMIT ?", (min_height, limit)).fetchall()]


def mark_failed(conn: Any, anchor_id: int, reason: str) -> None:
    """Failed for good: its documents are forgotten (they can be anchored
    again); the reason is kept in place of the transaction."""
    conn.execute("DELETE FROM anchor_documents WHERE anchor_id = ?", (anchor_id,))
    conn.execute("UPDATE anchors SET status = 'failed', raw_tx = ? WHERE id = ?",
                 (reason.encode(), anchor_id))


def open_anchors(conn: Any, limit: int) -> list[dict[str, Any]]:
    """Every anchor not yet confirmed, oldest first."""
    return [describe(row) for row in conn.execute(
        f"SELECT {ANCHOR_COLUMNS} FROM anchors WHERE status IN ('signed', 'submitted')"
        " ORDER BY id LIMIT ?", (limit,)).fetchall()]


def leaves(conn: Any, anchor_id: int) -> list[list[Any]]:
    """[hash, ref, message_id] of each document, in leaf order."""
    return [list(row) for row in conn.execute(
        "SELECT doc_hash, ref, message_id FROM anchor_documents WHERE anchor_id = ?"
        " ORDER BY leaf_index", (anchor_id,))]


def known(conn: Any, hashes: list[bytes]) -> list[bytes]:
    """Those of `hashes` already anchored."""
    found = []
    for start in range(0, len(hashes), 500):
        chunk = hashes[start:start + 500]
        found += [bytes(row[0]) for row in conn.execute(
            "SELECT doc_hash FROM anchor_documents WHERE doc_hash IN"
            f" ({','.join('?' * len(chunk))})", chunk)]
    return found


def every_anchor(conn: Any) -> list[dict[str, Any]]:
    """Every anchor row, whatever its status, oldest first: what `bus-cli
    audit verify --node` holds against the chain."""
    return [describe(row) for row in conn.execute(
        f"SELECT {ANCHOR_COLUMNS} FROM anchors ORDER BY id").fetchall()]
