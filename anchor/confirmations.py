"""An anchor's confirmations, checked at each block: mined, confirmed at
BUS_ANCHOR_CONFIRMATIONS (anchor.confirmed), fee-bumped when it stays unmined
for BUS_ANCHOR_BUMP_AFTER_BLOCKS, and confirmed anchors re-checked against a
reorg deeper than BUS_ANCHOR_CONFIRMATIONS (those confirmed in the last
REORG_WATCH_BLOCKS blocks).

A step is given the wallet tip it runs at (the height the wallet sync
reached) and the time (`now`)."""

from __future__ import annotations

from typing import Any

from anchor.bitcoind import RPC_INVALID_ADDRESS_OR_KEY, BitcoinRpc, RpcError
from anchor.events import AnchorEvents
from anchor.ledger import OpenAnchors, mined_transaction
from anchor.reservations import UtxoClient
from anchor.transactions import Transactions
from bus import protocol
from bus.config import BusConfig
from bus.logging import get_logger
from bus.protocol import ANCHOR_UNCONFIRMED, AnchorStatus

log = get_logger("anchor")

REORG_WATCH_BLOCKS = 100       # confirmed anchors this recent are checked again at each block


class Confirmations:
    def __init__(self, config: BusConfig, rpc: BitcoinRpc, utxos: UtxoClient,
                 ledger: OpenAnchors, transactions: Transactions, events: AnchorEvents,
                 counters: dict[str, int]) -> None:
        self.config = config
        self.rpc = rpc
        self.utxos = utxos
        self.ledger = ledger
        self.transactions = transactions
        self.events = events
        self.counters = counters

    def step(self, tip: int, now: float) -> None:
        """After a block: the open anchors, then the recently confirmed ones."""
        self.check_open(tip, now)
        self.recheck_confirmed(tip)

    def check_open(self, tip: int, now: float) -> None:
        """Confirm what is deep enough, bump what is stuck."""
        for anchor in self.ledger.with_status(AnchorStatus.SUBMITTED):
            if anchor["status"] != AnchorStatus.SUBMITTED:
                continue  # moved on since the list was taken (a bump's reload)
            mined = mined_transaction(self.rpc, anchor)
            if mined is not None:
                txid, info = mined
                if info["confirmations"] >= self.config.anchor_confirmations:
                    self.confirmed(anchor, txid, info)
            elif tip - anchor["broadcast_height"] >= self.config.anchor_bump_after_blocks:
                self.transactions.bump(anchor, tip, now)

    def confirmed(self, anchor: dict[str, Any], txid: str, info: dict[str, Any]) -> None:
        """Deep enough: recorded (with whichever of its transactions was mined)
        and announced (anchor.confirmed)."""
        self.utxos.call("anchor_update", {"anchor_id": anchor["anchor_id"],
                                          "status": AnchorStatus.CONFIRMED, "txid": txid,
                                          "block_hash": info["blockhash"],
                                          "block_height": info["blockheight"]})
        self.ledger.close(anchor["anchor_id"])  # not open: confirmed again after a reorg
        self.counters["confirmed"] += 1
        log.info("anchor_confirmed", anchor_id=anchor["anchor_id"], txid=txid,
                 block_height=info["blockheight"], confirmations=info["confirmations"])
        self.events.emit(protocol.ANCHOR_CONFIRMED_TOPIC, {
            "anchor_id": anchor["anchor_id"], "txid": txid, "root": anchor["root"],
            "tree_size": anchor["size"], "block_hash": info["blockhash"],
            "block_height": info["blockheight"], "confirmations": info["confirmations"]})
        self.events.flush()

    def recheck_confirmed(self, tip: int) -> None:
        """A confirmed anchor's block can still be taken away by a reorg deeper
        than BUS_ANCHOR_CONFIRMATIONS. Those confirmed in the last
        REORG_WATCH_BLOCKS blocks are asked again: deep enough in another
        block now, the record (and its proofs) name that one; in none (or not
        deep enough yet), the anchor is `submitted` again and tracked to a new
        confirmation."""
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
                self.confirmed(anchor, anchor["txid"], info)  # deep enough in its new block
                continue
            self.utxos.call("anchor_update", {"anchor_id": anchor["anchor_id"],
                                              "status": ANCHOR_UNCONFIRMED})
            self.ledger.add({**anchor, "status": AnchorStatus.SUBMITTED,
                             "block_hash": None, "block_height": None})
            self.events.emit(protocol.ANCHOR_ERROR_TOPIC, {
                "error": "reorged", "reason": f"block {anchor['block_hash']} left the best chain",
                "anchor_id": anchor["anchor_id"], "txid": anchor["txid"]})
            self.events.flush()
