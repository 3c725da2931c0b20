"""The database: schema, connection pragmas, and the write transactions.

Only the writer process opens the database for writing. One `connect()` sets
the pragmas; every write goes through `Store.transaction()`, which commits or
rolls back, so one batch is exactly one transaction.
The schema is documented in docs/protocol.md; change both together.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import apsw

from bus.runner import StartupError

SCHEMA_VERSION = 6
# The WAL file is truncated back to this size whenever it starts over.
WAL_SIZE_LIMIT = 32 << 20
# WAL frames after a commit that make a checkpoint due (16 MiB of 4 KiB pages):
# fewer, larger checkpoints cost less per message (each one syncs the database).
CHECKPOINT_PAGES = 4000
# At most one checkpoint this often, however many commits ask for one (a reader
# holding an old snapshot keeps them incomplete, and every commit asks again).
CHECKPOINT_MIN_INTERVAL_S = 0.2

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
        owner           TEXT,                -- (CURVE) public key that opened it first
        session_key     BLOB                 -- (CURVE) the session's MAC key
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS consumers (
        name        TEXT    PRIMARY KEY,     -- durable consumer name
        last_id     INTEGER NOT NULL,        -- messages.id it acknowledged last
        updated_ns  INTEGER NOT NULL,
        owner       TEXT                     -- (CURVE) public key that acknowledged first
    ) WITHOUT ROWID""",
    # The wallet's outputs (see writer/utxos.py). Confirmations are counted from
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
        created_ns  INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS utxo_requests_age ON utxo_requests (created_ns)""",
    # Anchorings (writer/anchors.py): one row per Merkle root put in a transaction.
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
    """CREATE TABLE IF NOT EXISTS bus_meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
)

INSERT_MESSAGE = ("INSERT INTO messages (topic, payload, meta, producer_id, producer_seq,"
                  " publish_ns, committed_ns) VALUES (?, ?, ?, ?, ?, ?, ?)")
# Columns added to tables of an older schema, in place: (table, column, definition).
ADDED_COLUMNS = (
    ("producers", "epoch", "INTEGER NOT NULL DEFAULT 0"),
    ("producers", "refused", "INTEGER NOT NULL DEFAULT 0"),
    ("producers", "refusals", "BLOB"),
    ("producers", "owner", "TEXT"),
    ("producers", "session_key", "BLOB"),
    ("consumers", "owner", "TEXT"),
)
PRODUCER_COLUMNS = ("producer_id, contiguous_seq, max_seq, holes, gaps, abandoned, duplicates,"
                    " first_seen_ns, last_seen_ns, epoch, refused, refusals, owner, session_key")
