"""bus-anchor: anchors document hashes in Bitcoin transactions.

Reads    anchor.request (durable consumer BUS_ANCHOR_CONSUMER, created before the
         first stored message: nothing is lost while the worker is down or
         before it first starts; its position moves only past requests that
         are recorded in an anchor, or refused)
Asks     the writer (REQ, Lazy Pirate): UTXO leases, anchor records, wallet sync
Talks to bitcoind: JSON-RPC, and ZMQ hashblock (polling as the fallback)
Publishes anchor.submitted, anchor.confirmed, anchor.error

One anchoring: collect requests for BUS_ANCHOR_INTERVAL_S or up to
BUS_ANCHOR_MAX_DOCUMENTS, leave out the hashes already anchored, build the
RFC 6962 Merkle tree, reserve one UTXO, build and sign with bitcoind's wallet
a transaction with one OP_RETURN (b"BUSA" 0x02 root size) and change back to the
wallet, RECORD it through the writer (anchor, documents, UTXO spent: one
transaction), acknowledge the requests, then broadcast. Recording first means a
crash at any point leaves either nothing (the lease expires, the requests are
read again) or a recorded transaction, which the next start broadcasts. An
anchor not mined within BUS_ANCHOR_BUMP_AFTER_BLOCKS is fee-bumped: the same
input, the same OP_RETURN, a higher fee (RBF), so at most one of its
transactions can ever be mined.

bitcoind or the writer unreachable: the work is kept and retried with
backoff (up to BUS_ANCHOR_RETRY_MAX_S). No spendable UTXO: an anchor.error
event, and the requests wait for the next try.

`AnchorWorker` is the coordinator: the process's sockets, its loop, its
back-off and `stats`. The work is done by parts of one job each, every one
stepped with the time (`now`) by the loop, or by a test:

    anchor/requests.py       RequestIntake: the requests read, the documents
                             waiting, when a batch is due
    anchor/transactions.py   Transactions: lease, lock, build, sign, record,
                             broadcast, fee bumps
    anchor/confirmations.py  Confirmations: mined, confirmed, reorg re-checks
    anchor/ledger.py         OpenAnchors: the anchors not yet confirmed
    anchor/blocks.py         BlockWatch: when a block asks for a sync and a check
    anchor/events.py         AnchorEvents: anchor.* out
    anchor/sync.py           WalletSync: the writer's UTXO table in step with the wallet
    anchor/audit.py          Sealer: audit seals, whose roots join the documents
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import zmq

from anchor.audit import Sealer
from anchor.bitcoind import BitcoinRpc, RpcError, RpcUnavailable, open_hashblock
from anchor.blocks import BlockWatch
from anchor.health import anchor_health
from anchor.confirmations import Confirmations
from anchor.events import AnchorEvents
from anchor.ledger import OpenAnchors
from anchor.requests import Document, RequestIntake
from anchor.reservations import NoUtxo, UtxoClient
from anchor.sync import WalletSync
from anchor.transactions import BuildFailed, Transactions
from bus import control, protocol, security, sockets
from bus.build import build_info
from bus.client import BusError, HistoryClient
from bus.config import BusConfig
from bus.http import HttpSide, Series, connection_series, control_series
from bus.logging import RateLimitedLog, get_logger
from bus.protocol import AnchorStatus
from bus.runner import StopSignal

log = get_logger("anchor")

POLL_SECONDS = 0.2             # longest wait of one loop pass


# What the anchor worker's /metrics shows (bus/http.py), read from its `stats`.
HTTP_SERIES = [
    Series("events", "counter", "what the worker did, by kind",
           lambda s: s["counters"], "kind"),
    Series("documents_waiting", "gauge", "documents waiting to be anchored",
           lambda s: s["queue"]["documents"]),
    Series("open_anchors", "gauge", "anchors not yet confirmed", lambda s: s["open_anchors"]),
    Series("bitcoind_reachable", "gauge", "1 while bitcoind answers",
           lambda s: int(s["bitcoind"]["reachable"])),
    Series("wallet_sync_lag_blocks", "gauge", "blocks the UTXO table is behind bitcoind",
           lambda s: s["wallet_sync"]["lag_blocks"]),
    *control_series(),
    *connection_series(),
]


def pause_unless_stopped(stop: StopSignal, seconds: float) -> bool:
    """The wait between retries of a writer request: over early when the
    process is asked to stop (False: that request is not sent again)."""
    until = time.monotonic() + seconds
    while not stop.requested and (left := until - time.monotonic()) > 0:
        if select.select([stop], [], [], left)[0] and not stop.requested:
            stop.clear_wakeup()  # a signal that asks nothing of this process
    return not stop.requested


class AnchorWorker:
    name = "anchor"

    def __init__(self, config: BusConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.counters = {"requests": 0, "refused": 0, "duplicates": 0, "anchored": 0,
                         "documents": 0, "broadcasts": 0, "bumps": 0, "confirmed": 0,
                         "failed": 0, "no_utxo": 0, "unavailable": 0, "blocks": 0,
                         "renewals": 0, "reorged": 0}
        self._warnings = RateLimitedLog(log)
        self.events = AnchorEvents(config.request_timeout_ms / 1000, self._warnings)
        self.intake = RequestIntake(config.anchor_max_documents, config.anchor_interval_s,
                                    self.events.emit, self.counters, self._warnings, clock)
        # Built once bitcoind's and the writer's clients exist (initialize).
        self.blocks: BlockWatch | None = None
        self.ledger: OpenAnchors | None = None
        self.transactions: Transactions | None = None
        self.confirmations: Confirmations | None = None
        self._recovered = False
        self._ready = False                        # recovered and synced once
        self._retry_at = 0.0
        self._backoff = 0.0
        self.ctx: zmq.Context | None = None
        self.http: HttpSide | None = None
        self.sync: WalletSync | None = None
        self.sealer: Sealer | None = None
        everyone = (security.PUBLISHERS, security.READERS)
        self.dispatcher = control.Dispatcher(
            [control.Command("stats", lambda _request: self.stats(), roles=everyone),
             control.Command("request_status", self.request_status, roles=everyone,
                             args=("hash",))], log, config, domain="anchor_control")

    # --- life cycle -------------------------------------------------------------------

    def initialize(self, stop: StopSignal) -> None:
        cfg = self.config
        self.stop = stop
        self.ctx = zmq.Context()
        owner = f"anchor@{socket.gethostname()}:{os.getpid()}"
        utxos = UtxoClient(cfg.control_endpoint, timeout_ms=cfg.request_timeout_ms,
                           retry_for_s=3 * cfg.request_timeout_ms / 1000, owner=owner,
                           context=self.ctx, curve=security.client_keys(cfg),
                           pause=lambda seconds: pause_unless_stopped(stop, seconds))
        rpc = BitcoinRpc(cfg.bitcoind_rpc_url, cfg.bitcoind_rpc_user,
                         cfg.bitcoind_rpc_password, cfg.bitcoind_rpc_cookie)
        self.hashblock = open_hashblock(self.ctx, cfg.bitcoind_zmq_hashblock) \
            if cfg.bitcoind_zmq_hashblock else None
        self.assemble(rpc, utxos, self.hashblock)
        self.auth = security.start_authenticator(self.ctx, cfg)
        self.guard = sockets.PeerMemoryGuard(cfg.anchor_memory_limit_bytes, log,
                                             sockets.connection_cap(cfg, 1, log))
        self.control = sockets.open_anchor_control(
            self.ctx, cfg, self.guard.watch("control", cfg.anchor_control_endpoint))
        if cfg.anchor_http:
            self.http = HttpSide("anchor", cfg.anchor_http, HTTP_SERIES, anchor_health)
        self.poller = zmq.Poller()
        self.poller.register(stop.fileno(), zmq.POLLIN)
        self.poller.register(self.control, zmq.POLLIN)
        if self.hashblock is not None:
            self.poller.register(self.hashblock, zmq.POLLIN)
        log.info("started", **build_info(),
                 bitcoind=cfg.bitcoind_rpc_url, hashblock=cfg.bitcoind_zmq_hashblock,
                 consumer=cfg.anchor_consumer, config_source=cfg.source, config=cfg.public())

    def assemble(self, rpc: BitcoinRpc, utxos: UtxoClient, hashblock: zmq.Socket | None) -> None:
        """The parts that talk to bitcoind and the writer (a test's doubles)."""
        self.rpc, self.utxos = rpc, utxos
        self.blocks = BlockWatch(rpc, hashblock, self.config.anchor_block_poll_s)
        self.ledger = OpenAnchors(utxos)
        self.transactions = Transactions(self.config, rpc, utxos, self.ledger, self.events,
                                         self.counters, self._warnings, self.intake.requeue,
                                         self.blocks.wake, self.clock)
        self.confirmations = Confirmations(self.config, rpc, utxos, self.ledger,
                                           self.transactions, self.events, self.counters)

    def loop(self, now: float | None = None) -> None:
        """One pass; `now` given (a test): every step of it happens at `now`."""
        stepped = now is not None
        now = self.clock() if now is None else now
        while self.control.poll(0):  # between the steps below, each at most a poll or an RPC
            self.dispatcher.serve(self.control)
        self.guard.check(now)
        at = (lambda: now) if stepped else self.clock
        try:
            self._connect()
            self._take_requests(now)
            self.blocks.watch(now, self.sync.tip_hash if self.sync else None,
                              poll=self.sync is not None)
            if at() >= self._retry_at:  # the clock read after the wait for requests
                self._work(at)
                self._backoff = 0.0
        except NoUtxo as exc:
            self.counters["no_utxo"] += 1
            self.events.emit(protocol.ANCHOR_ERROR_TOPIC, {
                "error": protocol.NO_UTXO, "reason": str(exc), "documents": len(self.intake)})
            self._hold_back(exc, protocol.NO_UTXO, at())
        except (RpcUnavailable, BusError) as exc:
            self.counters["unavailable"] += 1
            if isinstance(exc, RpcUnavailable):
                self.blocks.error = str(exc)
            self._hold_back(exc, protocol.UNAVAILABLE, at())
        except RpcError as exc:  # bitcoind refused a call (wallet locked, say): not fatal
            self._hold_back(exc, "bitcoind_refused", at())
        except BuildFailed as exc:
            self.events.emit(protocol.ANCHOR_ERROR_TOPIC, {
                "error": protocol.BUILD_FAILED, "reason": str(exc), "documents": len(self.intake)})
            self._hold_back(exc, protocol.BUILD_FAILED, at())
        if self.events.publisher is not None:
            self.events.publisher.read_acks()

    def snapshot(self) -> dict[str, Any]:
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """`stats` of the anchor worker's control endpoint (docs/protocol.md)."""
        now = self.clock()
        tip = self.sync.tip_height if self.sync is not None else None
        node_height = self.blocks.node.get("height")
        return {
            "counters": dict(self.counters),
            "queue": {"documents": len(self.intake), "waiting_s": self.intake.waiting_s(now)},
            "open_anchors": len(self.ledger),
            "open_by_status": self.ledger.by_status(),
            "last_broadcast": self.transactions.last_broadcast,
            "bitcoind": self.blocks.snapshot(self.config.bitcoind_rpc_url),
            "wallet_sync": {"tip_height": tip, "node_height": node_height,
                            "lag_blocks": node_height - tip
                            if node_height is not None and tip is not None else None,
                            "ready": self._ready,
                            "counters": dict(self.sync.counters) if self.sync is not None else {}},
            "retry_in_s": round(max(0.0, self._retry_at - now), 3),
            "control": self.dispatcher.counters.snapshot(),
            "memory": self.guard.snapshot(),
            "connections": self.guard.connections(),
            "security": security.snapshot(self.config),
            "audit": self.sealer.snapshot() if self.sealer is not None else None,
            "build": build_info(),
        }

    def request_status(self, request: control.Request) -> dict[str, Any]:
        """`request_status {hash}`: whether this worker has taken a request for
        `hash` (it waits in the batch to anchor), and how far it has read the
        stored requests: `anchor submit --wait` tells from it, within seconds,
        a request no worker takes (docs/protocol.md, "Anchoring")."""
        digest = request.args.get("hash")
        if not (isinstance(digest, bytes) and len(digest) == 32):
            raise control.CommandFailed(protocol.BAD_REQUEST, "'hash' must be 32 bytes (a SHA-256)",
                                        bad_input=True)
        return {**self.intake.status(digest), "consumer": self.config.anchor_consumer}

    def status_line(self) -> str:
        return (f"{len(self.intake):,} documents waiting; {len(self.ledger or ()):,} anchors "
                f"open; {self.counters['anchored']:,} anchored, {self.counters['confirmed']:,} "
                "confirmed")

    def shutdown(self) -> None:
        self.intake.close()
        self.events.close()
        if getattr(self, "utxos", None) is not None:
            self.utxos.close()
            if self.sealer is not None:
                self.sealer.history.close()
            self.rpc.close()
        if self.ctx is not None:
            if getattr(self, "hashblock", None) is not None:  # a start cut short has none
                self.hashblock.close()
            if getattr(self, "guard", None) is not None:
                self.guard.close()
            if getattr(self, "control", None) is not None:
                self.control.close(linger=0)
            if getattr(self, "auth", None) is not None:
                self.auth.stop()
            self.ctx.term()
            self.ctx = None
        log.info("anchor_stopped", pending=len(self.intake), open_anchors=len(self.ledger or ()),
                 **self.counters)

    def _hold_back(self, exc: Exception, reason: str, now: float) -> None:
        """Retry the work later, backing off to BUS_ANCHOR_RETRY_MAX_S."""
        self._backoff = min(max(0.5, self._backoff * 2), self.config.anchor_retry_max_s)
        self._retry_at = now + self._backoff
        self._warnings.warning(reason, "anchor_held_back", error=str(exc),
                               retry_in_s=self._backoff, pending=len(self.intake))

    # --- the bus side -----------------------------------------------------------------

    def _connect(self) -> None:
        """Open what needs the bus (writer, reader, proxy) once they answer."""
        cfg = self.config
        if self.events.publisher is None:
            self.events.connect(cfg, self.ctx)
        if self.intake.requests is None:
            self.intake.connect(cfg, self.ctx)
        if self.sync is None:
            self.sync = WalletSync(self.rpc, self.utxos, cfg.anchor_sync_page)
        if self.sealer is None and cfg.sealed_prefixes:
            self.sealer = Sealer(cfg.sealed_prefixes, cfg.audit_interval_s,
                                 cfg.audit_max_messages, cfg.audit_max_rate, self.utxos,
                                 HistoryClient(cfg, context=self.ctx), self._anchor_seal)

    def _take_requests(self, now: float) -> None:
        """Read requests until the batch is full or the wait is over."""
        wake = now + POLL_SECONDS
        due = self.intake.due_at()
        if due is not None:  # not before a back-off ends: no spinning
            wake = min(wake, max(due, self._retry_at))
        if self.sealer is not None and self.sealer.wake_at() is not None:
            wake = min(wake, max(now, self.sealer.wake_at()))  # a seal's next page
        wait = max(0.0, wake - now)
        if self.intake.full or self.intake.requests is None:
            self.poller.poll(int(wait * 1000))
            return
        self.intake.read(wait)

    # --- the work ---------------------------------------------------------------------

    def _work(self, at: Callable[[], float]) -> None:
        """The parts in turn; `at()` is the time each step runs at."""
        if not self._ready:
            if not self._recovered:
                self._recover(at())
            self.sync.sync()
            self._ready = True
            log.info("anchor_ready", tip_height=self.sync.tip_height, open_anchors=len(self.ledger))
        if self.blocks.due:
            self.blocks.due = False
            try:
                if self.sync.sync():
                    self.counters["blocks"] += 1
                self.confirmations.step(self.sync.tip_height or 0, at())
            except BaseException:
                self.blocks.due = True
                raise
        self.transactions.broadcast_signed(at())
        if self.sealer is not None:
            self.sealer.step(at())
        if self.intake.due(at()):
            self._anchor_pending(at)

    def _recover(self, now: float) -> None:
        """The anchors a previous run recorded and did not see confirmed, and
        the seals it closed and did not anchor."""
        self.ledger.reload()
        for seal_id, root, _size in self.utxos.call("audit_unanchored", {})["seals"]:
            self.intake.add(Document(root, f"audit-seal:{seal_id}", None), now)
        self._recovered = True
        if len(self.ledger):
            log.info("anchors_recovered", open=len(self.ledger),
                     signed=len(self.ledger.with_status(AnchorStatus.SIGNED)))

    def _anchor_seal(self, seal_id: int, root: bytes) -> None:
        """A seal's root joins the documents to anchor, like a requested hash."""
        self.intake.add(Document(root, f"audit-seal:{seal_id}", None), self.clock())

    def _anchor_pending(self, at: Callable[[], float]) -> None:
        """The next batch: those anchored before are left out, the rest recorded
        in one anchor and broadcast; the requests are acknowledged between."""
        batch = self.intake.batch()
        known = set(self.utxos.call("anchor_known", {"hashes": [d.hash for d in batch]})["known"])
        if known:
            # Anchored before: by other requests, or by this worker's last
            # attempt, recorded by the writer with its reply lost. That anchor is
            # open in the writer, signed and not broadcast: take it from there;
            # that attempt is over, and new documents need new request ids.
            self.ledger.reload()
            self.transactions.new_attempt()
        fresh = [d for d in batch if d.hash not in known]
        self.counters["duplicates"] += len(batch) - len(fresh)
        if fresh:
            anchor = self.transactions.record(fresh, self.sync.tip_height or 0)
        self.intake.done(batch, at())
        if fresh:
            self.transactions.broadcast(anchor, at())
