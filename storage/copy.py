"""Copying a bus database to another, of either engine (`bus-cli db copy`):
SQLite to PostgreSQL when a deployment outgrows one machine, or back.

Messages go first, in id order and with their ids, a transaction per chunk:
a copy that stops (Ctrl-C, a lost connection) resumes after the last id the
destination has. The other tables (producer sessions, consumer positions,
UTXOs, their stored replies, anchors and their documents, the wallet tip) are
small and copied whole at the end, in one transaction, replacing what the
destination had. Then the copy is verified: the same number of messages, the
same last id, and for every producer the same count and range of sequence
numbers. The destination's writer lock is held throughout, so no writer can
start on it meanwhile; the source is only read (its messages up to its last id
when the copy started).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import storage
from storage import messages, schema

MESSAGE_COLUMNS = ("id, topic, payload, meta, producer_id, producer_seq, publish_ns,"
                   " committed_ns")
# Copied whole after the messages, parents before children (anchor_documents
# references anchors); of bus_meta the wallet tip and how far retention went,
# not the schema_version, which is the destination's own.
TABLES = (
    ("producers", "producer_id, contiguous_seq, max_seq, holes, gaps, abandoned, duplicates,"
                  " first_seen_ns, last_seen_ns, epoch, refused, refusals, owner"),
    ("producer_keys", "producer_id, epoch, session_key"),
    ("consumers", "name, last_id, updated_ns, owner, prefixes"),
    ("utxos", "txid, vout, amount_sat, address, script_pubkey, block_height, block_time, status,"
              " lease_id, lease_expires_ns, lease_owner, spent_txid, sync_generation,"
              " updated_ns"),
    ("utxo_requests", "request_id, reply, created_ns, fingerprint"),
    ("anchors", "id, root, size, txid, raw_tx, fee_sat, vsize, lease_id, utxo_txid, utxo_vout,"
                " replaced_txids, status, broadcast_height, created_ns, submitted_ns,"
                " confirmed_ns, block_hash, block_height"),
    ("anchor_documents", "doc_hash, anchor_id, leaf_index, ref, message_id"),
    ("subscriptions", "id, subscribed, prefix, committed_ns"),
    ("audit_seals", "id, prefixes, first_id, last_id, size, root, status, created_ns, sealed_ns,"
                    " seal_version, digest_version, document"),
    ("audit_leaves", "seal_id, chunk, ids, digests"),
)
# Verification: per producer, the count and range of its sequence numbers.
PRODUCER_SEQUENCES = ("SELECT producer_id, count(*), min(producer_seq), max(producer_seq)"
                      " FROM messages WHERE producer_id IS NOT NULL GROUP BY producer_id"
                      " ORDER BY producer_id")


class CopyMismatch(Exception):
    """The destination does not hold what the source does (the message says what)."""


def _chunks(conn: Any, after_id: int, upto: int, rows: int) -> Iterator[list[tuple]]:
    while after_id < upto:
        chunk = conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id > ? AND id <= ?"
                             " ORDER BY id LIMIT ?", (after_id, upto, rows)).fetchall()
        if not chunk:
            return
        yield chunk
        after_id = chunk[-1][0]


def _insert_messages(conn: Any, chunk: list[tuple]) -> None:
    if getattr(conn, "dialect", "sqlite") == "postgresql":
        with conn.raw.cursor() as cursor:
            with cursor.copy(f"COPY messages ({MESSAGE_COLUMNS}) FROM STDIN (FORMAT BINARY)"
                             ) as copy:
                copy.set_types(["int8", "text", "bytea", "bytea", "text", "int8", "int8",
                                "int8"])
                for row in chunk:
                    copy.write_row(row)
    else:
        conn.executemany(f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES"
                         " (?, ?, ?, ?, ?, ?, ?, ?)", chunk)


def _continue_ids(conn: Any, tables: tuple[str, ...]) -> None:
    """PostgreSQL: ids were given, so the identity sequences go on after them
    (SQLite's rowids need nothing)."""
    if getattr(conn, "dialect", "sqlite") == "postgresql":
        for table in tables:
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                         f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)")


def writer_running(db: str) -> bool:
    """Whether a bus writer holds the database's one-writer lock now."""
    if storage.is_url(db):
        from storage import postgres
        conn = postgres.connect(db, "bus-db-copy")
        try:
            key = postgres.WRITER_LOCK_KEY
            if conn.execute("SELECT pg_try_advisory_lock(?)", (key,)).fetchone()[0]:
                conn.execute("SELECT pg_advisory_unlock(?)", (key,))
                return False
            return True
        finally:
            conn.close()
    from storage import sqlite
    try:
        os.close(sqlite.lock_single_writer(storage.sqlite_path(db)))
    except sqlite.DatabaseInUse:
        return True
    return False


