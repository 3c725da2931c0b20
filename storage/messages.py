"""Messages: the batched insert, id bounds, and the reads of history pages.

Ids are the commit order and never reused; rows are deleted from the oldest
end (storage/retention.py) or, by an admin's purge, those of some topics, so
commit times grow with ids (ids are dense but for purged ones): a time is
found by a binary search over ids, with no index on time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A message row as buffered: (topic, payload, meta, producer_id, producer_seq, publish_ns).
MessageRow = tuple[str, bytes, "bytes | None", "str | None", "int | None", "int | None"]

INSERT_MESSAGE = ("INSERT INTO messages (topic, payload, meta, producer_id, producer_seq,"
                  " publish_ns, committed_ns) VALUES (?, ?, ?, ?, ?, ?, ?)")
# min() and max() in one SELECT would scan the table: SQLite's min/max shortcut
# (one index seek) applies to a query with a single min() or max() only.
SELECT_ID_RANGE = "SELECT (SELECT min(id) FROM messages), (SELECT max(id) FROM messages)"


def insert(conn: Any, rows: Sequence[MessageRow], committed_ns: int) -> None:
    conn.executemany(INSERT_MESSAGE, [(*row, committed_ns) for row in rows])


def id_range(conn: Any) -> tuple[int | None, int | None]:
    """(first, last) id stored; (None, None) when there is none."""
    return tuple(conn.execute(SELECT_ID_RANGE).fetchone())


def first_id(conn: Any) -> int | None:
    return conn.execute("SELECT min(id) FROM messages").fetchone()[0]


def last_id(conn: Any) -> int | None:
    return conn.execute("SELECT max(id) FROM messages").fetchone()[0]


def topic_and_time(conn: Any, message_id: int) -> tuple[str, int] | None:
    """(topic, committed_ns) of one message; None if it is not stored."""
    row = conn.execute("SELECT topic, committed_ns FROM messages WHERE id = ?",
                       (message_id,)).fetchone()
    return None if row is None else (row[0], row[1])


def id_before(conn: Any, since_ns: int, first: int | None, last: int) -> int:
    """The largest id committed before since_ns (0 if none): a binary search
    over ids, since commit times grow with ids."""
    if first is None:
        return 0
    lo, hi = first - 1, last  # every row with id <= lo is older than since_ns
    while lo < hi:
        mid = (lo + hi + 1) // 2
        row = conn.execute("SELECT committed_ns FROM messages WHERE id <= ? "
                           "ORDER BY id DESC LIMIT 1", (mid,)).fetchone()
        if row is None or row[0] < since_ns:
            lo = mid
        else:
            hi = mid - 1
    return max(lo, 0)


def topic_filter(prefixes: list[str]) -> tuple[str, list[Any]]:
    """SQL true for a topic that starts with one of `prefixes` (every topic if
    there is none), and its parameters."""
    params: list[Any] = []
    for prefix in prefixes:
        params += (len(prefix), prefix)
    return "(" + (" OR ".join("substr(topic, 1, ?) = ?" for _ in prefixes) or "1 = 1") + ")", \
        params


def count_matching(conn: Any, after_id: int, upto: int, prefixes: list[str]) -> int:
    """How many messages after_id < id <= upto have a topic under one of
    `prefixes` (every topic if none): upto - after_id rows examined at most,
    one range of the primary key (there is no index on topic)."""
    matching, params = topic_filter(prefixes)
    return conn.execute(f"SELECT count(*) FROM messages WHERE id > ? AND id <= ? AND {matching}",
                        (after_id, upto, *params)).fetchone()[0]


def page(conn: Any, after_id: int, upto: int, prefixes: list[str], limit: int,
         max_bytes: int) -> tuple[list[tuple[Any, ...]], int]:
    """(rows, their bytes): (id, topic, payload, meta, committed_ns) of the
    messages with after_id < id <= upto whose topic starts with one of
    `prefixes` (all if none), oldest first, at most `limit`, and none after the
    one that brings payloads and metas to `max_bytes` (the page is full when
    its bytes reach it).
    Memory is bounded in bytes on both engines: SQLite's cursor steps one row
    at a time and stops there; a PostgreSQL client receives a whole result at
    once, so there the server cuts the page (a running sum)."""
    matching, params = topic_filter(prefixes)
    where = f"id > ? AND id <= ? AND {matching}"
    params = [after_id, upto, *params]
    if getattr(conn, "dialect", "sqlite") == "postgresql":
        rows = conn.execute(
            "SELECT id, topic, payload, meta, committed_ns FROM (SELECT *, sum(size) OVER"
            " (ORDER BY id) AS running FROM (SELECT id, topic, payload, meta, committed_ns,"
            " octet_length(payload) + coalesce(octet_length(meta), 0) AS size FROM messages"
            f" WHERE {where} ORDER BY id LIMIT ?) AS page) AS sized WHERE running - size < ?",
            [*params, limit, max_bytes], binary=True).fetchall()
        return rows, sum(len(row[2]) + (len(row[3]) if row[3] is not None else 0)
                         for row in rows)
    cursor = conn.execute("SELECT id, topic, payload, meta, committed_ns FROM messages"
                          f" WHERE {where} ORDER BY id LIMIT ?", [*params, limit])
    rows, size = [], 0
    for row in cursor:
        rows.append(row)
        size += len(row[2]) + (len(row[3]) if row[3] is not None else 0)
        if size >= max_bytes:
            cursor.close()
            break
    return rows, size


def topic_counts(conn: Any, after_id: int) -> Any:
    """(topic, messages, newest id, newest commit ns) of the messages after `after_id`."""
    return conn.execute("SELECT topic, count(*), max(id), max(committed_ns) FROM messages "
                        "WHERE id > ? GROUP BY topic", (after_id,))
