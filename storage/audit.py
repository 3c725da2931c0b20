"""Audit seals: their rows and packed leaves, and the reads `bus-cli audit`
recomputes them from (schema in storage/schema.py; the digest and the root in
proofs/audit.py).

A seal is written in three steps by the writer (writer/audit.py), for the
anchor worker that builds it: `begin` (status open), its leaves a chunk at a
time, `finish` (status sealed, with its root). An open seal left by a worker
that stopped is deleted by the next `begin`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from storage import messages

CHUNK_LEAVES = 4096            # leaves per audit_leaves row (32 KiB of digests)
SEAL_COLUMNS = ("id, prefixes, first_id, last_id, size, root, status, created_ns, sealed_ns,"
                " seal_version, digest_version, document")


def describe(row: tuple[Any, ...]) -> dict[str, Any]:
    seal = dict(zip([c.strip() for c in SEAL_COLUMNS.split(",")], row))
    seal["seal_id"] = seal.pop("id")
    seal["prefixes"] = seal["prefixes"].split("\n") if seal["prefixes"] else []
    seal["root"] = bytes(seal["root"]) if seal["root"] is not None else None
    seal["document"] = bytes(seal["document"]) if seal["document"] is not None else None
    return seal


def last_sealed_id(conn: Any) -> int:
    """The last message id the seals cover (0 if none)."""
    return conn.execute("SELECT coalesce(max(last_id), 0) FROM audit_seals"
                        " WHERE status = 'sealed'").fetchone()[0]


def sealed_prefixes(conn: Any) -> set[str]:
    """Every topic prefix a seal (open or finished) of the database names."""
    return {prefix for (lines,) in conn.execute("SELECT DISTINCT prefixes FROM audit_seals")
            for prefix in (lines or "").split("\n") if prefix}


def begin(conn: Any, prefixes: list[str], first_id: int, now_ns: int, seal_version: int = 1,
          digest_version: int = 1) -> int:
    """A new open seal (an unfinished one goes first, with its leaves)."""
    conn.execute("DELETE FROM audit_leaves WHERE seal_id IN (SELECT id FROM audit_seals"
                 " WHERE status = 'open')")
    conn.execute("DELETE FROM audit_seals WHERE status = 'open'")
    return conn.execute("INSERT INTO audit_seals (prefixes, first_id, status, created_ns,"
                        " seal_version, digest_version) VALUES (?, ?, 'open', ?, ?, ?)"
                        " RETURNING id", ("\n".join(prefixes), first_id, now_ns, seal_version,
                                          digest_version)).fetchone()[0]


def get(conn: Any, seal_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {SEAL_COLUMNS} FROM audit_seals WHERE id = ?",
                       (seal_id,)).fetchone()
    return None if row is None else describe(row)


def put_leaves(conn: Any, seal_id: int, chunk: int, ids: bytes, digests: bytes) -> None:
    conn.execute("INSERT INTO audit_leaves (seal_id, chunk, ids, digests) VALUES (?, ?, ?, ?)"
                 " ON CONFLICT (seal_id, chunk) DO UPDATE SET ids = excluded.ids,"
                 " digests = excluded.digests", (seal_id, chunk, ids, digests))


def chunk_bounds(conn: Any, seal_id: int) -> list[tuple[int, int, int]]:
    """(first id, last id, leaves) of each stored chunk of a seal, in order."""
    return [(int.from_bytes(bytes(first), "big"), int.from_bytes(bytes(last), "big"), count)
            for first, last, count in conn.execute(
                "SELECT substr(ids, 1, 8), substr(ids, length(ids) - 7, 8), length(ids) / 8"
                " FROM audit_leaves WHERE seal_id = ? ORDER BY chunk", (seal_id,)).fetchall()]


def finish(conn: Any, seal_id: int, last_id: int, size: int, root: bytes, document: bytes,
           now_ns: int) -> None:
    conn.execute("UPDATE audit_seals SET last_id = ?, size = ?, root = ?, document = ?,"
                 " status = 'sealed', sealed_ns = ? WHERE id = ?",
                 (last_id, size, root, document, now_ns, seal_id))


# What is anchored for a seal: its document (seals of schema 9 have none
# stored: their root, anchored bare).
SEAL_DOCUMENT = "coalesce(document, root)"


def unanchored(conn: Any, limit: int) -> list[tuple[int, bytes, int]]:
    """(seal id, document, size) of non-empty seals whose document (what is
    anchored for them) is in no anchor yet."""
    return [(row[0], bytes(row[1]), row[2]) for row in conn.execute(
        f"SELECT id, {SEAL_DOCUMENT}, size FROM audit_seals WHERE status = 'sealed' AND size > 0"
        f" AND NOT EXISTS (SELECT 1 FROM anchor_documents WHERE doc_hash = {SEAL_DOCUMENT})"
        " ORDER BY id LIMIT ?", (limit,)).fetchall()]


def all_rows(conn: Any) -> list[tuple[Any, ...]]:
    """Every audit_seals row as stored (SEAL_COLUMNS), whatever its state:
    what `audit verify` checks the seals' tiling and states on."""
    return conn.execute(f"SELECT {SEAL_COLUMNS} FROM audit_seals ORDER BY id").fetchall()


