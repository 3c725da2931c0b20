"""Keeps the writer's `utxos` table in step with bitcoind's wallet, in pages.

Full load (once: an empty table, or no tip yet): `listunspent` over amount
bands. A band answered with more than `page` outputs is split in two and asked
again, so no answer, and no upsert, holds more than `page` + 1 outputs (except
a band of one single amount, which cannot be split). Each upsert is tagged with
the load's generation (its start time); a sweep then marks spent what the
wallet no longer has.

Only what the wallet can spend is loaded: listunspent without unsafe outputs
(unconfirmed payments from outside, replaced transactions), and neither
watch-only nor unsolvable ones (`spendable`/`solvable` false), which would be
reserved, fail to sign, and be picked again.

Incremental (each new block): `listsinceblock` from the last synced block
gives the wallet's spends (the inputs of those mined or in the mempool, from
`gettransaction ... decoded`, are marked spent; it lists replaced and
conflicted ones too, which spend nothing: their inputs that a sync marked
spent and that are unspent now go back to the pool) and, after a reorg, the transactions of disconnected blocks
(`removed`). New and moved outputs are the ones with few confirmations:
`listunspent` limited to the depth of the blocks since the last synced one, or
since the fork point after a reorg (which also re-dates outputs whose block
changed), paged by amount bands like the full load; and the coinbase outputs
that matured in those blocks (listed from 101 confirmations on). A payment
removed by a reorg that `gettxout` no longer finds is marked spent. Then the
tip is stored. A stored tip the node does not know (listsinceblock: -5 "Block
not found": a wiped datadir, a reorg deeper than the node's index) is a full
load again.
Memory holds one page at a time.
"""

from __future__ import annotations

import time
from typing import Any

from anchor.bitcoind import RPC_INVALID_ADDRESS_OR_KEY, BitcoinRpc, RpcError, to_btc, to_sat
from anchor.reservations import UtxoClient
from bus.logging import get_logger

log = get_logger("anchor")

MAX_SAT = 21_000_000 * 100_000_000
UPSERT_ROWS = 5000          # the writer's limit per utxo_upsert
COINBASE_MATURITY = 100     # a coinbase output is listed (spendable) at 101 confirmations


