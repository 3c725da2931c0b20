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
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from anchor.bitcoind import (RPC_INVALID_ADDRESS_OR_KEY, RPC_INVALID_PARAMETER,
                             RPC_VERIFY_ALREADY_IN_CHAIN, RPC_VERIFY_ERROR, RPC_VERIFY_REJECTED,
                             BitcoinRpc, RpcError, RpcUnavailable, open_hashblock,
                             parse_hashblock, parse_tx, to_btc, vsize)
from proofs.merkle import MerkleTree
from proofs.document import op_return_payload, stored_payload
from anchor.health import anchor_health
from anchor.reservations import RETRYABLE, NoUtxo, UtxoClient
from anchor.audit import Sealer
from anchor.sync import WalletSync
from bus import control, protocol, security, sockets
from bus.client import BusError, HistoryClient, Publisher, Subscriber
from bus.config import BusConfig
from bus.http import HttpSide, Series, connection_series, control_series
from bus.logging import RateLimitedLog, get_logger
from bus.protocol import REQUEST_ID_REUSED, Message
from bus.runner import StopSignal

log = get_logger("anchor")

RBF_SEQUENCE = 0xFFFFFFFD      # signals replaceability (BIP 125)
DUST_SAT = 546                 # no change output below this: it goes to the fee
ESTIMATED_VSIZE = 160          # one P2WPKH input, a 37-byte OP_RETURN, one change output
BUMP_HEADROOM = 4              # the reserved UTXO covers fee bumps up to 4x the first rate
PROOFS_PER_EVENT = 500         # documents per anchor.submitted message (< 1 MiB)
MAX_REF_CHARS = protocol.MAX_ANCHOR_REF_CHARS
POLL_SECONDS = 0.2             # longest wait of one loop pass
REORG_WATCH_BLOCKS = 100       # confirmed anchors this recent are checked again at each block


class RequestRefused(ValueError):
    """An anchor.request that cannot be anchored (bad payload)."""


class BuildFailed(ValueError):
    """No valid anchor transaction could be built from the reserved UTXO."""


class UnsignableUtxo(BuildFailed):
    """bitcoind's wallet cannot sign for the UTXO (no key, or it is gone):
    it leaves the pool instead of being reserved again and again."""


@dataclass(slots=True)
class Document:
    hash: bytes
    ref: str | None
    message_id: int | None


def parse_request(payload: bytes) -> tuple[bytes, str | None]:
    """(hash, ref) of an anchor.request payload: a msgpack or JSON map
    {hash: 32 bytes or 64 hex chars, ref?: str}, or the 32 raw bytes."""
    if len(payload) == 32:
        return payload, None
    try:
        request = msgpack.unpackb(payload, raw=False)
    except Exception:
        try:
            request = json.loads(payload)
        except ValueError:
            raise RequestRefused("payload is not msgpack, JSON or 32 raw bytes") from None
    if not isinstance(request, dict):
        raise RequestRefused("payload must be a map {hash, ref?}")
    digest = request.get("hash")
    if isinstance(digest, str):
        try:
            digest = bytes.fromhex(digest)
        except ValueError:
            raise RequestRefused("'hash' is not hex") from None
    if not (isinstance(digest, bytes) and len(digest) == 32):
        raise RequestRefused("'hash' must be a SHA-256: 32 bytes or 64 hex characters")
    ref = request.get("ref")
    if ref is not None and not (isinstance(ref, str) and len(ref) <= MAX_REF_CHARS
                                and "\x00" not in ref):
        raise RequestRefused(f"'ref' must be a string of at most {MAX_REF_CHARS} characters,"
                             " no NUL")
    return digest, ref


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