def same_messages(source: Any, dest: Any) -> None:
    """The destination's first and last messages are the source's, column by
    column: it is an earlier copy of this source, not another bus's database."""
    first, last = messages.id_range(dest)
    for message_id in (first, last):
        rows = [conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?",
                             (message_id,)).fetchone() for conn in (source, dest)]
        if rows[0] is None or tuple(rows[0]) != tuple(rows[1]):
            raise CopyMismatch(f"the destination's message {message_id} is not the source's: "
                               "it is another bus's database, not a copy of this source (give "
                               "an empty database)")


def copy_database(source_db: str, dest_db: str, chunk_rows: int = 5000,
                  progress: Callable[[int, int], None] = lambda done, total: None
                  ) -> dict[str, Any]:
    """Copy (or resume copying) source_db into dest_db; returns what was
    copied and verified. Raises CopyMismatch if the verification fails."""
    if storage.is_url(source_db):  # a server that does not answer, said as such
        from storage import postgres
        postgres.connect(source_db, "bus-cli").close()
    version = storage.schema_version(source_db)
    if version is None:
        raise storage.NotReadable(f"{storage.describe(source_db)} holds no bus database")
    if version != schema.SCHEMA_VERSION:
        raise CopyMismatch(f"the source has schema {version}, this bus {schema.SCHEMA_VERSION}:"
                           f" run bus-cli db migrate --db SRC first")
    if writer_running(source_db):
        raise CopyMismatch(f"a bus writer is running on {storage.describe(source_db)}: stop it"
                           " first (its producer ledger would run ahead of the copied messages)")
    source = storage.open_read_only(source_db, 5000)
    dest = storage.open_store(dest_db)
    try:
        first, last = messages.id_range(source)
        last = last or 0
        have = messages.last_id(dest.conn) or 0
        if have > last:
            raise CopyMismatch(f"the destination has messages up to id {have}, beyond the "
                               f"source's last ({last}): not a copy of this source")
        if have:
            same_messages(source, dest.conn)
        total = source.execute("SELECT count(*) FROM messages WHERE id <= ?",
                               (last,)).fetchone()[0]
        done = dest.conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        progress(done, total)
        for chunk in _chunks(source, have, last, chunk_rows):
            with dest.transaction() as conn:
                _insert_messages(conn, chunk)
                _continue_ids(conn, ("messages",))  # a writer on a copy that stopped goes on
            done += len(chunk)
            progress(done, total)
        with dest.transaction() as conn:
            for table, _ in reversed(TABLES):  # children first: anchor_documents -> anchors
                conn.execute(f"DELETE FROM {table}")
            for table, columns in TABLES:
                rows = source.execute(f"SELECT {columns} FROM {table}").fetchall()
                if rows:
                    marks = ", ".join("?" * len(columns.split(",")))
                    conn.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
            for key in ("wallet_tip", "retention_upto"):
                value = source.execute("SELECT value FROM bus_meta WHERE key = ?",
                                       (key,)).fetchone()
                if value is not None:
                    schema.set_meta(conn, key, value[0])
            _continue_ids(conn, ("messages", "anchors", "subscriptions", "audit_seals"))
        return verify(source, dest.conn, last) | {"first_id": first, "last_id": last}
    finally:
        dest.close()
        source.close()


def verify(source: Any, dest: Any, last: int) -> dict[str, Any]:
    """The same messages (count, last id) and, per producer, the same count and
    range of sequence numbers, up to the source's `last` id."""
    counted = [conn.execute("SELECT count(*), max(id) FROM messages WHERE id <= ?",
                            (last,)).fetchone() for conn in (source, dest)]
    if tuple(counted[0]) != tuple(counted[1]):
        raise CopyMismatch(f"messages: source has {counted[0][0]} up to id {counted[0][1]}, "
                           f"the destination {counted[1][0]} up to id {counted[1][1]}")
    sequences = [conn.execute(PRODUCER_SEQUENCES.replace(
        "WHERE producer_id IS NOT NULL", "WHERE producer_id IS NOT NULL AND id <= ?"),
        (last,)).fetchall() for conn in (source, dest)]
    if [tuple(r) for r in sequences[0]] != [tuple(r) for r in sequences[1]]:
        theirs = {r[0]: tuple(r) for r in sequences[1]}
        wrong = next(r for r in sequences[0] if theirs.get(r[0]) != tuple(r))
        raise CopyMismatch(f"producer {wrong[0]!r}: source has {wrong[1]} messages, seq "
                           f"{wrong[2]}..{wrong[3]}; the destination "
                           f"{theirs.get(wrong[0], 'none')}")
    tables = {table: [conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                      for conn in (source, dest)] for table, _ in TABLES}
    for table, (theirs, ours) in tables.items():
        if theirs != ours:
            raise CopyMismatch(f"{table}: {theirs} rows in the source, {ours} in the destination")
    return {"messages": counted[0][0], "producers": len(sequences[0]),
            "tables": {table: counts[0] for table, counts in tables.items()}}
