"""Retention: the oldest messages go, a chunk per transaction, and the
database keeps how far they went (bus_meta 'retention_upto'): a sealed message
missing above it was deleted by something else, which `bus-cli audit verify`
reports as a deletion. And an admin's purge of a topic prefix (writer/purge.py),
a window of ids per transaction, which never touches a sealed topic."""

from __future__ import annotations

from typing import Any

from storage import messages
from storage.schema import set_meta

RETAINED_KEY = "retention_upto"


def retained_upto(conn: Any) -> int:
    """The last message id retention deleted (0: it never deleted any)."""
    row = conn.execute("SELECT value FROM bus_meta WHERE key = ?", (RETAINED_KEY,)).fetchone()
    return int(row[0]) if row is not None and row[0].isdigit() else 0


def delete_expired(conn: Any, before_ns: int | None, keep: int | None, chunk: int,
                   upto: int | None = None) -> int:
    """Delete (inside the caller's transaction) up to `chunk` of the oldest
    messages that were committed before `before_ns` or are not among the
    newest `keep`, and none after `upto` (the last sealed message, when
    topics are sealed); returns how many. Examines at most `chunk` rows: ids
    are dense but where a purge left holes (fewer rows then), and commit
    times grow with ids. The newest message is never
    deleted, so ids are never reused. Subscription events older than the
    oldest message left go too."""
    first, last = messages.id_range(conn)
    if first is None:
        return 0
    cut = first - 1
    upto = min(first + chunk - 1, last - 1, last if upto is None else upto)
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
    set_meta(conn, RETAINED_KEY, str(cut))  # cut grows: each chunk starts after the last
    oldest_ns = conn.execute("SELECT committed_ns FROM messages WHERE id > ? "
                             "ORDER BY id LIMIT 1", (cut,)).fetchone()[0]
    conn.execute("DELETE FROM subscriptions WHERE id IN (SELECT id FROM subscriptions"
                 " WHERE committed_ns < ? ORDER BY id LIMIT ?)", (oldest_ns, chunk))
    return deleted


def purge_window(conn: Any, prefix: str, after_id: int, upto: int) -> int:
    """Delete (inside the caller's transaction) the messages after_id < id <=
    upto whose topic starts with `prefix` (every topic if it is empty), the
    same match as history reads (messages.topic_filter); returns how many.
    Examines at most upto - after_id rows: one range of the primary key."""
    matching, params = messages.topic_filter([prefix] if prefix else [])
    conn.execute(f"DELETE FROM messages WHERE id > ? AND id <= ? AND {matching}",
                 (after_id, upto, *params))
    return conn.changes()