class WalletSync:
    def __init__(self, rpc: BitcoinRpc, utxos: UtxoClient, page: int = 1000) -> None:
        self.rpc = rpc
        self.utxos = utxos
        self.page = page
        self.tip_height, self.tip_hash = utxos.tip()
        self.counters = {"full_loads": 0, "incremental": 0, "listunspent_calls": 0,
                         "upserted": 0, "removed": 0, "reorgs": 0, "tip_unknown": 0,
                         "unusable": 0, "restored": 0}
        self._spend_nothing: set[str] = set()  # conflicted sends, their inputs settled

    @property
    def loaded(self) -> bool:
        return self.tip_hash is not None

    def sync(self) -> bool:
        """Bring the table to bitcoind's best block; True if anything was done."""
        best = self.rpc.call("getbestblockhash")
        if not self.loaded:
            self.full_load()
            return True
        if best == self.tip_hash:
            return False
        self.incremental(best)
        return True

    # --- full load -----------------------------------------------------------------

    def full_load(self) -> None:
        started = time.monotonic()
        generation = time.time_ns()
        best = self.rpc.call("getbestblockhash")
        height = self.rpc.call("getblockheader", best)["height"]
        loaded = self.load_bands(0, MAX_SAT, minconf=0, maxconf=9_999_999, tip=height,
                                 generation=generation)
        swept = self.utxos.sweep(generation)
        self._set_tip(height, best)
        self.counters["full_loads"] += 1
        log.info("wallet_loaded", utxos=loaded, swept=swept, tip_height=height,
                 listunspent_calls=self.counters["listunspent_calls"],
                 seconds=round(time.monotonic() - started, 3))

    def load_bands(self, low: int, high: int, *, minconf: int, maxconf: int, tip: int,
                   generation: int = 0) -> int:
        """Upsert every wallet output of low..high sat with minconf..maxconf
        confirmations, a band of at most `page` at a time."""
        bands = [(low, high)]
        loaded = 0
        while bands:
            low, high = bands.pop()
            options: dict[str, Any] = {"minimumAmount": to_btc(low), "maximumAmount": to_btc(high),
                                       "maximumCount": self.page + 1}
            rows = self._listunspent(minconf, maxconf, options)
            if len(rows) > self.page:
                if high > low:
                    middle = (low + high) // 2
                    bands += [(middle + 1, high), (low, middle)]
                    continue
                del options["maximumCount"]  # one amount only: take them all
                rows = self._listunspent(minconf, maxconf, options)
            usable = [r for r in rows if r.get("spendable", True) and r.get("solvable", True)]
            # Watch-only or unsolvable outputs: the wallet cannot sign for them;
            # in the table they would be reserved, fail to sign, and be picked again.
            self.counters["unusable"] += len(rows) - len(usable)
            rows = usable
            for start in range(0, len(rows), UPSERT_ROWS):
                chunk = [self._row(r, tip) for r in rows[start:start + UPSERT_ROWS]]
                self.utxos.upsert(chunk, generation)
            loaded += len(rows)
        self.counters["upserted"] += loaded
        return loaded

    def _listunspent(self, minconf: int, maxconf: int, options: dict[str, Any]) -> list[dict]:
        """include_unsafe false: not an unconfirmed payment from outside the
        wallet, nor the output of a replaced or replacing transaction (what
        bitcoind itself would not spend)."""
        self.counters["listunspent_calls"] += 1
        return self.rpc.call("listunspent", minconf, maxconf, [], False, options)

    @staticmethod
    def _row(entry: dict[str, Any], tip: int) -> dict[str, Any]:
        confirmations = entry.get("confirmations", 0)
        return {"txid": entry["txid"], "vout": entry["vout"], "amount_sat": to_sat(entry["amount"]),
                "address": entry.get("address"), "script_pubkey": entry.get("scriptPubKey"),
                "block_height": tip - confirmations + 1 if confirmations > 0 else None}

    # --- incremental ------------------------------------------------------------------

    def incremental(self, best: str) -> None:
        height = self.rpc.call("getblockheader", best)["height"]
        try:
            since = self.rpc.call("listsinceblock", self.tip_hash, 1, False, True)
        except RpcError as exc:
            if exc.code != RPC_INVALID_ADDRESS_OR_KEY:
                raise
            # The node does not know the stored tip ("Block not found"): a new
            # datadir (regtest wiped, another network), or a reorg deeper than
            # its block index reaches. Nothing since it can be asked: load the
            # wallet whole again (the sweep marks what it no longer has).
            self.counters["tip_unknown"] += 1
            log.warning("wallet_tip_unknown", tip_height=self.tip_height, tip=self.tip_hash,
                        node_best=best, error=exc.message)
            self.full_load()
            return
        fork_height = self._fork_height()
        if fork_height < self.tip_height:
            self.counters["reorgs"] += 1
            log.warning("wallet_reorg", old_tip=self.tip_hash, fork_height=fork_height,
                        new_tip=best, removed=len(since.get("removed", [])))
        # Outputs confirmed since the fork point or the last sync, and unconfirmed ones.
        depth = height - min(fork_height, self.tip_height) + 1
        recent = self.load_bands(0, MAX_SAT, minconf=0, maxconf=depth, tip=height)
        # Coinbase outputs listed for the first time: those that reached 101
        # confirmations in these blocks (listunspent hides them until then).
        recent += self.load_bands(0, MAX_SAT, minconf=COINBASE_MATURITY + 1,
                                  maxconf=COINBASE_MATURITY + depth, tip=height)
        removed = 0
        for entry in since.get("removed", []):
            # A payment whose transaction left the chain and did not come back.
            if entry.get("category") == "receive" and \
                    self.rpc.call("gettxout", entry["txid"], entry["vout"], True) is None:
                removed += self.utxos.remove([(entry["txid"], entry["vout"])])
        spent_by: dict[str, list[tuple[str, int]]] = {}
        for entry in since.get("transactions", []):
            txid = entry["txid"]
            if entry.get("category") != "send" or txid in spent_by or txid in self._spend_nothing:
                continue
            if self._spends(entry):
                spent_by[txid] = self._inputs(txid)
            else:
                self._restore_inputs(entry)
        for txid, points in spent_by.items():
            for start in range(0, len(points), UPSERT_ROWS):
                removed += self.utxos.remove(points[start:start + UPSERT_ROWS], spending_txid=txid)
        self.counters["removed"] += removed
        self._set_tip(height, best)
        self.counters["incremental"] += 1
        log.info("wallet_synced", tip_height=height, recent_outputs=recent, spent=removed,
                 sends=len(spent_by))

    def _fork_height(self) -> int:
        """The height of the last synced block if still in the active chain,
        else of its newest ancestor that is."""
        block_hash = self.tip_hash
        while True:
            try:
                header = self.rpc.call("getblockheader", block_hash)
            except RpcError as exc:
                if exc.code == RPC_INVALID_ADDRESS_OR_KEY:
                    return 0  # unknown to this node: treat everything as new
                raise
            if header["confirmations"] >= 0 or header.get("previousblockhash") is None:
                return header["height"]
            block_hash = header["previousblockhash"]

    def _spends(self, entry: dict[str, Any]) -> bool:
        """Whether a listed send spends its inputs: mined, or in the mempool.
        listsinceblock also lists the wallet's replaced, abandoned and
        conflicted transactions (0 or fewer confirmations): what they spent
        is spent by another listed transaction, or unspent again."""
        confirmations = entry.get("confirmations", 0)
        if confirmations != 0:
            return confirmations > 0
        try:
            self.rpc.call("getmempoolentry", entry["txid"])
        except RpcError as exc:
            if exc.code == RPC_INVALID_ADDRESS_OR_KEY:  # "Transaction not in mempool"
                return False
            raise
        return True

    def _restore_inputs(self, entry: dict[str, Any]) -> None:
        """A send that spends nothing (replaced, conflicted, out of the
        mempool): the inputs a sync marked spent by it that are unspent now go
        back to the pool (those spent otherwise are another listed send's),
        and its outputs that a sync took in (its change, while it was pending)
        leave it. Conflicted (a conflicting transaction mined) is final: not
        asked again, though listsinceblock lists it at every sync."""
        txid = entry["txid"]
        decoded = self._decoded(txid)
        if decoded is None:
            return
        unspent = [(vin["txid"], vin["vout"]) for vin in decoded["vin"] if "txid" in vin
                   and self.rpc.call("gettxout", vin["txid"], vin["vout"], True) is not None]
        if unspent:
            self.counters["restored"] += self.utxos.restore(unspent, txid)
        gone = [(txid, out["n"]) for out in decoded["vout"]
                if self.rpc.call("gettxout", txid, out["n"], True) is None]
        if gone:
            self.counters["removed"] += self.utxos.remove(gone)
        if entry.get("confirmations", 0) < 0:
            self._spend_nothing.add(txid)

    def _decoded(self, txid: str) -> dict[str, Any] | None:
        try:
            return self.rpc.call("gettransaction", txid, False, True)["decoded"]
        except RpcError as exc:
            if exc.code == RPC_INVALID_ADDRESS_OR_KEY:
                return None
            raise

    def _inputs(self, txid: str) -> list[tuple[str, int]]:
        decoded = self._decoded(txid)
        return [] if decoded is None else \
            [(vin["txid"], vin["vout"]) for vin in decoded["vin"] if "txid" in vin]

    def _set_tip(self, height: int, block_hash: str) -> None:
        self.utxos.set_tip(height, block_hash)
        self.tip_height, self.tip_hash = height, block_hash
