"""Producer sessions and durable consumer positions: the rows the writer keeps
in memory (writer/producers.py, writer/consumers.py) and stores with each
batch, in the batch's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

# A consumer position: (name, last_id, updated_ns, owner, prefixes); last_id None
# deletes the consumer; prefixes: the topic prefixes it reads, None if never said.
ConsumptionRow = tuple[str, "int | None", int, "str | None", "tuple[str, ...] | None"]
# A stored position: name -> (last_id, updated_ns, owner, prefixes).
StoredConsumer = tuple[int, int, "str | None", "tuple[str, ...] | None"]

PRODUCER_COLUMNS = ("producer_id, contiguous_seq, max_seq, holes, gaps, abandoned, duplicates,"
                    " first_seen_ns, last_seen_ns, epoch, refused, refusals, owner")
UPSERT_PRODUCER = (f"INSERT INTO producers ({PRODUCER_COLUMNS})"
                   " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (producer_id)"
                   " DO UPDATE SET " + ", ".join(
                       f"{column} = excluded.{column}" for column in
                       (c.strip() for c in PRODUCER_COLUMNS.split(",")[1:])))
UPSERT_PRODUCER_KEY = ("INSERT INTO producer_keys (producer_id, epoch, session_key) VALUES (?, ?, ?)"
                       " ON CONFLICT (producer_id) DO UPDATE SET epoch = excluded.epoch,"
                       " session_key = excluded.session_key")
# A producer's state and its current session's key (NULL: none, or another epoch's).
SELECT_PRODUCER = ("SELECT " + ", ".join(f"p.{c.strip()}" for c in PRODUCER_COLUMNS.split(","))
                   + ", k.session_key FROM producers p LEFT JOIN producer_keys k"
                     " ON k.producer_id = p.producer_id AND k.epoch = p.epoch"
                     " WHERE p.producer_id = ?")
# A page of producers after an id, in SELECT_PRODUCER's row shape (whatever it
# joins): `bus-cli producers ls`.
LIST_PRODUCERS = SELECT_PRODUCER.rpartition("= ?")[0] + "> ? ORDER BY 1 LIMIT ?"
UPSERT_CONSUMER = ("INSERT INTO consumers (name, last_id, updated_ns, owner, prefixes)"
                   " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                   " last_id = excluded.last_id, updated_ns = excluded.updated_ns,"
                   " owner = excluded.owner, prefixes = excluded.prefixes")
DELETE_CONSUMER = "DELETE FROM consumers WHERE name = ?"


def producer_rows(rows: Sequence[tuple[Any, ...]]
                  ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Producer states (ProducerState.row: the producers columns, then the
    session key of a session just opened, or None) as the rows of producers
    and of producer_keys."""
    return ([row[:-1] for row in rows],
            [(row[0], row[9], row[-1]) for row in rows if row[-1] is not None])


def write_producers(conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
    """Producer states, see producer_rows."""
    states, keys = producer_rows(rows)
    if states:
        conn.executemany(UPSERT_PRODUCER, states)
    if keys:
        conn.executemany(UPSERT_PRODUCER_KEY, keys)


def load_producer(conn: Any, producer_id: str) -> tuple[Any, ...] | None:
    return conn.execute(SELECT_PRODUCER, (producer_id,)).fetchone()


def list_producers(conn: Any, after: str, limit: int) -> list[tuple[Any, ...]]:
    """At most `limit` producer rows with ids after `after`, in id order."""
    return conn.execute(LIST_PRODUCERS, (after, limit)).fetchall()


def count_producers(conn: Any) -> int:
    return conn.execute("SELECT count(*) FROM producers").fetchone()[0]


def producers_by_owner(conn: Any) -> dict[str, int]:
    """How many producer ids each key owns (CURVE): the writer's quota counts
    start from it."""
    return dict(conn.execute("SELECT owner, count(*) FROM producers WHERE owner IS NOT NULL"
                             " GROUP BY owner").fetchall())


def consumer_params(row: ConsumptionRow) -> tuple[Any, ...]:
    """UPSERT_CONSUMER's parameters (or DELETE_CONSUMER's, for a deletion)."""
    name, position, updated_ns, owner, prefixes = row
    if position is None:
        return (name,)
    return (name, position, updated_ns, owner,
            None if prefixes is None else msgpack.packb(list(prefixes)))


def write_consumptions(conn: Any, rows: Sequence[ConsumptionRow]) -> None:
    for row in rows:
        conn.execute(DELETE_CONSUMER if row[1] is None else UPSERT_CONSUMER,
                     consumer_params(row))


def load_consumers(conn: Any) -> dict[str, StoredConsumer]:
    """name -> (last_id, updated_ns, owner, prefixes) of every durable consumer."""
    return {name: (last_id, updated_ns, owner,
                   None if prefixes is None else tuple(msgpack.unpackb(bytes(prefixes))))
            for name, last_id, updated_ns, owner, prefixes in
            conn.execute("SELECT name, last_id, updated_ns, owner, prefixes FROM consumers")}
