"""SQLite through apsw: the writer's connection and its pragmas, the one-writer
lock, the checkpoint thread, and the reader's read-only connection.

WAL lets the reader read while the writer commits; checkpoints run on a thread
of their own so that no commit waits for one (see Checkpointer), but for the
one the writer runs itself when the WAL passes its bound (Store._bound_wal).
The WAL's size follows the free space of the disk (wal_budget).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apsw

from bus.runner import StartupError
from storage import NotReadable, messages, schema, sessions
from storage.handle import WriterHandle

# The WAL file is truncated back to this size whenever it starts over.
WAL_SIZE_LIMIT = 32 << 20
# Prepared statements the writer's connection keeps. apsw's cache is a ring
# that each statement re-enters when it finishes, and executemany finishes its
# statement once per row: with apsw's default of 100, a batch of 100 messages
# (BATCH_SIZE) pushed every other statement out, so BEGIN, COMMIT and the
# producers' upsert were parsed again for each batch (0.1 us a message). A
# cache looks its statements up one by one, so it is not made larger than the
# batches it has to outlast need.
STATEMENT_CACHE_SIZE = 256
# WAL frames after a commit that make a checkpoint due (16 MiB of 4 KiB pages):
# fewer, larger checkpoints cost less per message (each one syncs the database).
CHECKPOINT_PAGES = 4000
# On a small disk the WAL is kept to a part of the free space (wal_budget): a
# checkpoint copies what the WAL holds into the database file, which needs room
# to grow by as much, so a WAL let grow to 16 MiB on a 20 MiB file system could
# never be checkpointed, and everything stayed in it until the disk was full.
# A checkpoint is due at an eighth of the free space, the WAL is cut back to a
# quarter (and past that the writer checkpoints before it writes on), and one
# transaction takes at most a sixteenth: what the WAL holds, at most about a
# third of the free space, always fits once more in the database file.
CHECKPOINT_SHARE_OF_FREE_SPACE = 8
TRANSACTION_SHARE_OF_FREE_SPACE = 16
# The smallest checkpoint (a disk nearly full): a batch of 100 messages of
# 1 KB is about 35 pages, so this is a checkpoint every few commits.
MIN_CHECKPOINT_PAGES = 64
# After a checkpoint a reader held back (or one that failed), none again for
# this long, however many commits ask (a reader holding an old snapshot keeps
# them incomplete, and every commit asks again).
CHECKPOINT_MIN_INTERVAL_S = 0.2

# How often the writer's own checkpoint looks again for a moment when no
# reader reads from the WAL (Checkpointer.run_on).
BUSY_POLL_S = 0.0002
# The longest wait between two checkpoints of the writer's own while a
# reader's snapshot holds the WAL back (see Store._bound_wal).
BOUND_RETRY_MAX_S = 10.0

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
    conn = apsw.Connection(path, statementcachesize=STATEMENT_CACHE_SIZE)
    conn.set_busy_timeout(busy_timeout_ms)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise RuntimeError(f"{path}: could not switch to WAL (journal_mode={mode})")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    # No checkpoint inside a commit: the Checkpointer's thread does them, so a
    # commit does not wait for one. Each time the WAL starts over (after a
    # complete checkpoint) it is cut back to journal_size_limit (WAL_SIZE_LIMIT,
    # less on a small disk: Store._fit_wal_to_disk), however far a long reader
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


# SQLite virtual machine steps between two looks at a read's deadline (a
# Python call each: about 0.1 ms of a scan).
DEADLINE_CHECK_STEPS = 10_000


@contextlib.contextmanager
def read_deadline(conn: apsw.Connection, max_s: float | None) -> Iterator[None]:
    """Statements of `conn` still running `max_s` seconds from now are
    interrupted (apsw.InterruptError): SQLite's progress handler. None: no
    deadline."""
    if max_s is None:
        yield
        return
    deadline = time.monotonic() + max_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, DEADLINE_CHECK_STEPS)
    try:
        yield
    finally:
        conn.set_progress_handler(None)


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


def free_bytes(directory: str) -> int | None:
    """The space left to this process on `directory`'s file system (None if
    it cannot be told: the budget then stays as it was)."""
    try:
        vfs = os.statvfs(directory)
    except OSError:
        return None
    return vfs.f_bavail * vfs.f_frsize


@dataclass(frozen=True)
class WalBudget:
    """What the WAL may take of the disk (wal_budget)."""
    checkpoint_pages: int   # WAL frames after a commit that make a checkpoint due
    size_limit: int         # journal_size_limit, and the WAL's bound: past it the
    #                         writer checkpoints itself before its next transaction
    transaction_bytes: int  # the most message bytes the writer puts in one transaction


def wal_budget(free: int, page_size: int) -> WalBudget:
    """The WAL's budget on a file system with `free` bytes free: CHECKPOINT_PAGES
    and WAL_SIZE_LIMIT from about 128 MiB free up, less below (never under
    MIN_CHECKPOINT_PAGES); see CHECKPOINT_SHARE_OF_FREE_SPACE. The checkpoint
    size is rounded down to a power of two, so that it (and the pragma that
    follows it) changes seldom as the free space shrinks."""
    frame = page_size + 24  # each WAL frame has a header of its own
    pages = max(MIN_CHECKPOINT_PAGES, free // CHECKPOINT_SHARE_OF_FREE_SPACE // frame)
    pages = min(CHECKPOINT_PAGES, 1 << (pages.bit_length() - 1))
    return WalBudget(pages, WAL_SIZE_LIMIT if pages == CHECKPOINT_PAGES
                     else min(WAL_SIZE_LIMIT, 2 * pages * frame),
                     free // TRANSACTION_SHARE_OF_FREE_SPACE)


class Checkpointer:
    """Copies the WAL into the database file on a thread of its own, with a
    connection of its own, so that no commit waits for a checkpoint (a commit
    that ran one stalled for a second after a long reader let go). The
    writer's connection asks for one (`request`, from its WAL hook) when a
    commit leaves `budget.checkpoint_pages` frames or more in the WAL
    (CHECKPOINT_PAGES, fewer on a small disk: see wal_budget), or fails for a
    full disk. PASSIVE checkpoints never wait for readers or the writer: a
    reader holding an old snapshot only stops one short, and the WAL grows
    until it lets go (`behind_frames`, `incomplete_for_s` in stats); the next
    complete one lets the WAL start over, cut back to `budget.size_limit`.

    Commits go on while the thread copies, so a burst can outrun it; past
    `budget.size_limit` the writer runs one itself (`run_on`) before it
    writes on, which bounds the WAL whatever the rate (but for a reader's
    snapshot)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # Set by the Store from the free space (wal_budget), shown in stats.
        self.budget = WalBudget(CHECKPOINT_PAGES, WAL_SIZE_LIMIT, 1 << 62)
        self.free_bytes: int | None = None
        self.checkpoints = 0
        self.writer_checkpoints = 0  # run by the writer: the WAL past its bound
        self.last_ms = 0.0
        self.max_ms = 0.0
        self.wal_frames = 0
        self.behind_frames = 0  # WAL frames not yet in the database file
        self.errors = 0
        self._incomplete_since: float | None = None
        self._conn = apsw.Connection(path)
        self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._size_limit = WAL_SIZE_LIMIT  # this connection's
        self._running = threading.Lock()  # one checkpoint at a time, the thread's or the writer's
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
            if self._size_limit != self.budget.size_limit:  # its own connection's, here
                self._size_limit = self.budget.size_limit
                with contextlib.suppress(apsw.Error):
                    self._conn.execute(f"PRAGMA journal_size_limit={self._size_limit}")
            with self._running:
                copied_all = self._checkpoint(self._conn)
            # Held back by a reader (or failed): not again for a while, though
            # every commit asks. Otherwise at once if asked: commits that
            # never pause keep the WAL from starting over, and then each
            # checkpoint copies only what came during the last one, so that
            # what the writer copies itself past the bound (run_on) is little.
            if not copied_all and self._stopping.wait(CHECKPOINT_MIN_INTERVAL_S):
                return

    def run_on(self, conn: apsw.Connection, wait_s: float) -> bool | None:
        """A RESTART checkpoint on the writer's connection, between its
        transactions, after the thread's if one is running: nothing is
        committed meanwhile, so it copies the whole WAL, and it waits (up to
        `wait_s`) until no reader reads from the WAL, so that the next commit
        starts it over. SQLite waits on a reader's lock, not its snapshot, so
        a reader that reads again at once (a client paging through history)
        holds it for as long as the checkpoint looks only now and then (the
        busy timeout's sleeps grow to 100 ms): this one looks every
        BUSY_POLL_S, and finds the gap between two of its transactions. A
        reader that began once all was copied reads the database file alone
        and does not hold it back: readers whose transactions are short (the
        bus's reader: see reader/service.py READ_MAX_S) delay it by about one
        transaction.
        True if the WAL starts over, False if a reader held it back, None if
        the checkpoint failed (a full disk)."""
        deadline = time.monotonic() + wait_s

        def busy(_prior_calls: int) -> bool:
            if time.monotonic() >= deadline:
                return False
            time.sleep(BUSY_POLL_S)
            return True
        with self._running:
            self.writer_checkpoints += 1
            conn.set_busy_handler(busy)
            try:
                return self._checkpoint(conn, "RESTART")
            finally:
                conn.set_busy_handler(None)

    def _checkpoint(self, conn: apsw.Connection, mode: str = "PASSIVE") -> bool | None:
        """True if it copied all of the WAL (RESTART: and no reader reads
        it), False if not, None if it failed."""
        started = time.perf_counter()
        try:
            busy, frames, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except apsw.Error:
            self.errors += 1  # e.g. a full disk: tried again when a commit asks
            return None
        self.last_ms = (time.perf_counter() - started) * 1000.0
        self.max_ms = max(self.max_ms, self.last_ms)
        self.checkpoints += 1
        self.wal_frames, self.behind_frames = max(frames, 0), max(frames - done, 0)
        if self.behind_frames == 0:
            self._incomplete_since = None
        elif self._incomplete_since is None:
            self._incomplete_since = time.monotonic()
        return not busy and self.behind_frames == 0

    def snapshot(self) -> dict[str, Any]:
        wal = self.path + "-wal"
        return {"bytes": os.path.getsize(wal) if os.path.exists(wal) else 0,
                "size_limit": self.budget.size_limit,
                "checkpoint_pages": self.budget.checkpoint_pages,
                "transaction_bytes": self.budget.transaction_bytes,
                "free_bytes": self.free_bytes, "checkpoints": self.checkpoints,
                "writer_checkpoints": self.writer_checkpoints,
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
        self._busy_timeout_ms = busy_timeout_ms
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
        self._directory = os.path.dirname(os.path.abspath(path))
        self._frame_bytes = self.conn.execute("PRAGMA page_size").fetchone()[0] + 24
        self._wal_frames = 0          # after the last commit (the WAL hook says)
        self._bound_retry_at = float("-inf")  # _bound_wal after a reader held it back
        self._bound_backoff = CHECKPOINT_MIN_INTERVAL_S
        self._fit_wal_to_disk()
        self.conn.set_wal_hook(self._after_commit)
        # Group or others may read the file (made so before this version, or
        # by hand): the writer says so at start (see writer/service.py).
        self.readable_by_others = bool(os.fstat(self._lock_fd).st_mode & 0o077)

    @property
    def transaction_bytes(self) -> int:
        """The most message bytes one transaction should take (the writer
        commits a larger buffer in parts): a sixteenth of the free space."""
        return self.checkpointer.budget.transaction_bytes

    def _after_commit(self, _conn: apsw.Connection, _name: str, frames: int) -> int:
        """SQLite's WAL hook, after each commit of this connection."""
        self._wal_frames = frames
        if frames >= self.checkpointer.budget.checkpoint_pages:
            self.checkpointer.request()
        return apsw.SQLITE_OK

    def _fit_wal_to_disk(self) -> None:
        """The WAL's budget from the free space, before each transaction: a
        budget even a second old could let a burst take what the checkpoint
        needs (a statvfs, 0.6 us: no descriptor, nothing to fail when the
        descriptor table is full). The writer's connection is the one whose
        journal_size_limit cuts the WAL back, at the first commit after the
        WAL starts over."""
        free = free_bytes(self._directory)
        if free is None:
            return
        budget = wal_budget(free, self._frame_bytes - 24)
        checkpointer = self.checkpointer
        if budget.size_limit != checkpointer.budget.size_limit:
            self.conn.execute(f"PRAGMA journal_size_limit={budget.size_limit}")
        checkpointer.free_bytes, checkpointer.budget = free, budget

    def _bound_wal(self) -> None:
        """Past its bound (the thread's checkpoints outrun by commits that
        never leave it a gap, or readers that never do), the writer
        checkpoints the WAL itself before it writes anything more (run_on),
        and the next commit starts it over. While a reader's snapshot keeps
        it from starting over (a snapshot older than the wait: another
        process's long query), tried again after 0.2 s, then twice as long
        each time up to BOUND_RETRY_MAX_S: each try makes a commit wait up to
        the busy timeout."""
        if self._wal_frames * self._frame_bytes < self.checkpointer.budget.size_limit:
            return
        now = time.monotonic()
        if now < self._bound_retry_at:
            return
        try:
            restarts = self.checkpointer.run_on(self.conn, self._busy_timeout_ms / 1000.0)
        finally:
            self.conn.set_busy_timeout(self._busy_timeout_ms)
        if restarts:
            self._wal_frames = 0
            self._bound_retry_at, self._bound_backoff = float("-inf"), CHECKPOINT_MIN_INTERVAL_S
        elif restarts is None or self.checkpointer.behind_frames == 0:
            # Failed (a full disk), or all copied but readers that began
            # meanwhile were still reading: none of them is a long one.
            self._bound_retry_at = now + CHECKPOINT_MIN_INTERVAL_S
        else:  # a snapshot older than the wait: another process's long read
            self._bound_retry_at = now + self._bound_backoff
            self._bound_backoff = min(2 * self._bound_backoff, BOUND_RETRY_MAX_S)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[apsw.Connection]:
        self._fit_wal_to_disk()
        self._bound_wal()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            # SQLite has rolled back by itself after some errors (SQLITE_FULL
            # while spilling a large transaction): ROLLBACK would then raise
            # and hide the error that matters.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if is_disk_full(exc):
                # A checkpoint may fit where the commit did not (the database
                # file has free pages, or was given room): once complete, the
                # WAL starts over and the next commit reuses its space.
                self.checkpointer.request()
            raise

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
