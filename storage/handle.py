"""What the writer's handles on both engines share (sqlite.Store,
postgres.PgStore): reads of its own state at start, and retention in a
transaction of its own. A subclass gives `conn` and `transaction()`."""

from __future__ import annotations

import contextlib
from typing import Any

from storage import messages, retention, sessions


class WriterHandle:
    conn: Any

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def heartbeat(self, now: float) -> None:
        """Keep the session alive and find it lost (PostgreSQL: PgStore);
        SQLite has no session to lose."""

    def heartbeat_due_ms(self, now: float) -> int | None:
        """In how long `heartbeat` has something to do (None: never)."""
        return None

    def delete_expired(self, before_ns: int | None, keep: int | None, chunk: int,
                       upto: int | None = None) -> int:
        """retention.delete_expired in a transaction of its own."""
        with self.transaction() as conn:
            return retention.delete_expired(conn, before_ns, keep, chunk, upto)

    def load_consumers(self) -> dict[str, sessions.StoredConsumer]:
        return sessions.load_consumers(self.conn)

    def load_producer(self, producer_id: str) -> tuple[Any, ...] | None:
        return sessions.load_producer(self.conn, producer_id)

    def producers_by_owner(self) -> dict[str, int]:
        return sessions.producers_by_owner(self.conn)

    def list_producers(self, after: str, limit: int) -> list[tuple[Any, ...]]:
        return sessions.list_producers(self.conn, after, limit)

    def count_producers(self) -> int:
        return sessions.count_producers(self.conn)

    def first_message_id(self) -> int | None:
        return messages.first_id(self.conn)

    def last_message_id(self) -> int | None:
        return messages.last_id(self.conn)
