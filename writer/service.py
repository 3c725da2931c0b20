"""bus-writer: the only process that writes the SQLite database.

Binds PULL capture_endpoint   the proxy's capture pipe: data messages
                              (untrusted: never commands)
Binds REP  control_endpoint   trusted commands: `stats`, `flush`, `ping`, producer
                              sessions (`producer_open`, `producer_status`; the
                              admins' `producers_list`, `producer_info`,
                              `producer_remove`), the
                              durable consumers' `consumer_ack` / `consumer_get` /
                              `consumer_delete`, the wallet's `utxo_*`
                              (reservations and sync, writer/utxos.py) and the
                              `anchor_*` records (writer/anchors.py)
Binds XPUB notify_endpoint    $bus.nack.<producer> for refused messages, then
                              $bus.ack.<producer> and $bus.commit after each commit;
                              a new acknowledgement subscription gets the
                              producer's current acknowledgement

Messages are validated, buffered and committed in batches: one transaction per
BATCH_SIZE rows, or when the oldest row has waited BATCH_FLUSH_INTERVAL_MS, or
at once when the socket is idle and the load is low. BATCH_WRITE_ENABLED=false
commits every message on its own. On SIGTERM/SIGINT the writer drains the
capture until it has been quiet for BUS_DRAIN_IDLE_MS (at most 5 such periods:
the rest stays queued in the proxy), flushes, closes the database and exits 0.
Retention (BUS_RETENTION_*) deletes the oldest messages in chunks, each its own
transaction between batches, so ingest never waits for more than one chunk.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import zmq

from bus import control, protocol, security, sockets
from bus.config import DRAIN_WINDOW_IDLES, BusConfig
from bus.http import HttpSide, Series, connection_series, control_series
from bus.logging import RateLimitedLog, get_logger
from bus.runner import StopSignal, release_free_memory
from writer.anchors import AnchorBook
from writer.audit import AuditBook
from writer.batch import BatchBuffer, BatchMetrics, LoadMeter
from writer.commands import writer_table
from writer.consumers import ConsumerPositions
from writer.health import writer_health
from writer.producers import MAX_SEQ_AHEAD, NotAuthentic, ProducerLedger, ProducerState, describe
from writer.quotas import KeyQuotas
import storage
from storage import audit as audit_rows
from writer.utxos import UtxoBook

log = get_logger("writer")

# After a failed flush, wait this long before trying again.
FLUSH_RETRY_SECONDS = 0.5
# Retention runs this often when it has nothing left to delete, else every loop.
RETENTION_IDLE_SECONDS = 1.0
# Most producers one `producers_list` answers.
MAX_PRODUCERS_LISTED = 1000
# Expired UTXO leases go back to the pool, and old utxo_* replies are pruned, this often.
UTXO_UPKEEP_SECONDS = 1.0
# Frames read from the notify endpoint per loop pass at most: a peer that floods
# it must not starve the capture, and its subscriptions must be counted about
# as fast as libzmq takes them in (it does so whenever the socket is used).
NOTIFY_READS_PER_PASS = 10_000
# Topic bytes of the subscriptions the notify endpoint may hold (as counted from
# what XPUB_VERBOSER passes on) before it is reopened: libzmq cannot refuse or
# count them, and its trie takes about 50 bytes per subscribed byte (1 MiB:
# about 17,000 clients with their ack and nack subscriptions; 50 MB at worst).
NOTIFY_SUBSCRIPTION_BUDGET_BYTES = 1 << 20
# zmq.NOBLOCK as a plain int: pyzmq converts its Python enum at every call,
# 0.05 us each, three calls a message in drain_capture.
NOBLOCK = int(zmq.NOBLOCK)
# pyzmq's send without its Python wrapper (see Writer._notify_send).
_backend_send = zmq.backend.Socket.send
COMMIT_TOPIC = protocol.COMMIT_TOPIC.encode()
# A client's subscription to its acknowledgements, as the notify XPUB passes it on.
ACK_SUBSCRIPTION = bytes((protocol.SUBSCRIBE,)) + protocol.ACK_TOPIC_PREFIX.encode()
# The reason a nack gives for the refusals that only the writer decides.
REFUSAL_REASONS = {
    protocol.PRODUCER_FENCED: "a newer session of this producer was opened (producer_open): "
                              "this one is fenced",
    protocol.UNKNOWN_SESSION: "this writer never opened this epoch: open a new session",
    protocol.SEQ_OUT_OF_WINDOW: f"seq more than {MAX_SEQ_AHEAD:,} above the highest one of "
                                "this producer: not stored, and not decided",
}


# Refusals whose meta names no session: it is not a msgpack map (the one
# refused_session would read again, and fail on, as decode_meta did).
UNATTRIBUTABLE = frozenset({protocol.META_NOT_MSGPACK, protocol.META_NOT_MAP})


# What the writer's /metrics shows (bus/http.py), read from its `stats`.
HTTP_SERIES = [
    Series("messages_received", "counter", "messages read from the capture pipe",
           lambda s: s["ingest"]["messages_received"]),
    Series("messages_rejected", "counter", "messages not stored, by reason",
           lambda s: s["ingest"]["rejected"], "reason"),
    Series("messages_nacked", "counter", "refusals sent to producers, by code",
           lambda s: s["ingest"]["nacked"], "code"),
    Series("rows_committed", "counter", "rows committed (messages and consumer positions)",
           lambda s: s["batch"]["total_writes"]),
    Series("flushes", "counter", "batch commits, by reason",
           lambda s: {reason[len("flush_by_"):]: n for reason, n in s["batch"].items()
                      if reason.startswith("flush_by_")}, "reason"),
    Series("flush_errors", "counter", "failed commits (retried)",
           lambda s: s["batch"]["flush_errors"]),
    Series("buffered_messages", "gauge", "rows waiting for a commit",
           lambda s: s["batch"]["db_queue_size"]),
    Series("backlog_bytes", "gauge", "bytes of messages waiting for a commit",
           lambda s: s["backlog"]["bytes"]),
    Series("commits_failing_seconds", "gauge", "how long commits have been failing (0: they "
           "succeed)", lambda s: s["backlog"]["failing_for_s"] or 0),
    Series("load_messages_per_second", "gauge", "messages to store per second over the load "
           "window",
           lambda s: s["load"]["requests_per_second"]),
    Series("last_message_id", "gauge", "id of the newest stored message",
           lambda s: s["database"]["last_message_id"] or 0),
    Series("wal_bytes", "gauge", "size of the -wal file", lambda s: s["wal"].get("bytes", 0)),
    Series("producers_with_missing", "gauge", "producers with holes in their sequences",
           lambda s: s["producers"]["with_missing"]),
    Series("consumers", "gauge", "durable consumers", lambda s: s["consumers"]["count"]),
    Series("notify_subscribed_bytes", "gauge", "bytes of subscriptions held at the notify "
           "endpoint", lambda s: s["notify"]["subscribed_bytes"]),
    Series("memory_cutoffs", "counter", "times the capture, notify and control connections were "
           "dropped over the memory limit", lambda s: s["memory"]["cutoffs"]),
    Series("quota_refusals", "counter", "requests refused by a quota per key, by quota",
           lambda s: s["quotas"]["refused"], "quota"),
    Series("messages_not_authentic", "counter", "session messages without their session key's mac",
           lambda s: s["security"]["messages_not_authentic"]),
    *control_series(),
    *connection_series(),
]


def batch_page(stats: dict[str, Any]) -> dict[str, Any]:
    """GET /metrics/batch, in the origin design's shape (docs/protocol.md)."""
    batch = stats["batch"]
    config = batch["config"]
    return {"batch_enabled": config["enabled"],
            "metrics": {key: value for key, value in batch.items()
                        if key not in ("buffer_sizes", "db_queue_size", "config")},
            "buffer_sizes": batch["buffer_sizes"], "db_queue_size": batch["db_queue_size"],
            "config": {"batch_size": config["batch_size"],
                       "flush_interval_ms": config["flush_interval_ms"],
                       "max_buffer_size": config["max_buffer_size"]}}


