"""SQLite through apsw: the writer's connection and its pragmas, the one-writer
lock, the checkpoint thread, and the reader's read-only connection.

WAL lets the reader read while the writer commits; checkpoints run on a thread
of their own so that no commit waits for one (see Checkpointer).
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
from storage import NotReadable, messages, schema, sessions
from storage.handle import WriterHandle

# The WAL file is truncated back to this size whenever it starts over.
WAL_SIZE_LIMIT = 32 << 20
# WAL frames after a commit that make a checkpoint due (16 MiB of 4 KiB pages):
# fewer, larger checkpoints cost less per message (each one syncs the database).
CHECKPOINT_PAGES = 4000
# At most one checkpoint this often, however many commits ask for one (a reader
# holding an old snapshot keeps them incomplete, and every commit asks again).
CHECKPOINT_MIN_INTERVAL_S = 0.2

# What a later attempt may get past: a busy or locked database, a full disk,
# an I/O error. Anything else is a bug or a damaged database.
TRANSIENT_ERRORS = (apsw.BusyError, apsw.LockedError, apsw.FullError, apsw.IOError,
                    apsw.CantOpenError)
# Every error the engine raises.
DATABASE_ERRORS = (apsw.Error,)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, apsw.FullError)


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
    try:  # a newer database is refused before anything is changed
        version = schema.stored_version(conn, (apsw.SQLError,))
        schema.check_not_newer(version, path)
        with conn:
            schema.apply(conn, lambda table: {row[1] for row in
                                              conn.execute(f"PRAGMA table_info({table})")},
                         version, path)
    except BaseException:
        conn.close()
        raise
    return conn


def open_read_only(path: str, busy_timeout_ms: int) -> apsw.Connection:
    """A read-only connection (the reader's); raises NotReadable until the
    writer has created the database."""
    try:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        conn.set_busy_timeout(busy_timeout_ms)
        conn.execute("SELECT 1 FROM messages LIMIT 0").fetchall()
    except (apsw.CantOpenError, apsw.SQLError) as exc:
        raise NotReadable(f"database {path} is not readable yet: {exc}") from None
    except apsw.Error as exc:  # not a database, a directory, damaged
        raise NotReadable(f"{path} cannot be read as a bus database: {exc}") from None
    return conn



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
        # The bus user's alone (SQLite gives the -wal and -shm files the same
        # mode): the file holds the session keys (producer_keys), which let
        # whoever reads them send in a producer's name.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
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


class Store(WriterHandle):
    """The writer's handle on a SQLite database: the one-writer lock, the
    connection, the checkpoint thread, and one transaction per write."""

    transient_errors = TRANSIENT_ERRORS
    is_disk_full = staticmethod(is_disk_full)

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
        # Group or others may read the file (made so before this version, or
        # by hand): the writer says so at start (see writer/service.py).
        self.readable_by_others = bool(os.fstat(self._lock_fd).st_mode & 0o077)

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

    def write_batch(self, rows: Sequence[messages.MessageRow],
                    producers: Sequence[tuple[Any, ...]] = (),
                    consumptions: Sequence[sessions.ConsumptionRow] = ()
                    ) -> tuple[int, int | None]:
        """Write everything in one transaction; returns the commit timestamp (ns)
        and the id of the last message written (None if none).
        `producers` are ledger rows describing the messages of this batch."""
        committed_ns = time.time_ns()
        with self.transaction() as conn:
            if rows:
                messages.insert(conn, rows, committed_ns)
            last = conn.last_insert_rowid() if rows else None
            sessions.write_producers(conn, producers)
            sessions.write_consumptions(conn, consumptions)
        return committed_ns, last

    def snapshot(self) -> dict[str, Any]:
        return {"engine": "sqlite", **self.checkpointer.snapshot()}

    def close(self) -> None:
        self.checkpointer.close()
        self.conn.close()  # the last connection: SQLite checkpoints and removes the WAL
        os.close(self._lock_fd)