UPSERT_PRODUCER = (f"INSERT OR REPLACE INTO producers ({PRODUCER_COLUMNS})"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
UPSERT_CONSUMER = ("INSERT OR REPLACE INTO consumers (name, last_id, updated_ns, owner)"
                   " VALUES (?, ?, ?, ?)")
DELETE_CONSUMER = "DELETE FROM consumers WHERE name = ?"
# min() and max() in one SELECT would scan the table: SQLite's min/max shortcut
# (one index seek) applies to a query with a single min() or max() only.
SELECT_ID_RANGE = "SELECT (SELECT min(id) FROM messages), (SELECT max(id) FROM messages)"
SELECT_PRODUCER = f"SELECT {PRODUCER_COLUMNS} FROM producers WHERE producer_id = ?"

# A message row as buffered: (topic, payload, meta, producer_id, producer_seq, publish_ns).
MessageRow = tuple[str, bytes, "bytes | None", "str | None", "int | None", "int | None"]
# A consumer position: (name, last_id, updated_ns, owner); last_id None deletes the consumer.
ConsumptionRow = tuple[str, "int | None", int, "str | None"]

TRANSIENT_ERRORS = (apsw.BusyError, apsw.LockedError, apsw.FullError, apsw.IOError,
                    apsw.CantOpenError)


def connect(path: str, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000) -> apsw.Connection:
    """Open the database for writing with the bus's pragmas and schema."""
    conn = apsw.Connection(path)
    conn.set_busy_timeout(busy_timeout_ms)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise RuntimeError(f"{path}: could not switch to WAL (journal_mode={mode})")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    # No checkpoint inside a commit: the Checkpointer's thread does them, so a
    # commit never waits for one. Each time the WAL starts over (after a complete
    # checkpoint) it is cut back to WAL_SIZE_LIMIT, however far a long reader
    # made it grow.
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    conn.execute("PRAGMA cache_size=-32000")
    try:
        stored = conn.execute("SELECT value FROM bus_meta WHERE key = 'schema_version'"
                              ).fetchone()
    except apsw.SQLError:  # a new file: no bus_meta yet
        stored = None
    if stored is not None and int(stored[0]) > SCHEMA_VERSION:  # changed nothing yet
        conn.close()
        raise NewerSchema(f"{path} has schema {stored[0]}, newer than this writer's "
                          f"({SCHEMA_VERSION}): run the bus version that wrote it, or a newer one")
    with conn:
        for ddl in SCHEMA:
            conn.execute(ddl)
        for table, column, definition in ADDED_COLUMNS:
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        conn.execute("INSERT OR REPLACE INTO bus_meta VALUES ('schema_version', ?)",
                     (str(SCHEMA_VERSION),))
    return conn


class NewerSchema(StartupError):
    """The database was written by a newer bus: an older writer would drop what
    it does not know (e.g. consumer owners)."""


class DatabaseInUse(StartupError):
    """Another writer has this database open."""


def lock_single_writer(path: str) -> int:
    """Take an exclusive flock on the database file (created if missing) and
    return its descriptor, to be closed only after SQLite's connection.

    A second writer on the same file would interleave batches and break the
    one-writer design; SQLite's own locks only serialize transactions. flock is
    independent of SQLite's POSIX locks, but closing any descriptor of the file
    drops this process's POSIX locks, hence the order.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StartupError(f"cannot open database {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DatabaseInUse(f"{path} is open in another bus writer") from None
    return fd


class Checkpointer:
    """Copies the WAL into the database file on a thread of its own, with a
    connection of its own, so that no commit waits for a checkpoint (a commit
    that ran one stalled for a second after a long reader let go). The
    writer's connection asks for one (`request`, from its WAL hook) when a
    commit leaves CHECKPOINT_PAGES frames or more in the WAL. PASSIVE
    checkpoints never wait for readers or the writer: a reader holding an old
    snapshot only stops one short, and the WAL grows until it lets go
    (`behind_frames`, `incomplete_for_s` in stats); the next complete one lets
    the WAL start over, cut back to WAL_SIZE_LIMIT."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.checkpoints = 0
        self.last_ms = 0.0
        self.max_ms = 0.0
        self.wal_frames = 0
        self.behind_frames = 0  # WAL frames not yet in the database file
        self.errors = 0
        self._incomplete_since: float | None = None
        self._conn = apsw.Connection(path)
        self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._due = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            if self._stopping.is_set():
                return
            self._due.clear()
            self._checkpoint()
            if self._stopping.wait(CHECKPOINT_MIN_INTERVAL_S):
                return

    def _checkpoint(self) -> None:
        started = time.perf_counter()
        try:
            _busy, frames, done = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except apsw.Error:
            self.errors += 1  # e.g. a full disk: tried again when a commit asks
            return
        self.last_ms = (time.perf_counter() - started) * 1000.0
        self.max_ms = max(self.max_ms, self.last_ms)
        self.checkpoints += 1
        self.wal_frames, self.behind_frames = max(frames, 0), max(frames - done, 0)
        if self.behind_frames == 0:
            self._incomplete_since = None
        elif self._incomplete_since is None:
            self._incomplete_since = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        wal = self.path + "-wal"
        return {"bytes": os.path.getsize(wal) if os.path.exists(wal) else 0,
                "size_limit": WAL_SIZE_LIMIT, "checkpoints": self.checkpoints,
                "last_checkpoint_ms": round(self.last_ms, 3),
                "max_checkpoint_ms": round(self.max_ms, 3), "frames": self.wal_frames,
                "behind_frames": self.behind_frames, "errors": self.errors,
                "incomplete_for_s": None if self._incomplete_since is None
                else round(time.monotonic() - self._incomplete_since, 3)}

    def close(self) -> None:
        self._stopping.set()
        self._due.set()
        self._thread.join()
        self._conn.close()


class Store:
    def __init__(self, path: str, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._lock_fd = lock_single_writer(path)
        try:
            self.conn = connect(path, synchronous, busy_timeout_ms)
        except (apsw.NotADBError, apsw.CorruptError) as exc:
            os.close(self._lock_fd)
            raise StartupError(f"{path} is not a bus database ({exc}): give BUS_DB a new "
                               "path or an existing bus database") from None
        except (apsw.ReadOnlyError, apsw.CantOpenError, apsw.PermissionsError) as exc:
            os.close(self._lock_fd)
            raise StartupError(f"cannot write {path} ({exc}): the writer's user needs to "
                               "write the file and its directory") from None
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.checkpointer = Checkpointer(path)
        self.conn.set_wal_hook(self._after_commit)

    def _after_commit(self, _conn: apsw.Connection, _name: str, frames: int) -> int:
        """SQLite's WAL hook, after each commit of this connection."""
        if frames >= CHECKPOINT_PAGES:
            self.checkpointer.request()
        return apsw.SQLITE_OK

    @contextlib.contextmanager
    def transaction(self) -> Iterator[apsw.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            # SQLite has rolled back by itself after some errors (SQLITE_FULL
            # while spilling a large transaction): ROLLBACK would then raise
            # and hide the error that matters.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def write_batch(self, messages: Sequence[MessageRow],
                    producers: Sequence[tuple[Any, ...]] = (),
                    consumptions: Sequence[ConsumptionRow] = ()) -> tuple[int, int | None]:
        """Write everything in one transaction; returns the commit timestamp (ns)
        and the id of the last message written (None if none).
        `producers` are ledger rows describing the messages of this batch."""
        committed_ns = time.time_ns()
        with self.transaction() as conn:
            if messages:
                conn.executemany(INSERT_MESSAGE, [(*row, committed_ns) for row in messages])
            last_id = conn.last_insert_rowid() if messages else None
            if producers:
                conn.executemany(UPSERT_PRODUCER, producers)
            for name, position, updated_ns, owner in consumptions:
                if position is None:
                    conn.execute(DELETE_CONSUMER, (name,))
                else:
                    conn.execute(UPSERT_CONSUMER, (name, position, updated_ns, owner))
        return committed_ns, last_id

    def delete_expired(self, before_ns: int | None, keep: int | None, chunk: int) -> int:
        """Delete, in one transaction, up to `chunk` of the oldest messages that
        were committed before `before_ns` or are not among the newest `keep`;
        returns how many. Examines at most `chunk` rows: ids are dense (rows are
        only ever deleted from the oldest end) and commit times grow with ids.
        The newest message is never deleted, so ids are never reused.
        Subscription events older than the oldest message left go too."""
        with self.transaction() as conn:
            first, last = conn.execute(SELECT_ID_RANGE).fetchone()
            if first is None:
                return 0
            cut = first - 1
            upto = min(first + chunk - 1, last - 1)
            if keep:
                cut = max(cut, min(upto, last - keep))
            if before_ns is not None:
                aged = conn.execute("SELECT max(id) FROM messages WHERE id BETWEEN ? AND ?"
                                    " AND committed_ns < ?", (first, upto, before_ns)).fetchone()[0]
                cut = max(cut, aged or cut)
            if cut < first:
                return 0
            conn.execute("DELETE FROM messages WHERE id <= ?", (cut,))
            deleted = conn.changes()
            oldest_ns = conn.execute("SELECT committed_ns FROM messages WHERE id > ? "
                                     "ORDER BY id LIMIT 1", (cut,)).fetchone()[0]
            conn.execute("DELETE FROM subscriptions WHERE id IN (SELECT id FROM subscriptions"
                         " WHERE committed_ns < ? ORDER BY id LIMIT ?)", (oldest_ns, chunk))
        return deleted

    def load_consumers(self) -> dict[str, tuple[int, int, str | None]]:
        """name -> (last_id, updated_ns, owner) of every durable consumer."""
        return {name: (last_id, updated_ns, owner) for name, last_id, updated_ns, owner in
                self.conn.execute("SELECT name, last_id, updated_ns, owner FROM consumers")}

    def first_message_id(self) -> int | None:
        return self.conn.execute("SELECT min(id) FROM messages").fetchone()[0]

    def load_producer(self, producer_id: str) -> tuple[Any, ...] | None:
        return self.conn.execute(SELECT_PRODUCER, (producer_id,)).fetchone()

    def last_message_id(self) -> int | None:
        return self.conn.execute("SELECT max(id) FROM messages").fetchone()[0]

    def close(self) -> None:
        self.checkpointer.close()
        self.conn.close()  # the last connection: SQLite checkpoints and removes the WAL
        os.close(self._lock_fd)
