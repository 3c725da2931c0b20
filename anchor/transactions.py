"""An anchor's transactions: built, signed, recorded, broadcast, fee-bumped.

Record-then-broadcast: a batch's transaction spends one reserved UTXO (a
lease from the writer, locked in bitcoind's wallet too) into one OP_RETURN
(b"BUSA" 0x02 root size) and change back to the wallet; bitcoind's wallet
signs it; the writer RECORDS it (anchor, documents, UTXO spent: one
transaction) before it is broadcast, so a crash at any point leaves either
nothing (the lease expires) or a recorded transaction, which the next start
broadcasts. A fee bump spends the same input into the same OP_RETURN at a
higher fee (RBF), so at most one of an anchor's transactions is ever mined.

The time a step happens at is passed in (`now`); `clock` only paces the
renewal of a lease during one build (a slow node takes up to 30 s a call).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from anchor.bitcoind import (RPC_INVALID_PARAMETER, RPC_VERIFY_ALREADY_IN_CHAIN,
                             RPC_VERIFY_ERROR, RPC_VERIFY_REJECTED, BitcoinRpc, RpcError,
                             RpcUnavailable, parse_tx, to_btc, vsize)
from anchor.events import AnchorEvents
from anchor.ledger import OpenAnchors, mined_transaction
from anchor.requests import Document
from anchor.reservations import RETRYABLE, NoUtxo, UtxoClient
from bus import protocol
from bus.client import BusError
from bus.config import BusConfig
from bus.logging import RateLimitedLog, get_logger
from bus.protocol import REQUEST_ID_REUSED, AnchorStatus
from proofs.document import op_return_payload, stored_payload
from proofs.merkle import MerkleTree

log = get_logger("anchor")

RBF_SEQUENCE = 0xFFFFFFFD      # signals replaceability (BIP 125)
DUST_SAT = 546                 # no change output below this: it goes to the fee
ESTIMATED_VSIZE = 160          # one P2WPKH input, a 37-byte OP_RETURN, one change output
BUMP_HEADROOM = 4              # the reserved UTXO covers fee bumps up to 4x the first rate


class BuildFailed(ValueError):
    """No valid anchor transaction could be built from the reserved UTXO."""


class UnsignableUtxo(BuildFailed):
    """bitcoind's wallet cannot sign for the UTXO (no key, or it is gone):
    it leaves the pool instead of being reserved again and again."""


class Transactions:
    """`requeue(docs, now)` takes back the documents of an anchor whose first
    transaction bitcoind refused; `found_mined()` asks for the next block
    check (a transaction found in the chain when broadcast again)."""

    def __init__(self, config: BusConfig, rpc: BitcoinRpc, utxos: UtxoClient,
                 ledger: OpenAnchors, events: AnchorEvents, counters: dict[str, int],
                 warnings: RateLimitedLog, requeue: Callable[[list[Document], float], None],
                 found_mined: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.rpc = rpc
        self.utxos = utxos
        self.ledger = ledger
        self.events = events
        self.counters = counters
        self.warnings = warnings
        self.requeue = requeue
        self.found_mined = found_mined
        self.clock = clock
        self.batch_id: str | None = None   # request ids of the anchoring in progress
        self.last_broadcast: dict[str, Any] | None = None

    def new_attempt(self) -> None:
        """The next record is a new request (new request ids, a new lease)."""
        self.batch_id = None

    # --- a new anchor -----------------------------------------------------------------

    def fee_rate(self) -> float:
        cfg = self.config
        rate = cfg.anchor_fee_rate_sat_vb
        if not rate:
            estimate = self.rpc.call("estimatesmartfee", cfg.anchor_conf_target)
            rate = float(estimate["feerate"]) * 100_000 if "feerate" in estimate \
                else cfg.anchor_fallback_fee_rate_sat_vb
        return min(max(rate, 1.0), cfg.anchor_max_fee_rate_sat_vb)

    def record(self, docs: list[Document], tip: int) -> dict[str, Any]:
        """Reserve a UTXO, lock it, build and sign the anchor of `docs`, and
        record it through the writer: the anchor, open and `signed`. A retry
        after a timeout keeps the request ids (the writer answers with its
        stored replies); any other failure ends the attempt."""
        cfg = self.config
        self.batch_id = self.batch_id or uuid.uuid4().hex
        tree = MerkleTree([d.hash for d in docs])
        rate = self.fee_rate()
        need = math.ceil(rate * ESTIMATED_VSIZE * BUMP_HEADROOM) + DUST_SAT
        try:
            lease = self.utxos.reserve(need, cfg.anchor_lease_s,
                                       min_confirmations=cfg.anchor_utxo_min_confirmations,
                                       request_id=f"{self.batch_id}-reserve")
        except NoUtxo:
            self.batch_id = None
            raise
        try:
            # Locked in bitcoind's wallet too, so that another spend from the
            # same wallet (sendtoaddress, an operator's payment) cannot take it
            # while it is built, recorded and broadcast; persistent across a
            # bitcoind restart. Spending it unlocks it (bitcoind's AddToSpends).
            self.lock(lease)
            tx = self.build(lease, op_return_payload(tree.root, tree.size), rate,
                            keep=self.lease_keeper(lease))
            recorded = self.utxos.call("anchor_record", {
                "request_id": f"{self.batch_id}-record", "root": tree.root, "size": tree.size,
                "documents": [[d.hash, d.ref, d.message_id] for d in docs],
                "lease_id": lease["lease_id"], "tip_height": tip, **tx})
        except (RpcUnavailable, RpcError, BuildFailed) as exc:
            if isinstance(exc, UnsignableUtxo):
                self.utxos.remove([(lease["txid"], lease["vout"])])
            else:
                self.utxos.release(lease["lease_id"])
                self.unlock(lease)
            self.batch_id = None  # the next attempt is a new request, for a new lease
            raise
        except BusError as exc:
            # A timeout leaves the outcome unknown: the retry keeps the request
            # ids and gets the writer's stored replies. A refusal (the lease ran
            # out, say) is final: the next attempt starts afresh.
            if exc.code not in RETRYABLE:
                self.batch_id = None
            raise
        self.batch_id = None  # recorded: this attempt is over
        anchor = {"anchor_id": recorded["anchor_id"], "root": tree.root, "size": tree.size,
                  "txid": tx["txid"], "raw_tx": tx["raw_tx"], "fee_sat": tx["fee_sat"],
                  "vsize": tx["vsize"], "lease_id": lease["lease_id"],
                  "utxo_txid": lease["txid"], "utxo_vout": lease["vout"], "replaced_txids": [],
                  "status": AnchorStatus.SIGNED, "broadcast_height": tip}
        self.ledger.add(anchor, docs)
        self.counters["anchored"] += 1
        self.counters["documents"] += len(docs)
        log.info("anchor_recorded", anchor_id=anchor["anchor_id"], txid=tx["txid"],
                 documents=len(docs), root=tree.root.hex(), fee_sat=tx["fee_sat"],
                 vsize=tx["vsize"], fee_rate=round(tx["fee_sat"] / tx["vsize"], 2))
        return anchor

    def lease_keeper(self, lease: dict[str, Any]) -> Callable[[], None]:
        """A function the build calls between its RPC calls: it renews the lease
        once half of it has passed, so a slow node (each call up to 30 s)
        does not let it run out before the anchor is recorded."""
        lease_s = self.config.anchor_lease_s
        due = [self.clock() + lease_s / 2]

        def keep() -> None:
            if self.clock() >= due[0]:
                self.utxos.renew(lease["lease_id"], lease_s)
                self.counters["renewals"] += 1
                due[0] = self.clock() + lease_s / 2
        return keep

    def lock(self, lease: dict[str, Any]) -> None:
        try:
            self.rpc.call("lockunspent", False, [{"txid": lease["txid"], "vout": lease["vout"]}],
                          True)
        except RpcError as exc:
            if exc.code == RPC_INVALID_PARAMETER:  # unknown to the wallet, or spent already
                raise UnsignableUtxo(f"UTXO {lease['txid']}:{lease['vout']}: {exc.message}"
                                     ) from None
            raise

    def unlock(self, lease: dict[str, Any]) -> None:
        """Unlock a released UTXO in bitcoind's wallet. Not fatal: a coin left
        locked stays out of the wallet's other spends, not out of the bus's."""
        try:
            self.rpc.call("lockunspent", True, [{"txid": lease["txid"], "vout": lease["vout"]}])
        except (RpcError, RpcUnavailable) as exc:
            self.warnings.warning("unlock", "utxo_unlock_failed", txid=lease["txid"],
                                  vout=lease["vout"], error=str(exc))

    def build(self, utxo: dict[str, Any], payload: bytes, rate: float,
              min_fee: int = 0, keep: Callable[[], None] = lambda: None) -> dict[str, Any]:
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

    # --- out to the network -----------------------------------------------------------

    def broadcast_signed(self, now: float) -> None:
        """Send every recorded transaction not yet accepted (after a restart,
        or one held back by an unreachable node)."""
        for anchor in self.ledger.with_status(AnchorStatus.SIGNED):
            self.broadcast(anchor, now)

    def broadcast(self, anchor: dict[str, Any], now: float) -> None:
        max_rate = to_btc(math.ceil(self.config.anchor_max_fee_rate_sat_vb * 1000))
        try:
            self.rpc.call("sendrawtransaction", anchor["raw_tx"].hex(), max_rate)
        except RpcError as exc:
            if exc.code in (RPC_VERIFY_ERROR, RPC_VERIFY_REJECTED):
                # bitcoind says "already in chain" only while an output of the
                # transaction is unspent; once its change is spent, a mined
                # anchor's inputs are "missing or spent" (-25), as they would be
                # for a transaction that lost to another spend. The chain tells.
                mined = mined_transaction(self.rpc, anchor)
                if mined is None:
                    self._refused(anchor, exc, now)
                    return
                log.info("anchor_found_mined", anchor_id=anchor["anchor_id"], txid=mined[0],
                         refusal=exc.message)
                self.found_mined()  # count its confirmations at the next pass
            elif exc.code != RPC_VERIFY_ALREADY_IN_CHAIN:
                raise
        self.utxos.call("anchor_update", {"anchor_id": anchor["anchor_id"],
                                          "status": AnchorStatus.SUBMITTED})
        anchor["status"] = AnchorStatus.SUBMITTED
        self.counters["broadcasts"] += 1
        self.last_broadcast = {"anchor_id": anchor["anchor_id"], "txid": anchor["txid"],
                               "time_ns": time.time_ns()}
        self.events.submitted(anchor, self.ledger.documents(anchor))

    def _refused(self, anchor: dict[str, Any], exc: RpcError, now: float) -> None:
        """bitcoind will not take the transaction. A fee bump refused: the one
        before it stands. A first transaction refused: the anchor fails, its
        documents are requested again and its UTXO goes back (unless spent)."""
        if anchor["replaced_txids"]:
            log.warning("fee_bump_refused", anchor_id=anchor["anchor_id"], txid=anchor["txid"],
                        error=exc.message)
            anchor["status"] = AnchorStatus.SUBMITTED  # the previous one is still out there
            return
        inputs_spent = "missingorspent" in exc.message
        self.utxos.call("anchor_fail", {"anchor_id": anchor["anchor_id"], "reason": exc.message,
                                        "inputs_spent": inputs_spent})
        docs = self.ledger.drop(anchor)
        self.requeue(docs, now)
        self.counters["failed"] += 1
        log.error("anchor_refused", anchor_id=anchor["anchor_id"], txid=anchor["txid"],
                  error=exc.message, documents_requeued=len(docs))
        self.events.emit(protocol.ANCHOR_ERROR_TOPIC, {
            "error": protocol.TRANSACTION_REFUSED, "reason": exc.message, "txid": anchor["txid"],
            "anchor_id": anchor["anchor_id"], "documents": len(docs)})
        self.events.flush()

    # --- fee bumps --------------------------------------------------------------------

    def bump(self, anchor: dict[str, Any], tip: int, now: float) -> None:
        """Replace the transaction: same input, same OP_RETURN, a higher fee (BIP 125:
        more than the old fee plus 1 sat/vB of the new size)."""
        cfg = self.config
        old_rate = anchor["fee_sat"] / anchor["vsize"]
        rate = min(max(old_rate * 1.5, old_rate + 1), cfg.anchor_max_fee_rate_sat_vb)
        if rate <= old_rate:
            self.warnings.warning(f"capped-{anchor['anchor_id']}", "fee_bump_capped",
                                  anchor_id=anchor["anchor_id"], fee_rate=round(old_rate, 2))
            return
        utxo = self.utxos.get(anchor["utxo_txid"], anchor["utxo_vout"])
        # The same OP_RETURN data as the transaction it replaces (an anchor
        # made before the tree size was committed keeps its version 1 data).
        tx = self.build(utxo, stored_payload(anchor), rate,
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
            self.ledger.reload()
            current = self.ledger.get(anchor["anchor_id"])
            if current is not None and current["status"] == AnchorStatus.SIGNED:
                self.broadcast(current, now)
            return
        anchor["replaced_txids"] = anchor["replaced_txids"] + [anchor["txid"]]
        anchor.update(txid=replaced["txid"], raw_tx=tx["raw_tx"], fee_sat=tx["fee_sat"],
                      vsize=tx["vsize"], status=AnchorStatus.SIGNED, broadcast_height=tip)
        self.counters["bumps"] += 1
        log.info("anchor_fee_bumped", anchor_id=anchor["anchor_id"], txid=replaced["txid"],
                 replaces=replaced["replaced_txid"], fee_sat=tx["fee_sat"],
                 fee_rate=round(tx["fee_sat"] / tx["vsize"], 2))
        self.broadcast(anchor, now)
