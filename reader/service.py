"""bus-reader: pages of stored messages, served from a read-only connection.

Binds ROUTER read_endpoint   `history`, `utxo_stats`, `anchor_proof`, `stats`, `ping`

History reads never touch the write path: this is its own process (its own
core and GIL) with its own read-only SQLite connection, and WAL lets it read
while the writer commits. Every request is one short read transaction bounded
in rows (BUS_HISTORY_PAGE_ROWS), bytes (BUS_HISTORY_PAGE_BYTES) and rows
examined for a topic filter (BUS_HISTORY_SCAN_ROWS): a snapshot held for long
would keep the writer's checkpoints from recycling the WAL. A client pages on
with the reply's `after_id`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from bus import control, protocol, security, sockets
from bus.build import build_info
from bus.config import BusConfig
from bus.http import HttpSide, Series, connection_series, control_series
from bus.logging import RateLimitedLog, get_logger
from bus.runner import StopSignal
from proofs.document import make_proof
from proofs.merkle import MerkleTree
import storage
from reader.health import database_health, reader_health
from storage import NotReadable, anchors, messages, utxos

log = get_logger("reader")

MAX_PREFIXES = 64


# Most topic groups one `topics` reply lists (the most recently active first).
MAX_TOPIC_GROUPS = 1000

# Each read is one transaction bounded in time, since a snapshot held open
# keeps the writer from starting the WAL over (storage/sqlite.py: past its
# bound the writer waits up to BUS_SQLITE_BUSY_TIMEOUT_MS, 200 ms, for readers
# to let go). A topic-filtered page examines its rows in windows of
# SCAN_WINDOW_ROWS ids and stops after the window that ends past
# READ_BUDGET_S (the client pages on from the reply's after_id); SQLite
# interrupts whatever still runs at READ_MAX_S (read_failed: retry). A page of
# 64 prefixes over 200,000 rows took 0.5 s here, 1.8 s under load, back to
# back: the WAL grew to 1 GB.
READ_BUDGET_S = 0.02
SCAN_WINDOW_ROWS = 5_000
READ_MAX_S = 0.5


class ProofUnavailable(ValueError):
    """The stored records of an anchor do not add up (a damaged database)."""


# What the reader's /metrics shows (bus/http.py), read from its `stats`.
HTTP_SERIES = [
    Series("pages_served", "counter", "history pages served", lambda s: s["requests"]),
    Series("rows_served", "counter", "messages served in history pages",
           lambda s: s["rows_served"]),
    Series("max_page_seconds", "gauge", "longest history page query",
           lambda s: s["max_page_ms"] / 1000),
    Series("database_readable", "gauge", "1 while the database can be read",
           lambda s: int(s["database_error"] is None)),
    Series("replica_behind_bytes", "gauge", "on a PostgreSQL hot standby: bytes of the "
           "primary's WAL not replayed yet (0 elsewhere)",
           lambda s: (s["replica"] or {}).get("behind_bytes") or 0),
    Series("replica_behind_seconds", "gauge", "on a PostgreSQL hot standby: age of the newest "
           "replayed commit while more is to come (0 elsewhere)",
           lambda s: (s["replica"] or {}).get("behind_s") or 0),
    *control_series(),
    *connection_series(),
]


class History:
    """History queries on a read-only connection, opened on first use: the
    reader may start before the writer has created the database."""

    def __init__(self, path: str, page_rows: int, page_bytes: int, scan_rows: int,
                 busy_timeout_ms: int) -> None:
        self.path = path
        self.page_rows = page_rows
        self.page_bytes = page_bytes
        self.scan_rows = scan_rows
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: Any = None
        self.errors = storage.errors_of(path)[1]

    def connection(self) -> Any:
        if self._conn is None:
            self._conn = storage.open_read_only(self.path, self.busy_timeout_ms)
        return self._conn

    def page(self, prefixes: list[str], after_id: int | None = None,
             since_ns: int | None = None, limit: int | None = None) -> dict[str, Any]:
        """Messages with id > after_id (or committed at/after since_ns, or all),
        whose topic starts with one of `prefixes`, oldest first."""
        conn = self.connection()
        limit = self.page_rows if limit is None else max(1, min(limit, self.page_rows))
        prefixes = [p for p in prefixes if p] if "" not in prefixes else []
        started = time.monotonic()
        # One snapshot for the page and its bounds, bounded in time (READ_MAX_S).
        with storage.snapshot(conn, READ_MAX_S):
            first_id, last_id = messages.id_range(conn)
            last_id = last_id or 0
            if after_id is None:
                after_id = messages.id_before(conn, since_ns, first_id, last_id) \
                    if since_ns is not None else 0
            # A topic filter may match few rows: examine at most scan_rows of them.
            upto = min(last_id, after_id + self.scan_rows) if prefixes else last_id
            if prefixes:
                rows, full, upto = self._scan(conn, after_id, upto, prefixes, limit,
                                              started + READ_BUDGET_S)
            else:
                rows, size = messages.page(conn, after_id, upto, prefixes, limit,
                                           self.page_bytes)
                full = size >= self.page_bytes
        if full or len(rows) == limit:
            after_id = rows[-1][0]
        else:
            after_id = max(after_id, upto)  # everything up to `upto` was examined
        return {"messages": rows, "after_id": after_id, "first_id": first_id,
                "last_id": last_id, "more": after_id < last_id}

    def _scan(self, conn: Any, after_id: int, upto: int, prefixes: list[str], limit: int,
              deadline: float) -> tuple[list[tuple[Any, ...]], bool, int]:
        """(rows, page full (in rows or bytes), examined up to) of a
        topic-filtered page: windows of SCAN_WINDOW_ROWS ids, up to `upto`,
        until the page is full or the window that ends past `deadline`."""
        rows: list[tuple[Any, ...]] = []
        size, examined = 0, after_id
        while examined < upto:
            window = min(upto, examined + SCAN_WINDOW_ROWS)
            found, found_bytes = messages.page(conn, examined, window, prefixes,
                                               limit - len(rows), self.page_bytes - size)
            rows += found
            size += found_bytes
            if size >= self.page_bytes or len(rows) == limit:
                return rows, True, examined
            examined = window
            if time.monotonic() >= deadline:
                break
        return rows, False, examined

    def replication(self) -> dict[str, Any] | None:
        """A hot standby's lag (storage/postgres.replication); None on SQLite
        or a primary."""
        conn = self.connection()
        if getattr(conn, "dialect", "sqlite") != "postgresql":
            return None
        from storage import postgres
        return postgres.replication(conn)

    def utxo_stats(self) -> dict[str, Any]:
        return self._snapshot(utxos.summarize)

    def proof(self, document_hash: bytes) -> dict[str, Any] | None:
        """A document's inclusion proof (proofs/document.py), or None if it is
        not anchored. Rebuilds its anchor's tree from the stored leaves."""
        found = self._snapshot(lambda conn: anchors.proof_rows(conn, document_hash))
        if found is None:
            return None
        anchor, index, ref, leaves = found
        tree = MerkleTree(leaves)
        if tree.root != anchor["root"]:
            raise ProofUnavailable(f"anchor {anchor['anchor_id']}: its stored leaves do not "
                                   "give its root")
        return make_proof(document_hash, index, tree.size, tree.path(index), anchor, ref)

    def topics(self, depth: int) -> dict[str, Any]:
        """Messages and last activity per topic prefix (the first `depth`
        dot-separated parts) among the newest `scan_rows` messages: bounded in
        cost whatever the table's size."""
        def read(conn: Any) -> dict[str, Any]:
            last_id = messages.last_id(conn) or 0
            after_id = max(0, last_id - self.scan_rows)
            groups: dict[str, list[int]] = {}
            for topic, count, newest_id, newest_ns in messages.topic_counts(conn, after_id):
                name = ".".join(topic.split(".")[:depth])
                group = groups.setdefault(name, [0, 0, 0])
                group[0] += count
                group[1] = max(group[1], newest_id)
                group[2] = max(group[2], newest_ns)
            ordered = sorted(groups.items(), key=lambda item: -item[1][1])
            return {"after_id": after_id, "last_id": last_id,
                    "topics": [[name, *values] for name, values in ordered[:MAX_TOPIC_GROUPS]],
                    "truncated": len(ordered) > MAX_TOPIC_GROUPS}
        return self._snapshot(read)

    def _snapshot(self, read: Callable[[Any], Any]) -> Any:
        conn = self.connection()
        with storage.snapshot(conn, READ_MAX_S):
            return read(conn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def parse_history_args(args: dict[str, Any]) -> dict[str, Any]:
    """Validate a `history` request's args; raises RequestError-compatible ValueError."""
    prefixes = args.get("prefixes", [""])
    if not (isinstance(prefixes, list) and 0 < len(prefixes) <= MAX_PREFIXES
            and all(isinstance(p, str) and "\x00" not in p for p in prefixes)):
        # No NUL: no stored topic has one (and PostgreSQL could not compare it).
        raise ValueError(f"'prefixes' must be a list of 1-{MAX_PREFIXES} strings, no NUL")
    parsed: dict[str, Any] = {"prefixes": prefixes}
    for key in ("after_id", "since_ns", "limit"):
        value = args.get(key)
        if value is not None:
            if type(value) is not int or value < 0:
                raise ValueError(f"'{key}' must be a non-negative integer")
            parsed[key] = value
    if "after_id" in parsed and "since_ns" in parsed:
        raise ValueError("give 'after_id' or 'since_ns', not both")
    return parsed


class Reader:
    name = "reader"
    # What /healthz answers from; what the systemd watchdog is pinged by.
    health = staticmethod(reader_health)
    watchdog_health = staticmethod(database_health)

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.history = History(config.db, config.history_page_rows, config.history_page_bytes,
                               config.history_scan_rows, config.sqlite_busy_timeout_ms)
        self.requests = 0
        self.rows_served = 0
        self.max_page_ms = 0.0
        # The reader's commands (docs/protocol.md, "Control requests"): readers' and admins'.
        reads = (protocol.READ_FAILED, protocol.UNAVAILABLE)
        self.dispatcher = control.Dispatcher([
            control.Command("history", self._history, roles=(security.READERS,),
                            args=("prefixes", "after_id", "since_ns", "limit"), errors=reads),
            control.Command("anchor_proof", self._anchor_proof, roles=(security.READERS,),
                            args=("hash",), errors=(protocol.PROOF_FAILED, *reads)),
            control.Command("topics", self._topics, roles=(security.READERS,), args=("depth",),
                            errors=reads),
            control.Command("utxo_stats", lambda _request: self._read(self.history.utxo_stats),
                            roles=(security.READERS,), errors=reads),
            control.Command("stats", lambda _request: self.snapshot(),
                            roles=(security.READERS,))], log, config, domain="read")
        self._started = time.monotonic()
        self._rejects = RateLimitedLog(log)
        self.ctx: zmq.Context | None = None
        self.http: HttpSide | None = None

    def initialize(self, stop: StopSignal) -> None:
        cfg = self.config
        self.stop = stop
        self.ctx = zmq.Context()
        self.auth = security.start_authenticator(self.ctx, cfg)
        self.guard = sockets.PeerMemoryGuard(cfg.reader_memory_limit_bytes, log,
                                             sockets.connection_cap(cfg, 1, log))
        self.rep = sockets.open_reader(self.ctx, cfg, self.guard.watch("read", cfg.read_endpoint))
        if cfg.reader_http:
            self.http = HttpSide("reader", cfg.reader_http, HTTP_SERIES, reader_health)
        self.poller = zmq.Poller()
        self.poller.register(self.rep, zmq.POLLIN)
        self.poller.register(stop.fileno(), zmq.POLLIN)
        log.info("started", **build_info(),
                 db=storage.redact(cfg.db), read_endpoint=cfg.read_endpoint,
                 config_source=cfg.source, config=cfg.public())

    def loop(self, now: float | None = None) -> None:
        # Polls at the guard's pace: what grows the reader unseen (an endless
        # request) wakes no poll.
        events = dict(self.poller.poll(int(self.guard.memory.interval_s * 1000)
                                       if self.guard.memory.limit else 1000))
        if self.stop.fileno() in events:
            self.stop.clear_wakeup()
        if self.rep in events:
            self.dispatcher.serve(self.rep)
        self.guard.check(time.monotonic() if now is None else now)

    def handle(self, frames: list[bytes]) -> bytes:
        return self.dispatcher.handle(frames)

    def _history(self, request: control.Request) -> dict[str, Any]:
        try:
            query = parse_history_args(request.args)
        except ValueError as exc:
            raise control.CommandFailed(protocol.BAD_REQUEST, str(exc), bad_input=True) from None
        return self._read(self.serve_page, query)

    def _anchor_proof(self, request: control.Request) -> dict[str, Any] | None:
        document = request.args.get("hash")
        if not (isinstance(document, bytes) and len(document) == 32):
            raise control.CommandFailed(protocol.BAD_REQUEST,
                                        "'hash' must be 32 bytes (a SHA-256)", bad_input=True)
        return self._read(self.history.proof, document)

    def _topics(self, request: control.Request) -> dict[str, Any]:
        depth = request.args.get("depth", 2)
        if type(depth) is not int or not 1 <= depth <= 16:
            raise control.CommandFailed(protocol.BAD_REQUEST, "'depth' must be 1-16",
                                        bad_input=True)
        return self._read(self.history.topics, depth)

    def _read(self, query: Callable[..., Any], *args: Any) -> Any:
        """Run a query, turning what the database says into an error code the
        client can act on (retry)."""
        try:
            return query(*args)
        except NotReadable as exc:
            self._rejects.warning(protocol.UNAVAILABLE, "database_unavailable", error=str(exc))
            raise control.CommandFailed(protocol.UNAVAILABLE, str(exc)) from None
        except ProofUnavailable as exc:
            self._rejects.warning(protocol.PROOF_FAILED, "proof_failed", error=str(exc))
            raise control.CommandFailed(protocol.PROOF_FAILED, str(exc)) from None
        except self.history.errors as exc:  # busy, I/O: the client may retry
            self.history.close()
            self._rejects.warning(protocol.READ_FAILED, "read_failed", error=str(exc),
                                  error_type=type(exc).__name__)
            raise control.CommandFailed(protocol.READ_FAILED, str(exc)) from None

    def serve_page(self, query: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        page = self.history.page(**query)
        self.requests += 1
        self.rows_served += len(page["messages"])
        self.max_page_ms = max(self.max_page_ms, (time.perf_counter() - started) * 1000)
        return page

    def status_line(self) -> str:
        return f"served {self.requests:,} history pages, {self.rows_served:,} rows"

    def snapshot(self) -> dict[str, Any]:
        """stats, whether the database can be read now (one indexed lookup),
        and on a PostgreSQL hot standby how far it is behind its primary."""
        replica = None
        try:
            self._read(lambda: messages.last_id(self.history.connection()))
            replica = self._read(self.history.replication)
            error = None
        except control.CommandFailed as exc:
            error = exc.reason
        return {**self.stats(), "database_error": error, "replica": replica,
                "max_lag_s": self.config.reader_max_lag_s}

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "rows_served": self.rows_served,
                "control": self.dispatcher.counters.snapshot(),
                "memory": self.guard.snapshot() if getattr(self, "guard", None) else None,
                "connections": self.guard.connections() if getattr(self, "guard", None)
                else {},
                "max_page_ms": round(self.max_page_ms, 3),
                "uptime_seconds": round(time.monotonic() - self._started, 3),
                "build": build_info(),
                "database": storage.redact(self.config.db),
                "read_endpoint": self.config.read_endpoint,
                "security": security.snapshot(self.config)}

    def shutdown(self) -> None:
        if self.ctx is not None:
            if getattr(self, "guard", None) is not None:
                self.guard.close()
            if getattr(self, "rep", None) is not None:
                self.rep.close(linger=0)
            if getattr(self, "auth", None) is not None:
                self.auth.stop()
            self.ctx.term()
            self.ctx = None
        self.history.close()