def anchored_documents(conn: Any) -> dict[int, bytes]:
    """seal id -> the document its anchoring recorded (the anchor document
    whose ref is audit-seal:N, as the anchor worker names it)."""
    found = {}
    for doc_hash, ref in conn.execute("SELECT doc_hash, ref FROM anchor_documents WHERE"
                                      " substr(ref, 1, 11) = 'audit-seal:'").fetchall():
        if ref[11:].isdigit():
            found[int(ref[11:])] = bytes(doc_hash)
    return found


# Ids counted by one statement of unsealed_count.
COUNT_WINDOW_IDS = 100_000


def unsealed_count(conn: Any, after_id: int, prefixes: list[str]) -> int:
    """The stored messages of `prefixes` after `after_id`, counted a window of
    ids at a time, each window its own short read: `bus-cli audit verify` runs
    beside a live writer, and one count over millions of rows would hold a
    snapshot, and so the writer's WAL, for seconds (docs/architecture.md,
    "Checkpoints and the WAL")."""
    matching, params = messages.topic_filter(prefixes)
    last = messages.last_id(conn) or 0
    total = 0
    while after_id < last:
        upto = min(last, after_id + COUNT_WINDOW_IDS)
        total += conn.execute(f"SELECT count(*) FROM messages WHERE id > ? AND id <= ? AND"
                              f" {matching}", (after_id, upto, *params)).fetchone()[0]
        after_id = upto
    return total


def seals(conn: Any, from_id: int = 0) -> list[dict[str, Any]]:
    """The finished seals that cover messages from `from_id` on, oldest first."""
    return [describe(row) for row in conn.execute(
        f"SELECT {SEAL_COLUMNS} FROM audit_seals WHERE status = 'sealed' AND last_id >= ?"
        " ORDER BY id", (from_id,)).fetchall()]


def seal_of(conn: Any, message_id: int) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {SEAL_COLUMNS} FROM audit_seals WHERE status = 'sealed' AND"
                       " first_id <= ? AND last_id >= ?", (message_id, message_id)).fetchone()
    return None if row is None else describe(row)


def leaves(conn: Any, seal_id: int) -> Iterator[tuple[int, bytes]]:
    """(message id, digest) of every leaf of the seal, in order; a chunk at a time."""
    chunk = -1
    while True:
        row = conn.execute("SELECT chunk, ids, digests FROM audit_leaves WHERE seal_id = ?"
                           " AND chunk > ? ORDER BY chunk LIMIT 1", (seal_id, chunk)).fetchone()
        if row is None:
            return
        chunk, ids, digests = row[0], bytes(row[1]), bytes(row[2])
        for i in range(len(ids) // 8):
            yield int.from_bytes(ids[8 * i:8 * i + 8], "big"), digests[32 * i:32 * i + 32]


# Every column of a message, in the order proofs/audit.py's message_digest takes them.
DIGEST_COLUMNS = "id, topic, payload, meta, producer_id, producer_seq, publish_ns, committed_ns"


def message_row(conn: Any, message_id: int) -> tuple[Any, ...] | None:
    """DIGEST_COLUMNS of one stored message, or None."""
    return conn.execute(f"SELECT {DIGEST_COLUMNS} FROM messages WHERE id = ?",
                        (message_id,)).fetchone()


def sealed_messages(conn: Any, first_id: int, last_id: int, prefixes: list[str],
                    rows: int = 5000) -> Iterator[tuple[Any, ...]]:
    """DIGEST_COLUMNS of the stored messages a seal covers, in id order,
    `rows` at a time (memory bounded)."""
    matching, params = messages.topic_filter(prefixes)
    after = first_id - 1
    while after < last_id:
        batch = conn.execute(
            f"SELECT {DIGEST_COLUMNS} FROM messages"
            f" WHERE id > ? AND id <= ? AND {matching} ORDER BY id LIMIT ?",
            (after, last_id, *params, rows)).fetchall()
        if not batch:
            return
        yield from batch
        after = batch[-1][0]
