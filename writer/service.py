"""bus-writer: the only process that writes the database.

Binds PULL capture_endpoint   the proxy's capture pipe: data messages
                              (untrusted: never commands)
Binds ROUTER control_endpoint   trusted commands: `stats`, `flush`, `ping`, producer
                              sessions (`producer_open`, `producer_status`; the
                              admins' `producers_list`, `producer_info`,
                              `producer_remove`), the
                              durable consumers' `consumer_ack` / `consumer_get` /
                              `consumer_delete`, the admins' `purge` of a topic
                              prefix (writer/purge.py), the wallet's `utxo_*`
                              (reservations and sync, writer/utxos.py) and the
                              `anchor_*` records (writer/anchors.py)
Binds XPUB notify_endpoint    $bus.nack.<producer> for refused messages, then
                              $bus.ack.<producer> and $bus.commit after each commit;
                              a new acknowledgement subscription gets the
                              producer's current acknowledgement

`Writer` is a coordinator: each loop pass serves the control endpoint, then
steps its parts in turn with the pass's `now`, each part of one job and
steppable on its own (tests/test_writer_parts.py):

  writer/ingest.py         Ingest: the capture read, decoded, validated (macs
                           checked) into the batch buffer; refusals counted
  writer/commits.py        Commits: the buffer, one transaction per batch (when
                           due, retried, in parts after a full disk; on
                           PostgreSQL one in flight while the loop reads on)
  writer/notifications.py  Notifications: the nacks, acknowledgements and commit
                           watermark owed, sent once a pass; the notify
                           endpoint's subscriptions and their budget
  writer/retention.py      Retention: the oldest messages deleted a chunk at a time
  writer/upkeep.py         UtxoUpkeep: expired UTXO leases, old utxo_* replies
  writer/metrics.py        WriterStats: `stats`, /metrics, /healthz, status line

On SIGTERM/SIGINT the writer drains the capture until it has been quiet for
BUS_DRAIN_IDLE_MS (at most 5 such periods: the rest stays queued in the
proxy), flushes, closes the database and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import zmq

from bus import control, protocol, security, sockets
from bus.build import build_info
from bus.config import BusConfig, endpoints_of
from bus.http import HttpSide
from bus.logging import get_logger
from bus.runner import StopSignal
from writer.anchors import AnchorBook
from writer.audit import AuditBook
from writer.commits import FLUSH_RETRY_SECONDS, Commits, CommitTimings
from writer.commands import writer_table
from writer.consumers import ConsumerPositions
from writer.health import writer_health
from writer.ingest import Ingest
from writer.metrics import WriterStats, open_http, stored_ids
from writer.notifications import Notifications
from writer.producers import ProducerLedger, ProducerState, describe
from writer.quotas import KeyQuotas
from writer.retention import Retention
from writer.upkeep import UtxoUpkeep
import storage
from writer.utxos import UtxoBook

log = get_logger("writer")

# Most producers one `producers_list` answers.
MAX_PRODUCERS_LISTED = 1000
# Retention and the UTXO upkeep run statements, which wait for a commit in
# flight (BUS_PG_OVERLAP_COMMITS): the loop waits this long at most for it to
# end, else leaves them for a later pass. Unbounded, a commit held by another
# session's lock stopped the loop within a second (the upkeep's period).
UPKEEP_COMMIT_WAIT_S = 0.05


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


def open_writer_store(cfg: BusConfig, fence: bool = False) -> Any:
    """The writer's database, its lock taken (storage.open_store; `fence`: a
    standby's, from a holder silent for BUS_PG_SESSION_TIMEOUT_S)."""
    return storage.open_store(cfg.db, cfg.sqlite_synchronous, cfg.sqlite_busy_timeout_ms,
                              cfg.pg_session_timeout_s, fence)


