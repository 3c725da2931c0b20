"""The wallet's UTXOs: row statuses, the queries of reservations and wallet
sync, the wallet tip, and the summary the reader serves.

Confirmations are not stored per row: a row keeps the height of the block that
confirmed it, and the wallet's tip height is kept once (bus_meta 'wallet_tip'),
so a new block is one write, not one per UTXO. "At least K confirmations" is
"block_height <= tip - K + 1", which the partial index (amount_sat,
block_height) WHERE status = available answers with one range seek.
"""

from __future__ import annotations

from typing import Any

import msgpack

from storage.schema import set_meta

AVAILABLE, RESERVED, SPENT = 0, 1, 2
STATUS_NAMES = {AVAILABLE: "available", RESERVED: "reserved", SPENT: "spent"}
UTXO_COLUMNS = "txid, vout, amount_sat, address, script_pubkey, block_height, block_time"
# `status = 0` must appear literally for SQLite to use the partial index.
PICK_SQL = {
    ("smallest", True): f"SELECT {UTXO_COLUMNS} FROM utxos WHERE status = 0 AND amount_sat >= ?"
                        " AND block_height <= ? ORDER BY amount_sat LIMIT 1",
    ("largest", True): f"SELECT {UTXO_COLUMNS} FROM utxos WHERE status = 0 AND amount_sat >= ?"
                       " AND block_height <= ? ORDER BY amount_sat DESC LIMIT 1",
    ("smallest", False): f"SELECT {UTXO_COLUMNS} FROM utxos WHERE status = 0 AND amount_sat >= ?"
                         " ORDER BY amount_sat LIMIT 1",
    ("largest", False): f"SELECT {UTXO_COLUMNS} FROM utxos WHERE status = 0 AND amount_sat >= ?"
                        " ORDER BY amount_sat DESC LIMIT 1",
}
UPSERT_SQL = (
    f"INSERT INTO utxos ({UTXO_COLUMNS}, status, sync_generation, updated_ns)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)"
    " ON CONFLICT (txid, vout) DO UPDATE SET block_height = excluded.block_height,"
    " block_time = excluded.block_time, sync_generation = excluded.sync_generation,"
    " updated_ns = excluded.updated_ns")
EXPIRE_SQL = ("UPDATE utxos SET status = 0, lease_id = NULL, lease_expires_ns = NULL,"
              " lease_owner = NULL, updated_ns = ? WHERE status = 1 AND lease_expires_ns <= ?")


def read_tip(conn: Any) -> tuple[int | None, str | None]:
    """The wallet tip (height, block hash) the table was synced to; (None, None) before."""
    row = conn.execute("SELECT value FROM bus_meta WHERE key = 'wallet_tip'").fetchone()
    return (None, None) if row is None else tuple(msgpack.unpackb(bytes.fromhex(row[0])))


def write_tip(conn: Any, height: int, block_hash: str) -> None:
    set_meta(conn, "wallet_tip", msgpack.packb([height, block_hash]).hex())


def summarize(conn: Any) -> dict[str, Any]:
    """Counts and sums by status, for `bus-cli utxo stats`. Run by the reader
    on its own connection: each count walks a partial index, never the
    table, but at 1,000,000 rows it is still too long for the write path."""
    available = conn.execute("SELECT count(*), coalesce(sum(amount_sat), 0),"
                             " count(block_height) FROM utxos WHERE status = 0").fetchone()
    reserved = conn.execute("SELECT count(*), coalesce(sum(amount_sat), 0), min(lease_expires_ns)"
                            " FROM utxos WHERE status = 1").fetchone()
    spent = conn.execute("SELECT count(*) FROM utxos WHERE spent_txid IS NOT NULL").fetchone()[0]
    height, block_hash = read_tip(conn)
    # int(): PostgreSQL's sum of bigints is a numeric (a Decimal in Python).
    return {"available": {"count": available[0], "amount_sat": int(available[1]),
                          "unconfirmed": available[0] - available[2]},
            "reserved": {"count": reserved[0], "amount_sat": int(reserved[1]),
                         "next_expiry_ns": reserved[2]},
            "spent": spent, "tip_height": height, "tip_hash": block_hash}