def load_page(stats: dict[str, Any]) -> dict[str, Any]:
    """GET /metrics/load, in the origin design's shape."""
    return {"load_monitoring_enabled": True, **stats["load"]}


@contextlib.contextmanager
def consumer_errors(quotas: KeyQuotas | None = None, user: str | None = None) -> Iterator[None]:
    """writer/consumers.py's refusals, a quota's counted and named by `quotas`."""
    try:
        yield
    except control.CommandFailed as exc:
        if exc.code == protocol.QUOTA_EXCEEDED and quotas is not None and user is not None:
            raise quotas.refuse("consumers_per_key", user, exc.reason) from None
        raise


def producer_arg(request: control.Request) -> str:
    producer = request.args.get("producer")
    if not protocol.is_producer_id(producer):
        raise control.CommandFailed(
            protocol.BAD_REQUEST,
            f"'producer' must be a string of 1-{protocol.MAX_PRODUCER_CHARS} chars",
            bad_input=True)
    return producer


class Writer:
    name = "writer"
    # What /healthz answers from, and what the systemd watchdog is pinged by.
    health = staticmethod(writer_health)

    def __init__(self, config: BusConfig) -> None:
        cfg = config
        self.config = cfg
        self.buffer = BatchBuffer(cfg.batch_size if cfg.batch_write_enabled else 1,
                                  cfg.batch_flush_interval_ms / 1000.0, cfg.batch_max_buffer_size,
                                  cfg.batch_max_buffer_bytes)
        self.metrics = BatchMetrics()
        self.load = LoadMeter(cfg.batch_low_load_threshold, cfg.batch_load_window_seconds)
        self.rejected: dict[str, int] = {}
        self.messages_received = 0
        self.forged = 0     # session messages without their session key's mac
        self.nacked: dict[str, int] = {}
        self.notify_subscribed_bytes = 0  # an estimate: see handle_notify_subscriptions
        self.notify_drops = 0
        self.guard = sockets.PeerMemoryGuard(cfg.writer_memory_limit_bytes, log)
        self.http: HttpSide | None = None
        self._retry_at = 0.0
        self._failing_since: float | None = None  # first failed commit of a failing run
        self._last_error: str | None = None
        self._part_rows: int | None = None  # after a full disk: rows per transaction
        self._retention_at = 0.0
        self._utxo_upkeep_at = 0.0
        self.retention = {"deleted_total": 0, "chunks": 0, "errors": 0,
                          "last_chunk_ms": 0.0, "max_chunk_ms": 0.0}
        self._drain_ns = 0
        self._started = time.monotonic()
        self._rejects = RateLimitedLog(log)
        self.ctx: zmq.Context | None = None
        self.store: Any = None  # storage.open_store: sqlite.Store or postgres.PgStore

    # --- life cycle ---------------------------------------------------------

    def initialize(self, stop: StopSignal) -> None:
        cfg = self.config
        self.stop = stop
        # Endpoints first: a port in use stops the writer before it creates a database.
        self.ctx = zmq.Context()
        self.auth = security.start_authenticator(self.ctx, cfg)
        # Each bound endpoint (capture, control, notify) held to BUS_MAX_CONNECTIONS.
        self.guard.max_connections = sockets.connection_cap(cfg, 3, log)
        watch = self.guard.watch  # peers watched from before each socket binds
        self.capture = sockets.open_writer_capture(self.ctx, cfg,
                                                   watch("capture", cfg.capture_endpoint))
        self.control = sockets.open_writer_control(self.ctx, cfg,
                                                   watch("control", cfg.control_endpoint))
        self.notify = sockets.open_writer_notify(self.ctx, cfg,
                                                 watch("notify", cfg.notify_endpoint))
        if cfg.writer_http:
            self.http = HttpSide("writer", cfg.writer_http, HTTP_SERIES, writer_health,
                                 {"/metrics/batch": batch_page, "/metrics/load": load_page})
            self.commit_seconds = self.http.histogram(
                "batch_commit_seconds", "time to commit one batch",
                (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
            self.batch_rows = self.http.histogram(
                "batch_rows", "rows in one committed batch",
                (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000))
            self.batch_wait_seconds = self.http.histogram(
                "batch_wait_seconds", "how long the oldest row of a batch waited in the writer "
                "before its commit (the writer's part of acknowledgement latency)",
                (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.store = storage.open_store(cfg.db, cfg.sqlite_synchronous,
                                        cfg.sqlite_busy_timeout_ms)
        if getattr(self.store, "readable_by_others", False):
            log.warning("database_readable_by_others", db=storage.describe(cfg.db),
                        reason="its session keys (producer_keys) let whoever reads them send "
                               "in a producer's name: chmod 600 it and its -wal and -shm files")
        self.producers = ProducerLedger(self.store.load_producer)
        self.consumers = ConsumerPositions(self.store.load_consumers(), cfg.max_consumers,
                                           cfg.max_consumers_per_key)
        keys = security.keyring(cfg)
        self.quotas = KeyQuotas(cfg, self.store.producers_by_owner(), log,
                                lambda key: keys is not None and
                                security.ADMINS in keys.roles_of(key))
        self.utxos = UtxoBook(self.store.conn, self.store.transaction, cfg.utxo_max_lease_s,
                              cfg.utxo_request_ttl_s)
        self.anchors = AnchorBook(self.store.conn, self.utxos.spend)
        self.audit = AuditBook(self.store.conn)
        if not cfg.audit_prefixes and audit_rows.last_sealed_id(self.store.conn):
            log.warning("retention_ignores_seals", reason="the database has audit seals and "
                        "BUS_AUDIT_PREFIXES is not set here: retention does not wait for the "
                        "seals (set it as the anchor worker has it)")
        self.dispatcher = control.Dispatcher(
            self.control_commands(), log, cfg, authorized=True,
            retryable=self.store.transient_errors,
            admit=lambda request: self.quotas.admit_request(request, time.monotonic()),
            admit_bytes=lambda user, size: self.quotas.admit_bytes(user, size,
                                                                   time.monotonic()))
        # Notifications owed to producer sessions, with the session's MAC (None:
        # an epoch whose key the writer does not hold, sent without a mac).
        self._owed_nacks: list[tuple[protocol.SessionMac | None, dict[str, Any]]] = []
        # By (producer, epoch): a session ended in this pass (producer_remove,
        # producer_open) still gets the acknowledgement of what was committed.
        self._owed_acks: dict[tuple[str, int], tuple[protocol.SessionMac | None,
                                                     dict[str, Any]]] = {}
        self._owed_commit: dict[str, Any] | None = None
        self.poller = zmq.Poller()
        self.poller.register(self.capture, zmq.POLLIN)
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.notify, zmq.POLLIN)
        self.poller.register(stop.fileno(), zmq.POLLIN)
        # While the buffer is full the capture is not read: its pending input must
        # not wake the poll either, or the loop would spin.
        self.paused_poller = zmq.Poller()
        self.paused_poller.register(self.control, zmq.POLLIN)
        self.paused_poller.register(self.notify, zmq.POLLIN)
        self.paused_poller.register(stop.fileno(), zmq.POLLIN)
        log.info("started", db=storage.redact(cfg.db), capture_endpoint=cfg.capture_endpoint,
                 control_endpoint=cfg.control_endpoint, notify_endpoint=cfg.notify_endpoint,
                 config_source=cfg.source, config=cfg.public())

    def loop(self, now: float | None = None) -> None:
        timeout_ms = self._poll_timeout_ms(time.monotonic() if now is None else now)
        poller = self.paused_poller if self.buffer.is_full else self.poller
        events = dict(poller.poll(timeout_ms))
        now = time.monotonic() if now is None else now
        if self.stop.fileno() in events:
            self.stop.clear_wakeup()
        if self.control in events:
            self.dispatcher.serve(self.control)
        if self.notify in events:
            self.handle_notify_subscriptions()
        idle = True
        if self.capture in events:
            idle = self.drain_capture(now)
        self.flush_if_due(now, idle)
        self.send_notifications()
        self.apply_retention(now)
        self.utxo_upkeep(now)
        self.guard_memory(now)

    def shutdown(self) -> None:
        capture = getattr(self, "capture", None)
        unsaved = 0
        if self.store is not None and capture is not None:
            deadline = time.monotonic() + self.config.shutdown_timeout_ms / 1000.0
            self.drain_before_exit(deadline)
            while not self.flush("shutdown", time.monotonic()) and time.monotonic() < deadline:
                time.sleep(FLUSH_RETRY_SECONDS)
            unsaved = len(self.buffer)
            self.send_notifications()
        if self.ctx is not None:
            self.guard.close()
            for sock in (capture, getattr(self, "control", None)):
                if sock is not None:
                    sock.close(linger=0)
            if getattr(self, "notify", None) is not None:
                self.notify.close()  # lingers briefly: the last acknowledgements
            if getattr(self, "auth", None) is not None:
                self.auth.stop()
            self.ctx.term()
            self.ctx = None
        if self.store is not None:
            log.info("database_closed", db=storage.redact(self.config.db),
                     last_message_id=self._stored_ids()[1])
            self.store.close()
            self.store = None
        if unsaved:
            raise RuntimeError(f"{unsaved} buffered rows could not be committed before the "
                               "shutdown deadline (see flush_failed)")

    def drain_before_exit(self, deadline: float) -> None:
        """Read what the proxy already sent until the pipe is quiet, within the
        deadline and for at most DRAIN_WINDOW_IDLES x drain_idle_ms: what is not
        read stays in the proxy's queue for the next writer (except this
        socket's own receive queue). Stops early if commits fail and the buffer
        is full."""
        idle_ms = self.config.drain_idle_ms
        deadline = min(deadline, time.monotonic() + DRAIN_WINDOW_IDLES * idle_ms / 1000.0)
        while time.monotonic() < deadline and not self.buffer.is_full:
            if not self.capture.poll(idle_ms):
                return
            now = time.monotonic()
            self.drain_capture(now)
            if self.buffer.due(now) or self.buffer.is_full:
                self.flush("shutdown", now)

    # --- capture pipe -------------------------------------------------------

    def drain_capture(self, now: float) -> bool:
        """Read until the next flush by size is due; True if the socket ran dry
        or brought nothing to store.

        This loop is the writer's hot path (see bench/). Frames are received as
        zmq.Frame (copy=False) because `Frame.more` is far cheaper than a
        getsockopt(RCVMORE) per frame; `Frame.bytes` then gives the bytes that
        msgpack and SQLite handle fastest.
        """
        recv = self.capture.recv
        noblock, max_frames = NOBLOCK, protocol.MAX_FRAMES  # looked up once a read
        # One transaction per message in sequential mode, but still many messages
        # per poll: the comparison is about commits, not system calls.
        room = max(1, self.buffer.room) if self.config.batch_write_enabled \
            else self.config.batch_size
        self._drain_ns = time.time_ns()  # "last seen" time of producers in this read
        sequential = not self.config.batch_write_enabled
        ingest = self.ingest
        received = 0
        rows_before = len(self.buffer.messages)
        valid_before = self.messages_received
        idle = False
        while received < room:
            try:
                frame = recv(noblock, copy=False)
            except zmq.Again:
                idle = True
                break
            frames = [frame.bytes]
            # ZeroMQ delivers a multipart message whole: the other parts are here.
            while frame.more:
                frame = recv(noblock, copy=False)
                if len(frames) <= max_frames:  # keep enough to reject it
                    frames.append(frame.bytes)
            received += 1
            ingest(frames, now)
            if sequential and self.buffer:
                self.flush("size", now)
        # The load that batching is for is the rows to commit: refused,
        # forged and repeated messages add none. A pass that read none is as
        # good as a dry socket, which a flood of them never leaves: the rows
        # buffered are committed then as at any low load, not after
        # BATCH_FLUSH_INTERVAL_MS (issue 22). (Sequential mode commits each
        # row as it comes: its load is the messages that passed validation.)
        rows = self.messages_received - valid_before if sequential \
            else len(self.buffer.messages) - rows_before
        self.load.record(rows, now)
        return idle or not rows

    def ingest(self, frames: list[bytes], now: float) -> None:
        """Validate one capture message and buffer its row; bad input is counted,
        and refused with a nack when it names a producer session."""
        cfg = self.config
        try:
            topic, payload, meta_raw, meta = protocol.decode_message(
                frames, cfg.max_topic_bytes, cfg.max_message_bytes)
            if topic[0] == protocol.RESERVED_PREFIX:  # the proxy takes none in: pushed here
                raise protocol.ProtocolError(protocol.RESERVED_TOPIC, topic[:64])
            producer, seq = meta.get(protocol.META_PRODUCER), meta.get(protocol.META_SEQ)
            epoch = meta.get(protocol.META_EPOCH)
            if producer is not None and (epoch is None or seq is None):
                # Only a session's mac shows who sent a message in a producer's
                # name: stored without one, it would pass for the producer's.
                raise protocol.ProtocolError(protocol.SESSION_REQUIRED,
                                             "a message naming a producer must be sent in "
                                             "its session (producer_open: epoch and seq)")
        except protocol.ProtocolError as exc:
            self.reject(exc, frames)
            return
        self.messages_received += 1
        if producer is not None:  # in a whole session (epoch and seq): checked above
            try:
                # frames: [topic, payload, meta], what the session's mac covers
                store, nack = self.producers.accept(producer, epoch, seq, self._drain_ns,
                                                    frames)
            except NotAuthentic:
                self.not_authentic(producer, epoch, seq)
                return
            if not store:
                if nack is not None:  # an older session, or a seq refused before
                    self._owe_nack(producer, epoch, seq, nack, "")
                return  # or a retransmission of a stored message: acknowledged again
        self.buffer.add_message((topic, payload, meta_raw, producer, seq,
                                 meta.get(protocol.META_TIME_NS)), now,
                                len(frames[0]) + len(payload) + (len(meta_raw) if meta_raw else 0))

    def reject(self, exc: protocol.ProtocolError, frames: list[bytes]) -> None:
        """Count a refused message (and log it, rate-limited); nack it if it
        names a session. Cheap: a flood of invalid messages costs the writer
        what it takes to read them, little more (issue 22)."""
        reason = exc.reason
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._rejects.due(reason):  # the event's fields built only when logged
            topic = frames[0][:64] if frames else b""
            self._rejects.warning(reason, "message_rejected", detail=exc.detail,
                                  frames=len(frames), topic=topic.decode("utf-8", "replace"))
        if reason in UNATTRIBUTABLE:
            return
        session = protocol.refused_session(frames, self.config.max_message_bytes)
        if session is not None:
            producer, epoch, seq = session
            # (refused_session names only messages of exactly 3 frames.) Refusing
            # a forgery would decide the real message's seq: its mac is checked.
            try:
                code = self.producers.refuse(producer, epoch, seq, exc.reason, self._drain_ns,
                                             frames)
            except NotAuthentic:
                self.not_authentic(producer, epoch, seq)
                return
            if code is not None:
                self._owe_nack(producer, epoch, seq, code,
                               str(exc) if code == exc.reason else "")

    def not_authentic(self, producer: str, epoch: int, seq: int) -> None:
        """A message of a producer's current session without its session key's
        mac: sent by someone else, or altered on the way. Counted and logged
        (rate-limited), never nacked."""
        self.forged += 1
        if self._rejects.due("forged"):  # the event's fields built only when logged
            self._rejects.warning("forged", "message_not_authentic", producer=producer,
                                  epoch=epoch, seq=seq,
                                  detail="no valid mac: not sent with this session's key")

    def _owe_nack(self, producer: str, epoch: int, seq: int, code: str, reason: str) -> None:
        """Tell the producer, after this loop pass, that (epoch, seq) is not stored."""
        self.nacked[code] = self.nacked.get(code, 0) + 1
        state = self.producers.peek(producer)
        signer = state.signer if state is not None and state.epoch == epoch else None
        self._owed_nacks.append((signer, {"producer": producer, "epoch": epoch, "seq": seq,
                                          "code": code,
                                          "reason": reason or REFUSAL_REASONS.get(code, code)}))

    def handle_notify_subscriptions(self) -> None:
        """Answer each new acknowledgement subscription with the producer's
        current acknowledgement, so that its client knows the path works. Only a
        producer with nothing uncommitted: its in-memory state would acknowledge
        rows not yet stored (a dirty one is acknowledged by its commit anyway).

        The bytes of held subscriptions are counted (each subscribe adds, each
        unsubscribe, explicit or by a disconnect, takes away; a peer repeating
        a subscription makes the count high, never low). Past the budget the
        endpoint is reopened: every client reconnects and subscribes again, and
        a flood costs the writer no more than the budget."""
        for _ in range(NOTIFY_READS_PER_PASS):
            try:
                frame = self.notify.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not frame:
                continue
            if frame[0] == protocol.UNSUBSCRIBE:
                self.notify_subscribed_bytes = max(0, self.notify_subscribed_bytes - len(frame) + 1)
                continue
            self.notify_subscribed_bytes += len(frame) - 1
            if self.notify_subscribed_bytes > NOTIFY_SUBSCRIPTION_BUDGET_BYTES:
                self.drop_notify_connections()
                return
            if not frame.startswith(ACK_SUBSCRIPTION):
                continue
            try:
                producer = frame[len(ACK_SUBSCRIPTION):].decode("utf-8")
            except UnicodeDecodeError:
                continue
            state = self.producers.peek(producer) if producer else None
            if state is not None and not self.producers.is_dirty(producer):
                self._owed_acks[producer, state.epoch] = (state.signer,
                                                          state.ack(time.time_ns()))

    def drop_notify_connections(self) -> None:
        """Past the notify budget: drop every notify connection (its
        subscriptions go with it); clients reconnect and subscribe again."""
        self.notify_drops += 1
        self._rejects.warning("notify_subscriptions_over_budget", "notify_connections_dropped",
                              subscribed_bytes=self.notify_subscribed_bytes,
                              budget_bytes=NOTIFY_SUBSCRIPTION_BUDGET_BYTES)
        self.guard.peers["notify"].drop_all()
        self.notify_subscribed_bytes = 0
        release_free_memory()

    def guard_memory(self, now: float) -> None:
        """Over BUS_WRITER_MEMORY_LIMIT_BYTES, drop what peers made the writer hold
        in libzmq, where no count or budget reaches: the capture's receive queue
        (a message of endless frames), the notify endpoint's subscriptions (a
        burst libzmq takes in before the writer sees it), an endless request on
        the control endpoint (bus/sockets.PeerMemoryGuard). Nothing in them is
        acknowledged: the proxy reconnects, publishers re-send, subscribers
        subscribe again."""
        if self.guard.check(now):
            self.notify_subscribed_bytes = 0

    # --- flushing -----------------------------------------------------------

    def flush_if_due(self, now: float, idle: bool) -> None:
        if now < self._retry_at:
            return
        if not self.buffer:
            if self.producers.dirty:
                # Only retransmissions arrived: what they repeat is committed, but
                # their publisher missed the acknowledgement. A commit of the ledger
                # alone sends it again.
                self.flush("ack", now)
            return
        reason = self.buffer.due(now)
        if reason is None and idle and self.load.is_low_load(now):
            reason = "low_load"
        if reason is not None:
            self.flush(reason, now)

    def flush(self, reason: str, now: float) -> bool:
        """Commit the whole buffer as one transaction; True once it is. On a
        transient database error the rows stay buffered and the flush is retried
        later. After a full disk, the backlog is committed in parts that fit
        (halved after each failure, doubled after each success), so that any
        space freed is used at once, until the rest fits in one transaction."""
        if self.store is None or not (self.buffer or self.producers.dirty):
            return True
        while len(self.buffer.messages) > self._rows_per_transaction():
            if not self._commit_part(reason, now):
                return False
        items = len(self.buffer)
        started = time.perf_counter()
        try:
            committed_ns, last_id = self.store.write_batch(
                self.buffer.messages, self.producers.dirty_rows(), self.buffer.consumptions)
        except self.store.transient_errors as exc:
            self._flush_failed(exc, now)
            return False
        if self._failing_since is not None:
            log.info("flush_recovered", failed_for_s=round(now - self._failing_since, 3),
                     rows=items)
            self._failing_since = self._part_rows = self._last_error = None
        if items:  # not for a write of producer counters alone
            seconds = time.perf_counter() - started
            self.metrics.record_flush(items, reason, seconds,
                                      batched=self.config.batch_write_enabled)
            if self.http is not None:
                self.commit_seconds.observe(seconds)
                self.batch_rows.observe(items)
                if self.buffer.oldest_at is not None:
                    self.batch_wait_seconds.observe(max(0.0, time.monotonic()
                                                        - self.buffer.oldest_at))
        self._owe_notifications(committed_ns, last_id, len(self.buffer.messages),
                                self.producers.committed())
        self.buffer.clear()
        return True

    def _commit_part(self, reason: str, now: float) -> bool:
        """Commit the oldest buffered messages that one transaction may take
        (_rows_per_transaction), and the consumer positions, with their
        producers' states as of those messages."""
        count = self._rows_per_transaction()
        part = self.buffer.messages[:count]
        states = self.producers.replay(part)
        positions = len(self.buffer.consumptions)
        started = time.perf_counter()
        try:
            committed_ns, last_id = self.store.write_batch(
                part, [state.row() for state in states], self.buffer.consumptions)
        except self.store.transient_errors as exc:
            self._flush_failed(exc, now)
            return False
        self.metrics.record_flush(count + positions, reason, time.perf_counter() - started,
                                  batched=self.config.batch_write_enabled)
        self._owe_notifications(committed_ns, last_id, count, states)
        self.buffer.take(count)
        if self._part_rows is not None:  # after a full disk (not a part for a small one)
            self._part_rows = count * 2
            log.info("backlog_part_committed", rows=count, waiting_rows=len(self.buffer),
                     waiting_bytes=self.buffer.bytes)
        return True

    def _rows_per_transaction(self) -> int:
        """How many of the buffered messages one transaction takes: after a
        full disk, `_part_rows`; and on a small disk no more than the store's
        `transaction_bytes` (a part of the free space, storage/sqlite.py
        wal_budget): a WAL holding more than the database file has room for
        could never be checkpointed."""
        messages = len(self.buffer.messages)
        rows = messages if self._part_rows is None else self._part_rows
        budget = getattr(self.store, "transaction_bytes", None)
        if budget is not None and self.buffer.bytes > budget:
            rows = min(rows, messages * budget // self.buffer.bytes)
        return max(1, rows)

    def _flush_failed(self, exc: Exception, now: float) -> None:
        self.metrics.flush_errors += 1
        self._retry_at = now + FLUSH_RETRY_SECONDS
        if self._failing_since is None:
            self._failing_since = now
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self.store.is_disk_full(exc):
            # All or nothing would wait for room for the whole backlog at once.
            waiting = len(self.buffer.messages)
            self._part_rows = max(1, min(self._part_rows or waiting, waiting) // 2)
        log.error("flush_failed", error=str(exc), error_type=type(exc).__name__,
                  waiting_rows=len(self.buffer), waiting_bytes=self.buffer.bytes,
                  failing_for_s=round(now - self._failing_since, 3),
                  will_retry_in_s=FLUSH_RETRY_SECONDS, next_part_rows=self._part_rows)

    def backlog(self, now: float) -> dict[str, Any]:
        """stats: what waits for a commit, and since when commits fail."""
        return {"rows": len(self.buffer), "bytes": self.buffer.bytes,
                "failing_for_s": None if self._failing_since is None
                else round(now - self._failing_since, 3),
                "last_error": self._last_error, "part_rows": self._part_rows}

    def _owe_notifications(self, committed_ns: int, last_id: int | None, messages: int,
                           producers: list[ProducerState]) -> None:
        """Note what was just committed; send_notifications() tells it once per loop
        iteration, so that many commits in one iteration (sequential mode) cost
        one acknowledgement per producer, not one per commit. Values are copied
        now: the states move on with messages not yet committed."""
        for state in producers:
            self._owed_acks[state.producer_id, state.epoch] = (state.signer,
                                                               state.ack(committed_ns))
        if last_id is not None:
            rows = self._owed_commit["rows"] if self._owed_commit else 0
            self._owed_commit = {"last_id": last_id, "rows": rows + messages,
                                 "committed_ns": committed_ns}

    def send_notifications(self) -> None:
        """Publish on the notify endpoint each owed nack ($bus.nack.<producer>),
        then each owed acknowledgement ($bus.ack.<producer>, the producer's
        contiguous watermark) and the commit watermark ($bus.commit). Nacks go
        first: an acknowledgement passes the seqs it refused. Each ends with the
        mac of its session (protocol.SessionMac.notification), so that only the
        writer can tell a publisher what is stored."""
        send = self._notify_send
        for signer, nack in self._owed_nacks:
            topic = protocol.nack_topic(nack["producer"])
            send(topic, msgpack.packb(nack) if signer is None
                 else signer.notification(topic, nack))
        self._owed_nacks.clear()
        for (producer, _epoch), (signer, ack) in self._owed_acks.items():
            topic = protocol.ack_topic(producer)
            send(topic, msgpack.packb(ack) if signer is None
                 else signer.notification(topic, ack))
        self._owed_acks.clear()
        if self._owed_commit:
            send(COMMIT_TOPIC, msgpack.packb(self._owed_commit))
            self._owed_commit = None

    def _notify_send(self, topic: bytes, payload: bytes) -> None:
        """One notification: pyzmq's own send (its Cython layer) twice, not
        send_multipart, whose Python wrapper costs 4 us a message here (its
        flags are Python enums): a commit's acknowledgement and watermark
        are sent after every batch. An XPUB never blocks: past its
        high-water mark a subscriber's notifications are dropped, as before."""
        _backend_send(self.notify, topic, zmq.SNDMORE)
        _backend_send(self.notify, payload)

    # --- retention ----------------------------------------------------------

    def _sealed_upto(self) -> int:
        """With sealed topics, retention stops at the last sealed message: an
        unsealed message of a sealed topic is never deleted (nor, since
        retention goes in id order, anything after it)."""
        return audit_rows.last_sealed_id(self.store.conn)

    def apply_retention(self, now: float) -> None:
        """Delete one chunk of expired messages when due: every loop iteration
        while there is a backlog, else once a second. One chunk is one short
        transaction between batches, so ingest waits for one chunk at most."""
        cfg = self.config
        if now < self._retention_at or not (cfg.retention_max_age_s or
                                            cfg.retention_max_messages):
            return
        before_ns = time.time_ns() - int(cfg.retention_max_age_s * 1e9) \
            if cfg.retention_max_age_s else None
        started = time.perf_counter()
        try:
            deleted = self.store.delete_expired(before_ns, cfg.retention_max_messages or None,
                                                cfg.retention_chunk_rows,
                                                self._sealed_upto() if cfg.audit_prefixes else None)
        except self.store.transient_errors as exc:
            self.retention["errors"] += 1
            self._retention_at = now + RETENTION_IDLE_SECONDS
            log.warning("retention_failed", error=str(exc), error_type=type(exc).__name__)
            return
        elapsed_ms = (time.perf_counter() - started) * 1000
        if deleted:
            stats = self.retention
            stats["deleted_total"] += deleted
            stats["chunks"] += 1
            stats["last_chunk_ms"] = round(elapsed_ms, 3)
            stats["max_chunk_ms"] = round(max(stats["max_chunk_ms"], elapsed_ms), 3)
        backlog = deleted >= cfg.retention_chunk_rows
        self._retention_at = now if backlog else now + RETENTION_IDLE_SECONDS

    def utxo_upkeep(self, now: float) -> None:
        """Return expired leases to the pool and prune old stored replies, once a
        second (a reservation also expires leases itself before it picks)."""
        if now < self._utxo_upkeep_at:
            return
        self._utxo_upkeep_at = now + UTXO_UPKEEP_SECONDS
        try:
            expired = self.utxos.expire_leases()
            self.utxos.prune_requests()
        except self.store.transient_errors as exc:
            log.warning("utxo_upkeep_failed", error=str(exc), error_type=type(exc).__name__)
            return
        if expired:
            log.info("utxo_leases_expired", count=expired)

    def _poll_timeout_ms(self, now: float) -> int:
        if self.buffer.is_full or (self.buffer and now < self._retry_at):
            timeout_ms = max(1, int((self._retry_at - now) * 1000) + 1)
        else:
            wait = self.buffer.seconds_until_due(now)
            timeout_ms = 1000 if wait is None else int(wait * 1000) + 1
            if self.config.retention_max_age_s or self.config.retention_max_messages:
                timeout_ms = min(timeout_ms, max(0, int((self._retention_at - now) * 1000) + 1))
        if self.guard.memory.limit:  # what grows the writer unseen wakes no poll
            timeout_ms = min(timeout_ms, int(self.guard.memory.interval_s * 1000))
        return timeout_ms

    # --- control endpoint ---------------------------------------------------

    def control_commands(self) -> control.CommandTable:
        """The writer's control commands (writer/commands.py; docs/protocol.md,
        "Control requests")."""
        return writer_table(self)

    def _flush_command(self, _request: control.Request) -> dict[str, int]:
        items = len(self.buffer)
        if not self.flush("request", time.monotonic()):
            raise control.CommandFailed(protocol.FLUSH_FAILED, "database write failed; rows kept")
        return {"flushed": items}

    def _consumer_ack(self, request: control.Request) -> dict[str, Any]:
        """{consumer, last_id} -> {consumer, last_id}: the position moves forward
        and is committed with the next batch. With CURVE, only the key that
        owns a consumer name moves it."""
        args = request.args
        with consumer_errors(self.quotas, request.user):
            position, row = self.consumers.ack(args.get("consumer"), args.get("last_id"),
                                               time.time_ns(), self.store.last_message_id() or 0,
                                               request.user)
        if row is not None:
            self.buffer.add_consumption(row, time.monotonic())
        return {"consumer": args["consumer"], "last_id": position}

    def _consumer_get(self, request: control.Request) -> dict[str, Any]:
        """{consumer} -> {consumer, last_id (nil if unknown), updated_ns, last_message_id}"""
        with consumer_errors():
            result = self.consumers.get(request.args.get("consumer"))
        result["last_message_id"] = self.store.last_message_id()
        return result

    def _consumer_delete(self, request: control.Request) -> dict[str, Any]:
        """{consumer} -> {consumer, deleted}"""
        with consumer_errors():
            row = self.consumers.delete(request.args.get("consumer"), time.time_ns())
        if row is not None:
            self.buffer.add_consumption(row, time.monotonic())
        return {"consumer": request.args["consumer"], "deleted": row is not None}

    def _producer_status(self, request: control.Request) -> dict[str, Any] | None:
        """{producer} -> {producer, epoch, contiguous_seq, max_seq, refused,
        refusals [[seq, code], ...]} (nil for an unknown producer): what a
        producer that missed nacks needs."""
        state = self.producers.peek(producer_arg(request))
        return state and state.status()

    def _producer_open(self, request: control.Request) -> dict[str, Any]:
        """{producer} -> {producer, epoch, next_seq}: a new session, committed
        before the reply; older sessions are fenced from then on. With CURVE, a
        producer id belongs to the key that opened it first: no other key can
        open (and so fence) it."""
        producer = producer_arg(request)
        known = self.producers.peek(producer)
        self._take_producer_id(request.user, known)
        if request.user is not None and known is not None and known.owner not in (None,
                                                                                  request.user):
            raise control.CommandFailed(protocol.FORBIDDEN,
                                        f"producer {producer!r} belongs to another key: open "
                                        "your own producer id")
        session_key = os.urandom(32)
        state = self.producers.open(producer, time.time_ns(), session_key, owner=request.user)
        if not self.flush("request", time.monotonic()):
            raise control.CommandFailed(protocol.UNAVAILABLE, "database write failed; retry")
        log.info("producer_session_opened", producer=producer, epoch=state.epoch,
                 next_seq=state.max_seq + 1)
        # The key goes to this client only: over CURVE, encrypted; without
        # CURVE, over a connection no other unprivileged local process can read.
        return {"producer": producer, "epoch": state.epoch, "next_seq": state.max_seq + 1,
                "session_key": session_key}

    def _take_producer_id(self, user: str | None, known: ProducerState | None) -> None:
        """(CURVE) A `producer_open` that makes `user` the owner of an id owned
        by no key: within its quota (writer/quotas.py), and counted."""
        if user is not None and (known is None or known.owner is None):
            self.quotas.check_new_producer(user)
            self.quotas.producer_taken(user)

    def _producers_list(self, request: control.Request) -> dict[str, Any]:
        """{after (a producer id, default ""), limit (1-1000, default 100)} ->
        {producers: [producer_info, ...] in id order, after the given id; more,
        total}: a page of every producer id the writer knows."""
        after = request.args.get("after", "")
        limit = request.args.get("limit", 100)
        if not isinstance(after, str) or type(limit) is not int or \
                not 1 <= limit <= MAX_PRODUCERS_LISTED:
            raise control.CommandFailed(
                protocol.BAD_REQUEST, f"'after' must be a producer id and 'limit' an integer "
                f"of 1-{MAX_PRODUCERS_LISTED}", bad_input=True)
        rows = self.store.list_producers(after, limit + 1)
        return {"producers": [describe(self.producers.listed(row)) for row in rows[:limit]],
                "more": len(rows) > limit, "total": self.store.count_producers()}

    def _producer_info(self, request: control.Request) -> dict[str, Any] | None:
        """{producer} -> producer_info (nil for an unknown producer): its owner,
        session, sequence numbers and when it was first and last seen."""
        state = self.producers.peek(producer_arg(request))
        return state and describe(state)

    def _producer_remove(self, request: control.Request) -> dict[str, Any]:
        """{producer} -> {producer, removed, epoch, max_seq, owner}: the id freed
        for any key (writer/producers.py, ProducerLedger.remove), committed
        before the reply. What the writer received of the producer is
        committed (and acknowledged) first; its session is fenced from then
        on. `owner`: the key that owned it."""
        producer = producer_arg(request)
        if not self.flush("request", time.monotonic()):
            raise control.CommandFailed(protocol.UNAVAILABLE, "database write failed; retry")
        owner = (known := self.producers.peek(producer)) and known.owner
        state = self.producers.remove(producer)
        if state is None:
            return {"producer": producer, "removed": False}
        if owner is not None:
            self.quotas.producer_freed(owner)
        if not self.flush("request", time.monotonic()):
            raise control.CommandFailed(protocol.UNAVAILABLE, "database write failed; the "
                                        "removal is kept and committed with the next batch")
        log.info("producer_removed", producer=producer, owner=owner, fenced_epoch=state.epoch,
                 max_seq=state.max_seq, by_key=request.user)
        return {"producer": producer, "removed": True, "epoch": state.epoch,
                "max_seq": state.max_seq, "owner": owner}

    def snapshot(self) -> dict[str, Any]:
        return self.stats(time.monotonic())

    def status_line(self) -> str:
        now = time.monotonic()
        line = (f"stored {self.metrics.total_writes:,} messages; "
                f"{self.load.requests_per_second(now):,.0f} msg/s; "
                f"{len(self.buffer):,} buffered")
        if self._failing_since is not None:
            line += f"; commits failing for {now - self._failing_since:.0f} s: {self._last_error}"
        return line

    def _stored_ids(self) -> tuple[int | None, int | None]:
        """(first, last) stored message id; (None, None) while the database
        cannot be read: stats must answer when the database does not."""
        try:
            return self.store.first_message_id(), self.store.last_message_id()
        except self.store.transient_errors:
            return None, None

    def stats(self, now: float) -> dict[str, Any]:
        cfg = self.config
        batch = self.metrics.snapshot()
        batch.update(buffer_sizes=self.buffer.sizes(), db_queue_size=len(self.buffer),
                     config={"enabled": cfg.batch_write_enabled, "batch_size": cfg.batch_size,
                             "flush_interval_ms": cfg.batch_flush_interval_ms,
                             "max_buffer_size": cfg.batch_max_buffer_size})
        first_id, last_id = self._stored_ids()
        return {
            "batch": batch,
            "load": self.load.snapshot(now),
            "ingest": {"messages_received": self.messages_received,
                       "rejected_total": sum(self.rejected.values()),
                       "rejected": dict(self.rejected),
                       "nacked": dict(self.nacked)},
            "control": self.dispatcher.counters.snapshot(),
            "producers": self.producers.snapshot(),
            "quotas": self.quotas.snapshot(),
            "consumers": self.consumers.snapshot(last_id),
            "utxos": self.utxos.snapshot(),
            "anchors": self.anchors.snapshot(),
            "audit": self.audit.snapshot(),
            "retention": {"max_age_s": cfg.retention_max_age_s,
                          "max_messages": cfg.retention_max_messages, **self.retention},
            "security": {**security.snapshot(cfg),
                         "commands_forbidden": self.dispatcher.counters.forbidden,
                         "messages_not_authentic": self.forged},
            "notify": {"subscribed_bytes": self.notify_subscribed_bytes,
                       "budget_bytes": NOTIFY_SUBSCRIPTION_BUDGET_BYTES,
                       "drops": self.notify_drops},
            "memory": self.guard.snapshot(),
            "connections": self.guard.connections(),
            "backlog": self.backlog(now),
            "wal": self.store.snapshot(),
            "database": {"path": storage.redact(cfg.db), "synchronous": cfg.sqlite_synchronous,
                         "first_message_id": first_id, "last_message_id": last_id},
            "uptime_seconds": round(now - self._started, 3),
            "config": cfg.public(),
        }
