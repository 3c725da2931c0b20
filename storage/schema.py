"""The database schema, its version, and bringing an older database up to it.

docs/protocol.md ("Database schema") describes every table; change both
together. `apply` runs in the writer's first transaction: a new file gets the
whole schema, an older one the columns it lacks, and a newer one (written by
a later bus) is refused before anything is changed.
"""

from __future__ import annotations

import re

from typing import Any

from bus.runner import StartupError

SCHEMA_VERSION = 11  # 7: utxo_requests.fingerprint; 8: audit_seals, audit_leaves;
#                      9: producer_keys (session keys out of producers);
#                      10: audit_seals.seal_version, digest_version, document;
#                      11: consumers.prefixes

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        id            INTEGER PRIMARY KEY,   -- commit order, never reused
        topic         TEXT    NOT NULL,
        payload       BLOB    NOT NULL,
        meta          BLOB,                  -- the msgpack map as received, or NULL
        producer_id   TEXT,                  -- meta.producer
        producer_seq  INTEGER,               -- meta.seq
        publish_ns    INTEGER,               -- meta.time_ns
        committed_ns  INTEGER NOT NULL       -- when the writer committed its batch
    )""",
    # Written up to schema 4, when the proxy passed subscriptions to the writer;
    # kept so that old rows stay readable (retention still deletes them).
    """CREATE TABLE IF NOT EXISTS subscriptions (
        id            INTEGER PRIMARY KEY,
        subscribed    INTEGER NOT NULL,      -- 1 subscribe, 0 unsubscribe
        prefix        BLOB    NOT NULL,      -- topic prefix, as bytes
        committed_ns  INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS producers (
        producer_id     TEXT    PRIMARY KEY,
        contiguous_seq  INTEGER NOT NULL,    -- every seq 1..contiguous_seq is decided
        max_seq         INTEGER NOT NULL,    -- highest seq decided (stored or refused)
        holes           BLOB,                -- msgpack [[first, last], ...] not yet decided
        gaps            INTEGER NOT NULL,    -- holes opened (jumps forward in seq)
        abandoned       INTEGER NOT NULL,    -- seqs given up on (too many holes, ended session)
        duplicates      INTEGER NOT NULL,    -- retransmissions skipped
        first_seen_ns   INTEGER NOT NULL,
        last_seen_ns    INTEGER NOT NULL,
        epoch           INTEGER NOT NULL DEFAULT 0,  -- current session (producer_open)
        refused         INTEGER NOT NULL DEFAULT 0,  -- seqs of this session refused
        refusals        BLOB,                -- msgpack [[seq, code], ...], the last 256
        owner           TEXT                 -- (CURVE) public key that opened it first
    ) WITHOUT ROWID""",
    # Apart from producers, which a reporting role may read: whoever reads a
    # session key can send in its producer's name and forge its
    # acknowledgements. No role but the writer's needs this table.
    """CREATE TABLE IF NOT EXISTS producer_keys (
        producer_id     TEXT    PRIMARY KEY,
        epoch           INTEGER NOT NULL,    -- the session the key belongs to
        session_key     BLOB    NOT NULL     -- its MAC key (protocol.SessionMac)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS consumers (
        name        TEXT    PRIMARY KEY,     -- durable consumer name
        last_id     INTEGER NOT NULL,        -- messages.id it acknowledged last
        updated_ns  INTEGER NOT NULL,
        owner       TEXT,                    -- (CURVE) public key that acknowledged first
        prefixes    BLOB                     -- msgpack list of its topic prefixes ([]: every
                                             -- topic); NULL: never said (lag counts every topic)
    ) WITHOUT ROWID""",
    # The wallet's outputs (see storage/utxos.py, writer/utxos.py). Confirmations are counted from
    # block_height and the wallet tip (bus_meta 'wallet_tip'), not stored per row.
    """CREATE TABLE IF NOT EXISTS utxos (
        txid              TEXT    NOT NULL,  -- 64 hex chars, as bitcoind shows it
        vout              INTEGER NOT NULL,
        amount_sat        INTEGER NOT NULL,  -- satoshis, never a float
        address           TEXT,
        script_pubkey     TEXT,              -- hex
        block_height      INTEGER,           -- block that confirmed it; NULL: unconfirmed
        block_time        INTEGER,           -- that block's time, s since the epoch
        status            INTEGER NOT NULL,  -- 0 available, 1 reserved, 2 spent
        lease_id          TEXT,              -- set while reserved, kept once spent
        lease_expires_ns  INTEGER,           -- a reserved row is available again after this
        lease_owner       TEXT,              -- who reserved it (for operators)
        spent_txid        TEXT,              -- the transaction spending it
        sync_generation   INTEGER NOT NULL,  -- the full wallet load that saw it last
        updated_ns        INTEGER NOT NULL,
        PRIMARY KEY (txid, vout)
    ) WITHOUT ROWID""",
    # "One available UTXO >= N sat with block_height <= H": one range seek.
    """CREATE INDEX IF NOT EXISTS utxos_available ON utxos (amount_sat, block_height)
        WHERE status = 0""",
    """CREATE INDEX IF NOT EXISTS utxos_lease_expiry ON utxos (lease_expires_ns)
        WHERE status = 1""",
    """CREATE UNIQUE INDEX IF NOT EXISTS utxos_lease ON utxos (lease_id)
        WHERE lease_id IS NOT NULL""",
    """CREATE INDEX IF NOT EXISTS utxos_spent_by ON utxos (spent_txid)
        WHERE spent_txid IS NOT NULL""",
    # The reply to each mutating utxo_* request, so a retry gets the same answer.
    """CREATE TABLE IF NOT EXISTS utxo_requests (
        request_id  TEXT    PRIMARY KEY,
        reply       BLOB    NOT NULL,        -- msgpack, as sent
        created_ns  INTEGER NOT NULL,
        fingerprint BLOB                     -- SHA-256 of the request's arguments
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS utxo_requests_age ON utxo_requests (created_ns)""",
    # Anchorings (storage/anchors.py, writer/anchors.py): one row per Merkle root put in a
    # transaction.
    """CREATE TABLE IF NOT EXISTS anchors (
        id                INTEGER PRIMARY KEY,
        root              BLOB    NOT NULL,  -- 32-byte RFC 6962 Merkle root
        size              INTEGER NOT NULL,  -- documents (leaves)
        txid              TEXT    NOT NULL,  -- its transaction (the newest after fee bumps,
                                             -- the mined one once confirmed)
        raw_tx            BLOB    NOT NULL,  -- that transaction, signed
        fee_sat           INTEGER NOT NULL,
        vsize             INTEGER NOT NULL,
        lease_id          TEXT    NOT NULL,  -- the lease of the UTXO it spends
        utxo_txid         TEXT    NOT NULL,
        utxo_vout         INTEGER NOT NULL,
        replaced_txids    BLOB,              -- msgpack list of the txids it replaced
        status            TEXT    NOT NULL,  -- signed, submitted, confirmed, failed
        broadcast_height  INTEGER NOT NULL,  -- wallet tip when (re)signed
        created_ns        INTEGER NOT NULL,
        submitted_ns      INTEGER,
        confirmed_ns      INTEGER,
        block_hash        TEXT,
        block_height      INTEGER
    )""",
    """CREATE INDEX IF NOT EXISTS anchors_open ON anchors (status)
        WHERE status IN ('signed', 'submitted')""",
    """CREATE TABLE IF NOT EXISTS anchor_documents (
        doc_hash    BLOB    PRIMARY KEY,     -- the document's SHA-256: anchored once
        anchor_id   INTEGER NOT NULL REFERENCES anchors (id),
        leaf_index  INTEGER NOT NULL,
        ref         TEXT,                    -- the request's reference, if any
        message_id  INTEGER                  -- messages.id of its anchor.request
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS anchor_documents_leaves
        ON anchor_documents (anchor_id, leaf_index)""",
    # Audit seals (storage/audit.py, writer/audit.py): Merkle roots over the
    # stored messages of some topic prefixes, anchored in Bitcoin.
    """CREATE TABLE IF NOT EXISTS audit_seals (
        id          INTEGER PRIMARY KEY,
        prefixes    TEXT    NOT NULL,        -- the sealed topic prefixes, one per line
        first_id    INTEGER NOT NULL,        -- the messages first_id <= id <= last_id
        last_id     INTEGER,                 --   whose topic has one of the prefixes
        size        INTEGER,                 -- how many: the tree's leaves
        root        BLOB,                    -- RFC 6962 root of their digests (proofs/audit.py)
        status      TEXT    NOT NULL,        -- open (being built) | sealed
        created_ns  INTEGER NOT NULL,
        sealed_ns   INTEGER,
        seal_version    INTEGER NOT NULL DEFAULT 1,  -- 1: root anchored; 2: seal record
        digest_version  INTEGER NOT NULL DEFAULT 1,  -- how its messages' digests are made
        document    BLOB                     -- what is anchored for it (record hash, or root)
    )""",
    # Each sealed message's id and digest, packed by chunk of leaves: what
    # `audit verify` names the first changed message from.
    """CREATE TABLE IF NOT EXISTS audit_leaves (
        seal_id     INTEGER NOT NULL REFERENCES audit_seals (id),
        chunk       INTEGER NOT NULL,        -- leaves chunk * 4096 on
        ids         BLOB    NOT NULL,        -- message ids, 8 bytes each, big-endian
        digests     BLOB    NOT NULL,        -- their digests, 32 bytes each
        PRIMARY KEY (seal_id, chunk)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS bus_meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
)

# Columns added to tables of an older schema, in place: (table, column, definition).
ADDED_COLUMNS = (
    ("producers", "epoch", "INTEGER NOT NULL DEFAULT 0"),
    ("producers", "refused", "INTEGER NOT NULL DEFAULT 0"),
    ("producers", "refusals", "BLOB"),
    ("producers", "owner", "TEXT"),
    ("consumers", "owner", "TEXT"),
    ("consumers", "prefixes", "BLOB"),
    ("utxo_requests", "fingerprint", "BLOB"),
    ("audit_seals", "seal_version", "INTEGER NOT NULL DEFAULT 1"),
    ("audit_seals", "digest_version", "INTEGER NOT NULL DEFAULT 1"),
    ("audit_seals", "document", "BLOB"),
)


class NotABusDatabase(StartupError):
    """What the database holds is not a bus's."""


class NewerSchema(StartupError):
    """The database was written by a newer bus: an older writer would drop what
    it does not know (e.g. consumer owners)."""


def stored_version(conn: Any, errors: tuple[type[Exception], ...]) -> int | None:
    """The schema version the database records; None for a new one. `errors`:
    what the engine raises for a missing table."""
    try:
        row = conn.execute("SELECT value FROM bus_meta WHERE key = 'schema_version'").fetchone()
    except errors:
        return None
    if row is None:
        return None
    try:
        return int(row[0])
    except ValueError:
        raise NotABusDatabase(f"its schema_version is {row[0]!r}, not a number: not a bus "
                              "database, or a damaged one") from None


def check_not_newer(version: int | None, where: str) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise NewerSchema(f"{where} has schema {version}, newer than this writer's "
                          f"({SCHEMA_VERSION}): run the bus version that wrote it, or a newer one")


TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", "\n".join(SCHEMA)))


def apply(conn: Any, columns_of: Any, version: int | None, where: str) -> None:
    """Create what is missing and record SCHEMA_VERSION (inside the caller's
    transaction). `columns_of(table)`: the names of a table's columns (none if
    it does not exist); `version`: the one stored (None: a new database).

    A database with no bus version must hold none of the bus's tables: one of
    someone else's named `messages` or `consumers` would be written into, have
    columns added, and be emptied by `db copy`."""
    if version is None:
        foreign = [table for table in TABLES if columns_of(table)]
        if foreign:
            raise NotABusDatabase(f"{where} already has tables named {', '.join(foreign)} but no"
                                  " bus schema version: not a bus database; use another database"
                                  " (or, on PostgreSQL, another schema)")
    for statement in SCHEMA:
        conn.execute(statement)
    for table, column, definition in ADDED_COLUMNS:
        if column not in columns_of(table):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    if version is not None and version < 10:
        _retention_before_10(conn)
    if "session_key" in columns_of("producers"):  # schema 6-8 kept the keys there
        conn.execute("INSERT INTO producer_keys (producer_id, epoch, session_key)"
                     " SELECT producer_id, epoch, session_key FROM producers"
                     " WHERE session_key IS NOT NULL ON CONFLICT (producer_id) DO NOTHING")
        conn.execute("ALTER TABLE producers DROP COLUMN session_key")
    set_meta(conn, "schema_version", str(SCHEMA_VERSION))


def _retention_before_10(conn: Any) -> None:
    """Before schema 10 retention left no record of how far it went, and
    `audit verify` took every message below the oldest stored one as taken
    by retention: an upgraded database keeps that reading for what was gone
    then (storage/retention.py records it from now on)."""
    have = conn.execute("SELECT 1 FROM bus_meta WHERE key = 'retention_upto'").fetchone()
    first = conn.execute("SELECT min(id) FROM messages").fetchone()[0]
    if have is None and first is not None and first > 1:
        set_meta(conn, "retention_upto", str(first - 1))


def set_meta(conn: Any, key: str, value: str) -> None:
    conn.execute("INSERT INTO bus_meta (key, value) VALUES (?, ?)"
                 " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