class AnchorWorker:
    name = "anchor"

    def __init__(self, config: BusConfig) -> None:
        self.config = config
        self.counters = {"requests": 0, "refused": 0, "duplicates": 0, "anchored": 0,
                         "documents": 0, "broadcasts": 0, "bumps": 0, "confirmed": 0,
                         "failed": 0, "no_utxo": 0, "unavailable": 0, "blocks": 0,
                         "renewals": 0, "reorged": 0}
        self.pending: list[Document] = []
        self._pending_hashes: set[bytes] = set()
        self._pending_since: float | None = None
        self._last_taken: Message | None = None   # the newest request read
        self._batch_id: str | None = None          # request ids of the anchoring in progress
        self.open: dict[int, dict[str, Any]] = {}  # anchors not yet confirmed, by id
        self._leaves: dict[int, list[Document]] = {}
        self._recovered = False
        self._ready = False                        # recovered and synced once
        self._block_due = True                     # sync and check anchors at start
        self._next_block_poll = 0.0
        self._retry_at = 0.0
        self._backoff = 0.0
        self._warnings = RateLimitedLog(log)
        # What `stats` tells of bitcoind: its chain when last asked, and the
        # last error of a call (None once a call succeeds again).
        self.node: dict[str, Any] = {}
        self.node_error: str | None = None
        self.last_broadcast: dict[str, Any] | None = None
        self.ctx: zmq.Context | None = None
        self.http: HttpSide | None = None
        self.requests: Subscriber | None = None
        self.events: Publisher | None = None
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
        self.utxos = UtxoClient(cfg.control_endpoint, timeout_ms=cfg.request_timeout_ms,
                                retry_for_s=3 * cfg.request_timeout_ms / 1000, owner=owner,
                                context=self.ctx, curve=security.client_keys(cfg))
        self.rpc = BitcoinRpc(cfg.bitcoind_rpc_url, cfg.bitcoind_rpc_user,
                              cfg.bitcoind_rpc_password, cfg.bitcoind_rpc_cookie)
        self.hashblock = open_hashblock(self.ctx, cfg.bitcoind_zmq_hashblock) \
            if cfg.bitcoind_zmq_hashblock else None
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
        log.info("started", bitcoind=cfg.bitcoind_rpc_url, hashblock=cfg.bitcoind_zmq_hashblock,
                 consumer=cfg.anchor_consumer, config_source=cfg.source, config=cfg.public())

    def loop(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        while self.control.poll(0):  # between the steps below, each at most a poll or an RPC
            self.dispatcher.serve(self.control)
        self.guard.check(now)
        try:
            self._connect(now)
            self._take_requests(now)
            self._watch_blocks(now)
            if time.monotonic() >= self._retry_at:
                self._work()
                self._backoff = 0.0
        except NoUtxo as exc:
            self.counters["no_utxo"] += 1
            self._event(protocol.ANCHOR_ERROR_TOPIC, {
                "error": "no_utxo", "reason": str(exc), "documents": len(self.pending)})
            self._hold_back(exc, "no_utxo")
        except (RpcUnavailable, BusError) as exc:
            self.counters["unavailable"] += 1
            if isinstance(exc, RpcUnavailable):
                self.node_error = str(exc)
            self._hold_back(exc, "unavailable")
        except RpcError as exc:  # bitcoind refused a call (wallet locked, say): not fatal
            self._hold_back(exc, "bitcoind_refused")
        except BuildFailed as exc:
            self._event(protocol.ANCHOR_ERROR_TOPIC, {
                "error": "build_failed", "reason": str(exc), "documents": len(self.pending)})
            self._hold_back(exc, "build_failed")
        if self.events is not None:
            self.events.read_acks()

    def snapshot(self) -> dict[str, Any]:
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """`stats` of the anchor worker's control endpoint (docs/protocol.md)."""
        tip = self.sync.tip_height if self.sync is not None else None
        node_height = self.node.get("height")
        return {
            "counters": dict(self.counters),
            "queue": {"documents": len(self.pending),
                      "waiting_s": round(time.monotonic() - self._pending_since, 3)
                      if self._pending_since is not None else 0.0},
            "open_anchors": len(self.open),
            "open_by_status": dict(Counter(a["status"] for a in self.open.values())),
            "last_broadcast": self.last_broadcast,
            "bitcoind": {"url": self.config.bitcoind_rpc_url,
                         "reachable": self.node_error is None and bool(self.node),
                         "error": self.node_error, **self.node},
            "wallet_sync": {"tip_height": tip, "node_height": node_height,
                            "lag_blocks": node_height - tip
                            if node_height is not None and tip is not None else None,
                            "ready": self._ready,
                            "counters": dict(self.sync.counters) if self.sync is not None else {}},
            "retry_in_s": round(max(0.0, self._retry_at - time.monotonic()), 3),
            "control": self.dispatcher.counters.snapshot(),
            "memory": self.guard.snapshot(),
            "connections": self.guard.connections(),
            "security": security.snapshot(self.config),
            "audit": self.sealer.snapshot() if self.sealer is not None else None,
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
        return {"hash": digest, "waiting": digest in self._pending_hashes,
                "consumer": self.config.anchor_consumer, "reading": self.requests is not None,
                "read_through_id": self.requests.received_through
                if self.requests is not None else None,
                "documents": len(self.pending), "max_documents": self.config.anchor_max_documents}

    def status_line(self) -> str:
        return (f"{len(self.pending):,} documents waiting; {len(self.open):,} anchors open; "
                f"{self.counters['anchored']:,} anchored, {self.counters['confirmed']:,} "
                "confirmed")

    def shutdown(self) -> None:
        if self.requests is not None:
            self.requests.close()  # stores the position of what was recorded, no further
        if self.events is not None:
            try:
                self.events.flush(timeout=2.0)
            except BusError:
                log.warning("events_not_acknowledged", unacked=self.events.unacked)
            self.events.close()
        if getattr(self, "utxos", None) is not None:
            self.utxos.close()
            if self.sealer is not None:
                self.sealer.history.close()
            self.rpc.close()
        if self.ctx is not None:
            if self.hashblock is not None:
                self.hashblock.close()
            if getattr(self, "guard", None) is not None:
                self.guard.close()
            if getattr(self, "control", None) is not None:
                self.control.close(linger=0)
            if getattr(self, "auth", None) is not None:
                self.auth.stop()
            self.ctx.term()
            self.ctx = None
        log.info("anchor_stopped", pending=len(self.pending), open_anchors=len(self.open),
                 **self.counters)

    def _hold_back(self, exc: Exception, reason: str) -> None:
        """Retry the work later, backing off to BUS_ANCHOR_RETRY_MAX_S."""
        self._backoff = min(max(0.5, self._backoff * 2), self.config.anchor_retry_max_s)
        self._retry_at = time.monotonic() + self._backoff
        self._warnings.warning(reason, "anchor_held_back", error=str(exc),
                               retry_in_s=self._backoff, pending=len(self.pending))

    # --- the bus side -----------------------------------------------------------------

    def _connect(self, now: float) -> None:
        """Open what needs the bus (writer, reader, proxy) once they answer."""
        cfg = self.config
        if self.events is None:
            events = Publisher(cfg, context=self.ctx, send_timeout=5.0,
                               producer_id=f"anchor-{uuid.uuid4().hex[:12]}")
            events.connect()
            self.events = events
        if self.requests is None:
            # A new consumer starts before the first stored message (after_id=0),
            # not after the newest: requests stored before the worker's first
            # start (or while its consumer was gone) are read too. Those already
            # anchored are left out by _anchor_pending (anchor_known).
            self.requests = Subscriber([protocol.ANCHOR_REQUEST_TOPIC], cfg, context=self.ctx,
                                       durable=cfg.anchor_consumer, auto_ack=False, after_id=0)
        if self.sync is None:
            self.sync = WalletSync(self.rpc, self.utxos, cfg.anchor_sync_page)
        if self.sealer is None and cfg.sealed_prefixes:
            self.sealer = Sealer(cfg.sealed_prefixes, cfg.audit_interval_s,
                                 cfg.audit_max_messages, cfg.audit_max_rate, self.utxos,
                                 HistoryClient(cfg, context=self.ctx), self._anchor_seal)

    def _take_requests(self, now: float) -> None:
        """Read requests until the batch is full or the wait is over."""
        wake = now + POLL_SECONDS
        if self._pending_since is not None:  # not before a back-off ends: no spinning
            wake = min(wake, max(self._pending_since + self.config.anchor_interval_s,
                                 self._retry_at))
        if self.sealer is not None and self.sealer.wake_at() is not None:
            wake = min(wake, max(now, self.sealer.wake_at()))  # a seal's next page
        wait = max(0.0, wake - now)
        if len(self.pending) >= self.config.anchor_max_documents or self.requests is None:
            self.poller.poll(int(wait * 1000))
            return
        msg = self.requests.receive(wait)
        while msg is not None:
            self._accept(msg)
            if len(self.pending) >= self.config.anchor_max_documents:
                break
            msg = self.requests.receive(0)
        if not self.pending and self._last_taken is not None:
            self.requests.ack(self._last_taken)  # only refused or repeated requests read

    def _accept(self, msg: Message) -> None:
        self.counters["requests"] += 1
        self._last_taken = msg
        try:
            digest, ref = parse_request(msg.payload)
        except RequestRefused as exc:
            self.counters["refused"] += 1
            self._warnings.warning("refused", "anchor_request_refused", message_id=msg.id,
                                   detail=str(exc))
            self._event(protocol.ANCHOR_ERROR_TOPIC, {"error": "bad_request", "reason": str(exc),
                                                      "message_id": msg.id})
            return
        if digest in self._pending_hashes:
            self.counters["duplicates"] += 1
            return
        self._pending_hashes.add(digest)
        self.pending.append(Document(digest, ref, msg.id))
        if self._pending_since is None:
            self._pending_since = time.monotonic()

    def _event(self, topic: str, body: dict[str, Any]) -> None:
        # Never before _connect() has opened the publisher: no work happens before.
        self.events.publish(topic, msgpack.packb(body), content_type=protocol.CONTENT_MSGPACK)

    def _flush_events(self) -> None:
        """Wait until the writer has stored the events published so far (they are
        re-sent meanwhile if need be); on a timeout they stay queued for the next
        flush, and the work goes on."""
        if self.events is None or not self.events.unacked:
            return
        try:
            self.events.flush(timeout=self.config.request_timeout_ms / 1000)
        except BusError as exc:
            self._warnings.warning("events", "events_not_acknowledged", error=str(exc),
                                   unacked=self.events.unacked)

    # --- blocks -----------------------------------------------------------------------

    def _watch_blocks(self, now: float) -> None:
        if self.hashblock is not None:
            while self.hashblock.poll(0):
                if parse_hashblock(self.hashblock.recv_multipart()) is not None:
                    self._block_due = True
        if now >= self._next_block_poll and self.sync is not None:
            # The fallback: notifications can be lost (HWM, a bitcoind restart).
            self._next_block_poll = now + self.config.anchor_block_poll_s
            chain = self.rpc.call("getblockchaininfo")
            self.node = {"height": chain["blocks"], "best": chain["bestblockhash"],
                         "seen_ns": time.time_ns()}
            self.node_error = None
            if chain["bestblockhash"] != self.sync.tip_hash:
                self._block_due = True

    # --- the work ---------------------------------------------------------------------

    def _work(self) -> None:
        if not self._ready:
            if not self._recovered:
                self._recover()
            self.sync.sync()
            self._ready = True
            log.info("anchor_ready", tip_height=self.sync.tip_height, open_anchors=len(self.open))
        if self._block_due:
            self._block_due = False
            try:
                if self.sync.sync():
                    self.counters["blocks"] += 1
                self._check_open()
                self._recheck_confirmed()
            except BaseException:
                self._block_due = True
                raise
        for anchor in list(self.open.values()):
            if anchor["status"] == "signed":
                self._broadcast(anchor)
        if self.sealer is not None:
            self.sealer.step(time.monotonic())
        if self.pending and (len(self.pending) >= self.config.anchor_max_documents or
                             time.monotonic() >= self._pending_since
                             + self.config.anchor_interval_s):
            self._anchor_pending()

    def _recover(self) -> None:
        """The anchors a previous run recorded and did not see confirmed, and
        the seals it closed and did not anchor."""
        self._reload_open()
        for seal_id, root, _size in self.utxos.call("audit_unanchored", {})["seals"]:
            self._anchor_seal(seal_id, root)
        self._recovered = True
        if self.open:
            log.info("anchors_recovered", open=len(self.open),
                     signed=sum(a["status"] == "signed" for a in self.open.values()))

    def _anchor_seal(self, seal_id: int, root: bytes) -> None:
        """A seal's root joins the documents to anchor, like a requested hash."""
        if root not in self._pending_hashes:
            self._pending_hashes.add(root)
            self.pending.append(Document(root, f"audit-seal:{seal_id}", None))
            self._pending_since = self._pending_since or time.monotonic()

    def _reload_open(self) -> None:
        """The writer's open anchors replace the ones held here. After a lost
        reply the writer's record is what happened: an anchor recorded whose
        reply never came (signed, to broadcast), a fee bump committed under
        an earlier build (its txid and raw_tx, not this process's)."""
        self.open = {anchor["anchor_id"]: anchor
                     for anchor in self.utxos.call("anchor_open", {})["anchors"]}

    def _fee_rate(self) -> float:
        cfg = self.config
        rate = cfg.anchor_fee_rate_sat_vb
        if not rate:
            estimate = self.rpc.call("estimatesmartfee", cfg.anchor_conf_target)
            rate = float(estimate["feerate"]) * 100_000 if "feerate" in estimate \
                else cfg.anchor_fallback_fee_rate_sat_vb
        return min(max(rate, 1.0), cfg.anchor_max_fee_rate_sat_vb)

    def _anchor_pending(self) -> None:
        batch = self.pending[:self.config.anchor_max_documents]
        known = set(self.utxos.call("anchor_known", {"hashes": [d.hash for d in batch]})["known"])
        if known:
            # Anchored before: by other requests, or by this worker's last
            # attempt, recorded by the writer with its reply lost. That anchor is
            # open in the writer, signed and not broadcast: take it from there;
            # that attempt is over, and new documents need new request ids.
            self._reload_open()
            self._batch_id = None
        fresh = [d for d in batch if d.hash not in known]
        self.counters["duplicates"] += len(batch) - len(fresh)
        if fresh:
            self._batch_id = self._batch_id or uuid.uuid4().hex
            anchor = self._record(fresh)
        self._forget(batch)
        if fresh:
            self._broadcast(anchor)

    def _forget(self, batch: list[Document]) -> None:
        """The batch is recorded (or was anchored before): it is done here, and the
        durable position moves past its newest request."""
        del self.pending[:len(batch)]
        for doc in batch:
            self._pending_hashes.discard(doc.hash)
        self._pending_since = time.monotonic() if self.pending else None
        self._batch_id = None
        if not self.pending:
            self.requests.ack(self._last_taken)
        else:  # the rest of what was read waits for the next anchoring
            self.requests.ack(max(d.message_id or 0 for d in batch))

    def _record(self, docs: list[Document]) -> dict[str, Any]:
        cfg = self.config
        tree = MerkleTree([d.hash for d in docs])
        rate = self._fee_rate()
        need = math.ceil(rate * ESTIMATED_VSIZE * BUMP_HEADROOM) + DUST_SAT
        try:
            lease = self.utxos.reserve(need, cfg.anchor_lease_s,
                                       min_confirmations=cfg.anchor_utxo_min_confirmations,
                                       request_id=f"{self._batch_id}-reserve")
        except NoUtxo:
            self._batch_id = None
            raise
        try:
            # Locked in bitcoind's wallet too, so that another spend from the
            # same wallet (sendtoaddress, an operator's payment) cannot take it
            # while it is built, recorded and broadcast; persistent across a
            # bitcoind restart. Spending it unlocks it (bitcoind's AddToSpends).
            self._lock(lease)
            tx = self._build(lease, op_return_payload(tree.root, tree.size), rate,
                             keep=self._lease_keeper(lease))
            tip = self.sync.tip_height or 0
            recorded = self.utxos.call("anchor_record", {
                "request_id": f"{self._batch_id}-record", "root": tree.root, "size": tree.size,
                "documents": [[d.hash, d.ref, d.message_id] for d in docs],
                "lease_id": lease["lease_id"], "tip_height": tip, **tx})
        except (RpcUnavailable, RpcError, BuildFailed) as exc:
            if isinstance(exc, UnsignableUtxo):
                self.utxos.remove([(lease["txid"], lease["vout"])])
            else:
                self.utxos.release(lease["lease_id"])
                self._unlock(lease)
            self._batch_id = None  # the next attempt is a new request, for a new lease
            raise
        except BusError as exc:
            # A timeout leaves the outcome unknown: the retry keeps the request
            # ids and gets the writer's stored replies. A refusal (the lease ran
            # out, say) is final: the next attempt starts afresh.
            if exc.code not in RETRYABLE:
                self._batch_id = None
            raise
        anchor = {"anchor_id": recorded["anchor_id"], "root": tree.root, "size": tree.size,
                  "txid": tx["txid"], "raw_tx": tx["raw_tx"], "fee_sat": tx["fee_sat"],
                  "vsize": tx["vsize"], "lease_id": lease["lease_id"],
                  "utxo_txid": lease["txid"], "utxo_vout": lease["vout"], "replaced_txids": [],
                  "status": "signed", "broadcast_height": tip}
        self.open[anchor["anchor_id"]] = anchor
        self._leaves[anchor["anchor_id"]] = docs
        self.counters["anchored"] += 1
        self.counters["documents"] += len(docs)
        log.info("anchor_recorded", anchor_id=anchor["anchor_id"], txid=tx["txid"],
                 documents=len(docs), root=tree.root.hex(), fee_sat=tx["fee_sat"],
                 vsize=tx["vsize"], fee_rate=round(tx["fee_sat"] / tx["vsize"], 2))
        return anchor

    def _lease_keeper(self, lease: dict[str, Any]) -> Any:
        """A function the build calls between its RPC calls: it renews the lease
        once half of it has passed, so a slow node (each call up to 30 s)
        does not let it run out before the anchor is recorded."""
        lease_s = self.config.anchor_lease_s
        due = [time.monotonic() + lease_s / 2]

        def keep() -> None:
            if time.monotonic() >= due[0]:
                self.utxos.renew(lease["lease_id"], lease_s)
                self.counters["renewals"] += 1
                due[0] = time.monotonic() + lease_s / 2
        return keep

    def _lock(self, lease: dict[str, Any]) -> None:
        try:
            self.rpc.call("lockunspent", False, [{"txid": lease["txid"], "vout": lease["vout"]}],
                          True)
        except RpcError as exc:
            if exc.code == RPC_INVALID_PARAMETER:  # unknown to the wallet, or spent already
                raise UnsignableUtxo(f"UTXO {lease['txid']}:{lease['vout']}: {exc.message}"
                                     ) from None
            raise

    def _unlock(self, lease: dict[str, Any]) -> None:
        """Unlock a released UTXO in bitcoind's wallet. Not fatal: a coin left
        locked stays out of the wallet's other spends, not out of the bus's."""
        try:
            self.rpc.call("lockunspent", True, [{"txid": lease["txid"], "vout": lease["vout"]}])
        except (RpcError, RpcUnavailable) as exc:
            self._warnings.warning("unlock", "utxo_unlock_failed", txid=lease["txid"],
                                   vout=lease["vout"], error=str(exc))

    def _build(self, utxo: dict[str, Any], payload: bytes, rate: float,
               min_fee: int = 0, keep: Any = lambda: None) -> dict[str, Any]:
        """Sign, with bitcoind's wallet, a transaction spending `utxo` into one
        OP_RETURN (`payload`) and change, paying `rate` sat/vB (and at least `min_fee`).
        Signed again when the estimated size was wrong, with the fee of the real
        size. `keep()` runs after each call (renewing the lease)."""
        change_address = self.rpc.call("getrawchangeaddress")
        keep()
        inputs = [{"txid": utxo["txid"], "vout": utxo["vout"], "sequence": RBF_SEQUENCE}]
        size = ESTIMATED_VSIZE
        for attempt in range(3):
            fee = max(math.ceil(rate * size), min_fee)
            change = utxo["amount_sat"] - fee
            if change < 0:
                raise BuildFailed(f"UTXO {utxo['txid']}:{utxo['vout']} of {utxo['amount_sat']} sat"
                                 f" cannot pay a fee of {fee} sat")
            outputs: list[dict[str, Any]] = [{"data": payload.hex()}]
            if change >= DUST_SAT:
                outputs.append({change_address: to_btc(change)})
            raw = self.rpc.call("createrawtransaction", inputs, outputs, 0, True)
            keep()
            signed = self.rpc.call("signrawtransactionwithwallet", raw)
            keep()
            if not signed.get("complete"):
                raise UnsignableUtxo(f"bitcoind's wallet cannot sign for UTXO {utxo['txid']}:"
                                     f"{utxo['vout']}: {signed.get('errors')}")
            tx = parse_tx(signed["hex"])
            actual = vsize(tx)
            needed = max(math.ceil(rate * actual), min_fee)
            if needed == fee or (needed < fee and attempt > 0):
                break  # exact, or over by a signature byte after a second signing
            size = actual
        if needed > fee:
            raise BuildFailed(f"the fee of {fee} sat did not settle at {rate} sat/vB")
        if change < DUST_SAT:
            fee, change = utxo["amount_sat"], 0
        txid = tx.txid().hex()
        change_outputs = [{"txid": txid, "vout": 1, "amount_sat": change,
                           "address": change_address,
                           "script_pubkey": tx.vout[1].script_pubkey.data.hex()}] if change else []
        return {"txid": txid, "raw_tx": bytes.fromhex(signed["hex"]), "fee_sat": fee,
                "vsize": actual, "change": change_outputs}

    def _broadcast(self, anchor: dict[str, Any]) -> None:
        max_rate = to_btc(math.ceil(self.config.anchor_max_fee_rate_sat_vb * 1000))
        try:
            self.rpc.call("sendrawtransaction", anchor["raw_tx"].hex(), max_rate)
        except RpcError as exc:
            if exc.code in (RPC_VERIFY_ERROR, RPC_VERIFY_REJECTED):
                # bitcoind says "already in chain" only while an output of the
                # transaction is unspent; once its change is spent, a mined
                # anchor's inputs are "missing or spent" (-25), as they would be
                # for a transaction that lost to another spend. The chain tells.
                mined = self._mined(anchor)
                if mined is None:
                    self._refused(anchor, exc)
                    return
                log.info("anchor_found_mined", anchor_id=anchor["anchor_id"], txid=mined[0],
                         refusal=exc.message)
                self._block_due = True  # count its confirmations at the next pass
            elif exc.code != RPC_VERIFY_ALREADY_IN_CHAIN:
                raise
        self.utxos.call("anchor_update", {"anchor_id": anchor["anchor_id"],
                                          "status": "submitted"})
        anchor["status"] = "submitted"
        self.counters["broadcasts"] += 1
        self.last_broadcast = {"anchor_id": anchor["anchor_id"], "txid": anchor["txid"],
                               "time_ns": time.time_ns()}
        self._announce(anchor)

    def _refused(self, anchor: dict[str, Any], exc: RpcError) -> None:
        """bitcoind will not take the transaction. A fee bump refused: the one
        before it stands. A first transaction refused: the anchor fails, its
        documents are requested again and its UTXO goes back (unless spent)."""
        if anchor["replaced_txids"]:
            log.warning("fee_bump_refused", anchor_id=anchor["anchor_id"], txid=anchor["txid"],
                        error=exc.message)
            anchor["status"] = "submitted"  # the previous transaction is still out there
            return
        inputs_spent = "missingorspent" in exc.message
        self.utxos.call("anchor_fail", {"anchor_id": anchor["anchor_id"], "reason": exc.message,
                                        "inputs_spent": inputs_spent})
        del self.open[anchor["anchor_id"]]
        docs = self._documents(anchor)
        del self._leaves[anchor["anchor_id"]]
        for doc in docs:
            if doc.hash not in self._pending_hashes:
                self._pending_hashes.add(doc.hash)
                self.pending.append(doc)
        self._pending_since = self._pending_since or time.monotonic()
        self.counters["failed"] += 1
        log.error("anchor_refused", anchor_id=anchor["anchor_id"], txid=anchor["txid"],
                  error=exc.message, documents_requeued=len(docs))
        self._event(protocol.ANCHOR_ERROR_TOPIC, {
            "error": "transaction_refused", "reason": exc.message, "txid": anchor["txid"],
            "anchor_id": anchor["anchor_id"], "documents": len(docs)})
        self._flush_events()

    def _documents(self, anchor: dict[str, Any]) -> list[Document]:
        """The anchor's documents in leaf order: kept from its recording, or (for
        an anchor recovered after a restart) asked of the writer once."""
        docs = self._leaves.get(anchor["anchor_id"])
        if docs is None:
            leaves = self.utxos.call("anchor_leaves",
                                     {"anchor_id": anchor["anchor_id"]})["leaves"]
            docs = self._leaves[anchor["anchor_id"]] = [Document(h, ref, mid)
                                                        for h, ref, mid in leaves]
        return docs

    def _announce(self, anchor: dict[str, Any]) -> None:
        """anchor.submitted: the txid, the root, and each document's proof."""
        docs = self._documents(anchor)
        tree = MerkleTree([d.hash for d in docs])
        for start in range(0, len(docs), PROOFS_PER_EVENT):
            self._event(protocol.ANCHOR_SUBMITTED_TOPIC, {
                "anchor_id": anchor["anchor_id"], "txid": anchor["txid"], "root": tree.root,
                "tree_size": tree.size, "fee_sat": anchor["fee_sat"],
                "replaces": anchor["replaced_txids"][-1] if anchor["replaced_txids"] else None,
                "documents": [{"hash": d.hash, "ref": d.ref, "leaf_index": i,
                               "path": tree.path(i)}
                              for i, d in enumerate(docs[start:start + PROOFS_PER_EVENT], start)]})
        self._flush_events()

    def _recheck_confirmed(self) -> None:
        """After a block: a confirmed anchor's block can still be taken away
        by a reorg deeper than BUS_ANCHOR_CONFIRMATIONS. Those confirmed in
        the last REORG_WATCH_BLOCKS blocks are asked again: deep enough in
        another block now, the record (and its proofs) name that one; in none
        (or not deep enough yet), the anchor is `submitted` again and tracked
        to a new confirmation."""
        tip = self.sync.tip_height or 0
        watched = self.utxos.call("anchor_confirmed",
                                  {"min_height": max(0, tip - REORG_WATCH_BLOCKS)})["anchors"]
        for anchor in watched:
            try:
                info = self.rpc.call("gettransaction", anchor["txid"])
            except RpcError as exc:
                if exc.code != RPC_INVALID_ADDRESS_OR_KEY:
                    raise
                info = {"confirmations": 0}
            if info.get("confirmations", 0) > 0 and info.get("blockhash") == anchor["block_hash"]:
                continue
            log.warning("anchor_reorged", anchor_id=anchor["anchor_id"], txid=anchor["txid"],
                        old_block=anchor["block_hash"], old_height=anchor["block_height"],
                        now_block=info.get("blockhash"), confirmations=info.get("confirmations"))
            self.counters["reorged"] += 1
            if info.get("confirmations", 0) >= self.config.anchor_confirmations:
                self._confirmed(anchor, anchor["txid"], info)  # deep enough in its new block
                continue
            self.utxos.call("anchor_update", {"anchor_id": anchor["anchor_id"],
                                              "status": "unconfirmed"})
            self.open[anchor["anchor_id"]] = {**anchor, "status": "submitted",
                                              "block_hash": None, "block_height": None}
            self._event(protocol.ANCHOR_ERROR_TOPIC, {
                "error": "reorged", "reason": f"block {anchor['block_hash']} left the best chain",
                "anchor_id": anchor["anchor_id"], "txid": anchor["txid"]})
            self._flush_events()

    def _check_open(self) -> None:
        """After a block: confirm what is deep enough, bump what is stuck."""
        tip = self.sync.tip_height or 0
        for anchor in list(self.open.values()):
            if anchor["status"] != "submitted":
                continue
            mined = self._mined(anchor)
            if mined is not None:
                txid, info = mined
                if info["confirmations"] >= self.config.anchor_confirmations:
                    self._confirmed(anchor, txid, info)
            elif tip - anchor["broadcast_height"] >= self.config.anchor_bump_after_blocks:
                self._bump(anchor, tip)

    def _mined(self, anchor: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """The anchor's transaction that is in a block, if any (after a fee bump,
        the replaced one may be the one mined)."""
        for txid in [anchor["txid"], *reversed(anchor["replaced_txids"])]:
            try:
                info = self.rpc.call("gettransaction", txid)
            except RpcError as exc:
                if exc.code == RPC_INVALID_ADDRESS_OR_KEY:  # never reached this node
                    continue
                raise
            if info.get("confirmations", 0) > 0:
                return txid, info
        return None

    def _confirmed(self, anchor: dict[str, Any], txid: str, info: dict[str, Any]) -> None:
        self.utxos.call("anchor_update", {"anchor_id": anchor["anchor_id"], "status": "confirmed",
                                          "txid": txid, "block_hash": info["blockhash"],
                                          "block_height": info["blockheight"]})
        self.open.pop(anchor["anchor_id"], None)  # not open: confirmed again after a reorg
        self._leaves.pop(anchor["anchor_id"], None)
        self.counters["confirmed"] += 1
        log.info("anchor_confirmed", anchor_id=anchor["anchor_id"], txid=txid,
                 block_height=info["blockheight"], confirmations=info["confirmations"])
        self._event(protocol.ANCHOR_CONFIRMED_TOPIC, {
            "anchor_id": anchor["anchor_id"], "txid": txid, "root": anchor["root"],
            "tree_size": anchor["size"], "block_hash": info["blockhash"],
            "block_height": info["blockheight"], "confirmations": info["confirmations"]})
        self._flush_events()

    def _bump(self, anchor: dict[str, Any], tip: int) -> None:
        """Replace the transaction: same input, same OP_RETURN, a higher fee (BIP 125:
        more than the old fee plus 1 sat/vB of the new size)."""
        cfg = self.config
        old_rate = anchor["fee_sat"] / anchor["vsize"]
        rate = min(max(old_rate * 1.5, old_rate + 1), cfg.anchor_max_fee_rate_sat_vb)
        if rate <= old_rate:
            self._warnings.warning(f"capped-{anchor['anchor_id']}", "fee_bump_capped",
                                   anchor_id=anchor["anchor_id"], fee_rate=round(old_rate, 2))
            return
        utxo = self.utxos.get(anchor["utxo_txid"], anchor["utxo_vout"])
        # The same OP_RETURN data as the transaction it replaces (an anchor
        # made before the tree size was committed keeps its version 1 data).
        tx = self._build(utxo, stored_payload(anchor), rate,
                         min_fee=anchor["fee_sat"] + anchor["vsize"] + 1)
        try:
            replaced = self.utxos.call("anchor_replace", {
                "request_id": f"bump-{anchor['anchor_id']}-{anchor['txid']}",
                "anchor_id": anchor["anchor_id"], "tip_height": tip, **tx})
        except BusError as exc:
            if exc.code != REQUEST_ID_REUSED:
                raise
            replaced = None
        if replaced is None or replaced["txid"] != tx["txid"]:
            # This bump was recorded before, from an earlier build whose reply
            # was lost: that build is the anchor's transaction now; this one is
            # never broadcast (it would not be the recorded txid).
            log.warning("fee_bump_recorded_before", anchor_id=anchor["anchor_id"],
                        built_txid=tx["txid"])
            self._reload_open()
            current = self.open.get(anchor["anchor_id"])
            if current is not None and current["status"] == "signed":
                self._broadcast(current)
            return
        anchor["replaced_txids"] = anchor["replaced_txids"] + [anchor["txid"]]
        anchor.update(txid=replaced["txid"], raw_tx=tx["raw_tx"], fee_sat=tx["fee_sat"],
                      vsize=tx["vsize"], status="signed", broadcast_height=tip)
        self.counters["bumps"] += 1
        log.info("anchor_fee_bumped", anchor_id=anchor["anchor_id"], txid=replaced["txid"],
                 replaces=replaced["replaced_txid"], fee_sat=tx["fee_sat"],
                 fee_rate=round(tx["fee_sat"] / tx["vsize"], 2))
        self._broadcast(anchor)