class Writer:
    """The writer role: its endpoints, its database and its parts (the
    module's doc), and the control commands."""

    name = "writer"
    # What /healthz answers from, and what the systemd watchdog is pinged by.
    health = staticmethod(writer_health)

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.guard = sockets.PeerMemoryGuard(config.writer_memory_limit_bytes, log)
        self.http: HttpSide | None = None
        self._started = time.monotonic()
        self.ctx: zmq.Context | None = None
        self.store: Any = None  # storage.open_store: sqlite.Store or postgres.PgStore
        self.ingest: Ingest | None = None  # the parts, once the database is open

    # --- life cycle ---------------------------------------------------------

    def initialize(self, stop: StopSignal, store: Any = None) -> None:
        """`store`: the database a standby opened once it held the lock
        (writer/standby.py); else the writer opens it, after its endpoints."""
        cfg = self.config
        self.stop = stop
        # Endpoints first: a port in use stops the writer before it creates a
        # database. But with several writer endpoints (writers on several
        # hosts), the lock first: a writer that binds is the one that holds it
        # (the proxy drops an older writer's connection for a newer one).
        if store is None and len(endpoints_of(cfg.capture_endpoint)) > 1:
            store = open_writer_store(cfg)
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
        self.http = open_http(cfg)
        self.store = store or open_writer_store(cfg)
        if getattr(self.store, "readable_by_others", False):
            log.warning("database_readable_by_others", db=storage.describe(cfg.db),
                        reason="its session keys (producer_keys) let whoever reads them send "
                               "in a producer's name: chmod 600 it and its -wal and -shm files")
        self.producers = ProducerLedger(self.store.load_producer)
        self.notifications = Notifications(self.notify, self.producers,
                                           lambda: self.guard.peers["notify"].drop_all())
        self.commits = Commits(cfg, self.store, self.producers, self.notifications,
                               None if self.http is None else CommitTimings(self.http))
        self.buffer = self.commits.buffer
        self.ingest = Ingest(cfg, self.capture, self.commits, self.producers, self.notifications)
        self.consumers = ConsumerPositions(self.store.load_consumers(), cfg.max_consumers,
                                           cfg.max_consumers_per_key, cfg.max_topic_bytes)
        keys = security.keyring(cfg)
        self.quotas = KeyQuotas(cfg, self.store.producers_by_owner(), log,
                                lambda key: keys is not None and
                                security.ADMINS in keys.roles_of(key))
        self.utxos = UtxoBook(self.store.conn, self.store.transaction, cfg.utxo_max_lease_s,
                              cfg.utxo_request_ttl_s)
        self.anchors = AnchorBook(self.store.conn, self.utxos.spend)
        self.audit = AuditBook(self.store.conn)
        self.retention = Retention(cfg, self.store)
        self.upkeep = UtxoUpkeep(self.utxos, self.store.transient_errors)
        self.dispatcher = control.Dispatcher(
            self.control_commands(), log, cfg, authorized=True,
            retryable=self.store.transient_errors,
            admit=lambda request: self.quotas.admit_request(request, time.monotonic()),
            admit_bytes=lambda user, size: self.quotas.admit_bytes(user, size,
                                                                   time.monotonic()))
        self.metrics = WriterStats(
            cfg, self.store, self._started, commits=self.commits, ingest=self.ingest,
            notifications=self.notifications, retention=self.retention,
            producers=self.producers, consumers=self.consumers, quotas=self.quotas,
            utxos=self.utxos, anchors=self.anchors, audit=self.audit,
            dispatcher=self.dispatcher, guard=self.guard)
        self.poller = zmq.Poller()
        # The end of a commit in flight (PostgreSQL) wakes the loop to land it.
        landed = () if self.commits.wakeup_fd is None else (self.commits.wakeup_fd,)
        for sock in (self.capture, self.control, self.notify, stop.fileno(), *landed):
            self.poller.register(sock, zmq.POLLIN)
        # While the capture is not read (Commits.holding_capture), its pending
        # input must not wake the poll either, or the loop would spin.
        self.paused_poller = zmq.Poller()
        for sock in (self.control, self.notify, stop.fileno(), *landed):
            self.paused_poller.register(sock, zmq.POLLIN)
        log.info("started", **build_info(),
                 db=storage.redact(cfg.db), capture_endpoint=cfg.capture_endpoint,
                 control_endpoint=cfg.control_endpoint, notify_endpoint=cfg.notify_endpoint,
                 config_source=cfg.source, config=cfg.public())

    def loop(self, now: float | None = None) -> None:
        """One pass: wait for input or the next thing due, then each part in
        turn (`now`: time.monotonic() after the wait, unless given)."""
        timeout_ms = self._poll_timeout_ms(time.monotonic() if now is None else now)
        poller = self.paused_poller if self.commits.holding_capture else self.poller
        events = dict(poller.poll(timeout_ms))
        now = time.monotonic() if now is None else now
        if self.stop.fileno() in events:
            self.stop.clear_wakeup()
        # PostgreSQL: a statement once a second at least, and before anything
        # is read after a pause (a frozen writer, thawed after a standby took
        # over, must not take in what it can no longer commit): SessionLost
        # ends the process.
        self.store.heartbeat(now)
        if self.control in events:
            self.dispatcher.serve(self.control)
        if self.notify in events:
            self.notifications.read_subscriptions()
        idle = True
        if self.capture in events:
            idle = self.ingest.drain(now)
        self.commits.step(now, idle)
        self.notifications.send()
        if not (self.retention.due(now) or self.upkeep.due(now)) or \
                self.commits.commit_ended(UPKEEP_COMMIT_WAIT_S):
            self.retention.step(now)
            self.upkeep.step(now)
        # Over BUS_WRITER_MEMORY_LIMIT_BYTES, what peers made the writer hold in
        # libzmq, where no count or budget reaches (the capture's receive queue,
        # the notify endpoint's subscriptions, an endless control request), is
        # dropped with their connections (bus/sockets.PeerMemoryGuard). Nothing
        # in them is acknowledged: the proxy reconnects, publishers re-send,
        # subscribers subscribe again.
        if self.guard.check(now):
            self.notifications.connections_dropped()

    def _poll_timeout_ms(self, now: float) -> int:
        timeout_ms, retrying = self.commits.poll_timeout_ms(now)
        retention_ms = self.retention.poll_timeout_ms(now)
        if not retrying and retention_ms is not None:
            timeout_ms = min(timeout_ms, retention_ms)
        if self.guard.memory.limit:  # what grows the writer unseen wakes no poll
            timeout_ms = min(timeout_ms, int(self.guard.memory.interval_s * 1000))
        heartbeat_ms = self.store.heartbeat_due_ms(now)
        if heartbeat_ms is not None:
            timeout_ms = min(timeout_ms, heartbeat_ms)
        return timeout_ms

    def flush(self, reason: str, now: float) -> bool:
        """Commit the whole buffer (writer/commits.py); True once it is."""
        return self.commits.flush(reason, now)

    def shutdown(self) -> None:
        unsaved = 0
        # A lost session (SessionLost) ends the writer without another word to
        # the database: nothing more is committed, nothing more acknowledged.
        lost = getattr(self.store, "lost", None)
        if self.ingest is not None and self.store is not None and lost is None:
            deadline = time.monotonic() + self.config.shutdown_timeout_ms / 1000.0
            self.ingest.drain_before_exit(deadline)
            while not self.flush("shutdown", time.monotonic()) and time.monotonic() < deadline:
                time.sleep(FLUSH_RETRY_SECONDS)
            unsaved = len(self.buffer)
            self.notifications.send()
            self.commits.close()
        if self.ctx is not None:
            self.guard.close()
            for sock in (getattr(self, "capture", None), getattr(self, "control", None)):
                if sock is not None:
                    sock.close(linger=0)
            if getattr(self, "notify", None) is not None:
                self.notify.close()  # lingers briefly: the last acknowledgements
            if getattr(self, "auth", None) is not None:
                self.auth.stop()
            self.ctx.term()
            self.ctx = None
        if self.store is not None:
            if lost is None:
                log.info("database_closed", db=storage.redact(self.config.db),
                         last_message_id=stored_ids(self.store)[1])
            self.store.close()
            self.store = None
        if unsaved:
            raise RuntimeError(f"{unsaved} buffered rows could not be committed before the "
                               "shutdown deadline (see flush_failed)")

    # --- control endpoint ---------------------------------------------------

    def control_commands(self) -> control.CommandTable:
        """The writer's control commands (writer/commands.py; docs/protocol.md,
        "Control requests")."""
        return writer_table(self)

    def _flush_command(self, _request: control.Request) -> dict[str, int]:
        items = len(self.buffer) + self.buffer.held_rows  # and those of a commit in flight
        if not self.flush("request", time.monotonic()):
            raise control.CommandFailed(protocol.FLUSH_FAILED, "database write failed; rows kept")
        return {"flushed": items}

    def _consumer_ack(self, request: control.Request) -> dict[str, Any]:
        """{consumer, last_id, prefixes?} -> {consumer, last_id}: the position
        moves forward and is committed with the next batch, with the topic
        prefixes the consumer reads (its lag is counted on them). With CURVE,
        only the key that owns a consumer name moves it."""
        args = request.args
        with consumer_errors(self.quotas, request.user):
            position, row = self.consumers.ack(args.get("consumer"), args.get("last_id"),
                                               time.time_ns(), self.store.last_message_id() or 0,
                                               request.user, args.get("prefixes"))
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
        return self.metrics.status_line(time.monotonic())

    def stats(self, now: float) -> dict[str, Any]:
        return self.metrics.snapshot(now)
