"""HistoryClient: pages of stored messages from the reader."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from bus import protocol, security
from bus.client.control import ControlClient
from bus.config import BusConfig, load_config
from bus.protocol import Message


@dataclass(frozen=True)
class HistoryPage:
    rows: list[list[Any]]  # as the reader sent them: see protocol.HISTORY_ROW_FIELDS
    after_id: int          # ask for the next page after this id
    last_id: int           # the newest stored id when the page was read
    more: bool             # more stored messages after `after_id`

    @property
    def messages(self) -> list[Message]:
        return [protocol.message_from_row(row) for row in self.rows]


class HistoryClient:
    """Reads pages of stored messages from the reader (`bus-cli reader`)."""

    def __init__(self, config: BusConfig | None = None, *, endpoint: str | None = None,
                 context: zmq.Context | None = None, timeout_ms: int | None = None,
                 retries: int = 1) -> None:
        config = config or load_config()
        self.config = config
        self._client = ControlClient(endpoint or config.read_endpoint,
                                     timeout_ms or config.request_timeout_ms, retries, context,
                                     security.client_keys(config))

    def page(self, prefixes: Iterable[str] = ("",), *, after_id: int | None = None,
             since_ns: int | None = None, limit: int | None = None) -> HistoryPage:
        """Messages with id > after_id, or committed at/after since_ns, or from the
        oldest; the reader bounds the page (rows, bytes, rows examined)."""
        self.request_page(prefixes, after_id=after_id, since_ns=since_ns, limit=limit)
        return self.collect_page()

    def request_page(self, prefixes: Iterable[str] = ("",), *, after_id: int | None = None,
                     since_ns: int | None = None, limit: int | None = None) -> None:
        """Ask for a page without waiting for it (see collect_page): a replay
        converts one page while the reader reads the next."""
        args: dict[str, Any] = {"prefixes": list(prefixes) or [""]}
        for key, value in (("after_id", after_id), ("since_ns", since_ns), ("limit", limit)):
            if value is not None:
                args[key] = value
        self._client.send("history", args)

    def collect_page(self) -> HistoryPage:
        result = self._client.result()
        return HistoryPage(result["messages"], result["after_id"], result["last_id"],
                           result["more"])

    @property
    def waiting(self) -> bool:
        return self._client.waiting

    def messages(self, prefixes: Iterable[str] = ("",), *, after_id: int | None = None,
                 since_ns: int | None = None, limit: int | None = None) -> Iterator[Message]:
        """Every stored message from the start point to the newest, page by page
        (at most `limit`); the next page is read while this one is consumed."""
        prefixes = list(prefixes)
        page = self.page(prefixes, after_id=after_id, since_ns=since_ns, limit=limit)
        left = limit
        while True:
            rows = page.rows if left is None else page.rows[:left]
            if left is not None:
                left -= len(rows)
            if page.more and left != 0:
                self.request_page(prefixes, after_id=page.after_id, limit=left)
            yield from map(protocol.message_from_row, rows)
            if not page.more or left == 0:
                return
            page = self.collect_page()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HistoryClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def since_to_ns(since: dt.datetime | dt.timedelta | int | float) -> int:
    """A start time as ns since the epoch: a datetime, a timedelta ago, or
    seconds since the epoch (int/float). Clamped to 0..2^63-1, what the wire
    carries: before the epoch is "everything", far in the future "nothing yet"."""
    if isinstance(since, dt.timedelta):
        ns = time.time_ns() - int(since.total_seconds() * 1e9)
    elif isinstance(since, dt.datetime):
        if since.tzinfo is None:
            raise ValueError("since: give an aware datetime (with a time zone)")
        ns = int(since.timestamp() * 1e9)
    else:
        ns = int(since * 1e9)
    return min(max(ns, 0), protocol.MAX_INT64)
