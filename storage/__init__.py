"""The database, for every process that uses it: schema, connections, row
shapes and queries, one module per concern (messages and history, producer
sessions and consumer positions, UTXOs, anchors, retention), on SQLite (a file
path: the default) or PostgreSQL (a postgresql:// URL). The writer and the
reader import this package and the bus kernel only; no SQL lives elsewhere."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from bus import pgurl
from bus.config import redact_url

URL_SCHEMES = pgurl.SCHEMES


class NotReadable(Exception):
    """The database cannot be read yet (not created, or no schema)."""


def is_url(db: str) -> bool:
    """A PostgreSQL URL (else a SQLite file path)."""
    return db.startswith(URL_SCHEMES)


def redact(db: str) -> str:
    """The database as logs and errors may show it: a URL as libpq reads it,
    its secrets hidden (bus/pgurl.py)."""
    return redact_url(db)


def sqlite_path(db: str) -> str:
    """A SQLite database's file: `sqlite:///PATH` (relative, or //ABSOLUTE) or the path."""
    return db[len("sqlite:///"):] if db.startswith("sqlite:///") else db


def describe(db: str) -> str:
    """The database as a person reads it: the URL without its password, or
    the file's full path."""
    return redact(db) if is_url(db) else os.path.realpath(sqlite_path(db))


def schema_version(db: str) -> int | None:
    """The schema version the database records; None if it has none (new)."""
    from storage import schema
    try:
        conn = open_read_only(db, 5000)
    except NotReadable:
        return None
    try:
        return schema.stored_version(conn, errors_of(db)[1])
    finally:
        conn.close()


# psycopg is imported only for a PostgreSQL database: a tenth of a second at
# every process start (bus-cli's included) that SQLite users need not pay.

def open_store(db: str, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000,
               session_timeout_s: int | None = None, fence: bool = False) -> Any:
    """The writer's handle (sqlite.Store or postgres.PgStore): the one-writer
    lock, the schema brought up to date, write_batch, delete_expired, and the
    engine's `transient_errors` and `is_disk_full`. `session_timeout_s`
    (PostgreSQL): how soon each side finds the session dead (the writer's);
    `fence` (a standby's): end a lock holder silent for that long."""
    if is_url(db):
        from storage import postgres
        return postgres.PgStore(db, busy_timeout_ms, session_timeout_s, fence)
    from storage import sqlite
    return sqlite.Store(sqlite_path(db), synchronous, busy_timeout_ms)


def errors_of(db: str) -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(what a later attempt may get past, every error) of the database's engine."""
    if is_url(db):
        from storage import postgres as engine
    else:
        from storage import sqlite as engine  # type: ignore[no-redef]
    return engine.TRANSIENT_ERRORS, engine.DATABASE_ERRORS


def open_read_only(db: str, busy_timeout_ms: int) -> Any:
    """The reader's connection; NotReadable until the writer made the schema."""
    if is_url(db):
        from storage import postgres
        return postgres.open_read_only(db)
    from storage import sqlite
    return sqlite.open_read_only(sqlite_path(db), busy_timeout_ms)


@contextlib.contextmanager
def snapshot(conn: Any, max_s: float | None = None) -> Iterator[Any]:
    """One consistent read on a reader's connection. On SQLite, `max_s`
    bounds it in time: a statement still running then is interrupted (the
    engine's error, apsw.InterruptError), since a snapshot held open keeps
    the WAL from starting over (storage/sqlite.py read_deadline)."""
    if getattr(conn, "dialect", "sqlite") == "postgresql":
        from storage import postgres
        with postgres.snapshot(conn) as held:
            yield held
        return
    from storage import sqlite
    conn.execute("BEGIN")
    try:
        with sqlite.read_deadline(conn, max_s):
            yield conn
    finally:
        if conn.in_transaction:  # (an interrupt may have ended it)
            conn.execute("COMMIT")


@contextlib.contextmanager
def savepoint(conn: Any, rollback_on: type[BaseException] | tuple[type[BaseException], ...],
              name: str = "command") -> Iterator[None]:
    """A part of the caller's transaction that is undone alone when the body
    raises `rollback_on` (the error goes on); any other error is left to the
    transaction's own rollback."""
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except rollback_on:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")
