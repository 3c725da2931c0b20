"""Retention: the oldest messages go, a chunk per transaction."""

from __future__ import annotations

from typing import Any

from storage import messages


def delete_expired(conn: Any, before_ns: int | None, keep: int | None, chunk: int,
                   upto: int | None = None) -> int:
    """Delete (inside the caller's transaction) up to `chunk` of the oldest
    messages that were committed before `before_ns` or are not among the
    newest `keep`, and none after `upto` (the last sealed message, when
    topics are sealed); returns how many. Examines at most `chunk` rows: ids
    are dense and commit times grow with ids. The newest message is never
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
    oldest_ns = conn.execute("SELECT committed_ns FROM messages WHERE id > ? "
                             "ORDER BY id LIMIT 1", (cut,)).fetchone()[0]
    conn.execute("DELETE FROM subscriptions WHERE id IN (SELECT id FROM subscriptions"
                 " WHERE committed_ns < ? ORDER BY id LIMIT ?)", (oldest_ns, chunk))
    return deleted
