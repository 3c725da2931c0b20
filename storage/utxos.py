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


# --- the writer's commands (writer/utxos.py): one statement each ---------------

def stored_reply(conn: Any, request_id: str) -> tuple[bytes, bytes | None] | None:
    """(reply, fingerprint of the request's arguments) of the mutating request
    with this id, if it ran before (no fingerprint: stored by schema 6)."""
    row = conn.execute("SELECT reply, fingerprint FROM utxo_requests WHERE request_id = ?",
                       (request_id,)).fetchone()
    return None if row is None else (bytes(row[0]), None if row[1] is None else bytes(row[1]))


def store_reply(conn: Any, request_id: str, reply: bytes, fingerprint: bytes,
                now_ns: int) -> None:
    conn.execute("INSERT INTO utxo_requests (request_id, reply, created_ns, fingerprint)"
                 " VALUES (?, ?, ?, ?)", (request_id, reply, now_ns, fingerprint))


def prune_replies(conn: Any, before_ns: int, chunk: int) -> int:
    conn.execute("DELETE FROM utxo_requests WHERE request_id IN (SELECT request_id"
                 " FROM utxo_requests WHERE created_ns < ? LIMIT ?)", (before_ns, chunk))
    return conn.changes()


def expire_leases(conn: Any, now_ns: int) -> int:
    """Every lease run out goes back to the pool (an index probe when none has)."""
    conn.execute(EXPIRE_SQL, (now_ns, now_ns))
    return conn.changes()


def pick(conn: Any, policy: str, min_amount_sat: int, max_height: int | None
         ) -> tuple[Any, ...] | None:
    """One available UTXO of at least `min_amount_sat` (confirmed at or below
    `max_height`, if given): the smallest or largest, one range seek."""
    if max_height is None:
        return conn.execute(PICK_SQL[policy, False], (min_amount_sat,)).fetchone()
    return conn.execute(PICK_SQL[policy, True], (min_amount_sat, max_height)).fetchone()


def largest_available(conn: Any) -> int | None:
    return conn.execute("SELECT max(amount_sat) FROM utxos WHERE status = 0").fetchone()[0]


def lease(conn: Any, txid: str, vout: int, lease_id: str, expires_ns: int, owner: str | None,
          now_ns: int) -> bool:
    """Reserve an available UTXO under `lease_id`; False if it was not available."""
    conn.execute("UPDATE utxos SET status = 1, lease_id = ?, lease_expires_ns = ?,"
                 " lease_owner = ?, updated_ns = ? WHERE txid = ? AND vout = ? AND status = 0",
                 (lease_id, expires_ns, owner, now_ns, txid, vout))
    return conn.changes() == 1


def by_lease(conn: Any, lease_id: str) -> tuple[Any, ...] | None:
    """UTXO_COLUMNS, then status, lease_expires_ns, spent_txid."""
    return conn.execute(f"SELECT {UTXO_COLUMNS}, status, lease_expires_ns, spent_txid"
                        " FROM utxos WHERE lease_id = ?", (lease_id,)).fetchone()


def renew(conn: Any, lease_id: str, expires_ns: int, now_ns: int) -> None:
    conn.execute("UPDATE utxos SET lease_expires_ns = ?, updated_ns = ? WHERE lease_id = ?",
                 (expires_ns, now_ns, lease_id))


def release(conn: Any, lease_id: str, now_ns: int) -> bool:
    conn.execute("UPDATE utxos SET status = 0, lease_id = NULL, lease_expires_ns = NULL,"
                 " lease_owner = NULL, updated_ns = ? WHERE lease_id = ? AND status = 1",
                 (now_ns, lease_id))
    return conn.changes() == 1


def mark_spent(conn: Any, txid: str, vout: int, spending_txid: str, now_ns: int) -> None:
    conn.execute("UPDATE utxos SET status = 2, spent_txid = ?, lease_expires_ns = NULL,"
                 " updated_ns = ? WHERE txid = ? AND vout = ?", (spending_txid, now_ns, txid, vout))


def set_spender(conn: Any, txid: str, vout: int, spending_txid: str, now_ns: int) -> None:
    """Which of an anchor's transactions spent its UTXO (the mined one)."""
    conn.execute("UPDATE utxos SET spent_txid = ?, updated_ns = ? WHERE txid = ? AND vout = ?",
                 (spending_txid, now_ns, txid, vout))


def return_to_pool(conn: Any, txid: str, vout: int, now_ns: int) -> None:
    """A UTXO whose spending transaction failed for good is available again."""
    conn.execute("UPDATE utxos SET status = 0, lease_id = NULL, lease_expires_ns = NULL,"
                 " lease_owner = NULL, spent_txid = NULL, updated_ns = ? WHERE txid = ?"
                 " AND vout = ?", (now_ns, txid, vout))


def restore(conn: Any, txid: str, vout: int, spent_txid: str, now_ns: int) -> int:
    """A UTXO marked spent by `spent_txid`, which spends it no more (replaced,
    conflicted, out of the mempool), is available again: 1 if it was."""
    conn.execute("UPDATE utxos SET status = 0, spent_txid = NULL, updated_ns = ? WHERE txid = ?"
                 " AND vout = ? AND status = 2 AND spent_txid = ?",
                 (now_ns, txid, vout, spent_txid))
    return conn.changes()


def drop_unspent_outputs(conn: Any, txid: str) -> None:
    """The available outputs of a transaction that will not be mined (its
    change, after a replacement or a failure)."""
    conn.execute("DELETE FROM utxos WHERE txid = ? AND status = 0", (txid,))


def upsert(conn: Any, rows: list[tuple[Any, ...]]) -> None:
    """New outputs join the pool; known ones get their block and generation."""
    conn.executemany(UPSERT_SQL, rows)


def mark_removed(conn: Any, txid: str, vout: int, spending_txid: str | None, now_ns: int) -> int:
    """Spent outside the bus (or gone in a reorg), whatever its lease: 1 if it was not spent."""
    conn.execute("UPDATE utxos SET status = 2, spent_txid = coalesce(?, spent_txid),"
                 " lease_id = NULL, lease_expires_ns = NULL, updated_ns = ? WHERE txid = ?"
                 " AND vout = ? AND status != 2", (spending_txid, now_ns, txid, vout))
    return conn.changes()


def sweep(conn: Any, generation: int, now_ns: int, chunk: int) -> int:
    """Mark spent up to `chunk` available rows that a full load tagged
    `generation` did not see and nothing touched since it started."""
    conn.execute("UPDATE utxos SET status = 2, updated_ns = ? WHERE (txid, vout) IN"
                 " (SELECT txid, vout FROM utxos WHERE status = 0 AND"
                 " sync_generation < ? AND updated_ns < ? LIMIT ?)",
                 (now_ns, generation, generation, chunk))
    return conn.changes()


def get(conn: Any, txid: str, vout: int) -> tuple[Any, ...] | None:
    """UTXO_COLUMNS, then status, lease_expires_ns, spent_txid, lease_id."""
    return conn.execute(f"SELECT {UTXO_COLUMNS}, status, lease_expires_ns, spent_txid,"
                        " lease_id FROM utxos WHERE txid = ? AND vout = ?",
                        (txid, vout)).fetchone()
