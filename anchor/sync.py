"""Keeps the writer's `utxos` table in step with bitcoind's wallet, a page at a time.

Memory holds at most `page` (BUS_ANCHOR_SYNC_PAGE) of the wallet's outputs,
whatever their amounts or number. `listunspent` has no offset to page with
(and its `addresses` filter applies after `maximumCount`), so a page is a
range of block heights, the mempool's outputs counted above the tip, asked
with `maximumCount` = page: an answer of fewer is the whole range; a full one
is dropped and its range cut where the outputs it showed lie (around the
height most of them share, else at their median). One height is read as a
stream (`BitcoinRpc.stream`), a page at a time: however many outputs a block
holds, of whatever amounts, the worker holds a page, and bitcoind builds at
most one block's outputs of the wallet in an answer (a block has room for
about 32,000 P2WPKH outputs). Amount ranges would divide a block of distinct
amounts further, but each full answer dropped costs bitcoind a page of work:
on 100,000 outputs in 11 blocks, they doubled the load's time. Heights, not
confirmations, name the ranges, so a block found during a load moves
nothing; each answer's confirmations are read against the tip asked just
after it (`getblockcount` before and after: the same, or it is asked again).

Full load (once: an empty table, or no tip yet): every output from height 0
up, the ranges in ascending order (an output only ever moves up: from the
mempool into a new block). Each upsert is tagged with the load's generation
(its start time); a sweep then marks spent what the wallet no longer has.

Only what the wallet can spend is loaded: listunspent without unsafe outputs
(unconfirmed payments from outside, replaced transactions), and neither
watch-only nor unsolvable ones (`spendable`/`solvable` false), which would be
reserved, fail to sign, and be picked again.

Incremental (each new block): `listsinceblock` from the last synced block,
read as a stream, gives the wallet's spends (the inputs of those mined or in
the mempool, from `gettransaction ... decoded`, are marked spent; it lists
replaced and conflicted ones too, which spend nothing: their inputs that a
sync marked spent and that are unspent now go back to the pool) and, after a
reorg, the transactions of disconnected blocks (`removed`): a payment removed
by a reorg that `gettxout` no longer finds is marked spent. New and moved
outputs are those of the blocks since the last synced one, or since the fork
point after a reorg (which also re-dates outputs whose block changed), and of
the mempool, paged as in the full load; and the coinbase outputs that matured
in those blocks (listed from 101 confirmations on). Then the tip is stored. A
stored tip the node does not know (listsinceblock: -5 "Block not found": a
wiped datadir, a reorg deeper than the node's index) is a full load again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any, TypeVar

from anchor.bitcoind import RPC_INVALID_ADDRESS_OR_KEY, BitcoinRpc, RpcError, RpcUnavailable, to_sat
from anchor.reservations import UtxoClient
from bus.logging import get_logger

log = get_logger("anchor")

UPSERT_ROWS = 5000          # the writer's limit per utxo_upsert
COINBASE_MATURITY = 100     # a coinbase output is listed (spendable) at 101 confirmations
UNCONFIRMED = 1 << 31       # a height above every block: a range up to it takes in the mempool
TIP_ATTEMPTS = 5            # answers asked again while blocks keep coming during them

T = TypeVar("T")


class WalletSync:
    def __init__(self, rpc: BitcoinRpc, utxos: UtxoClient, page: int = 1000) -> None:
        self.rpc = rpc
        self.utxos = utxos
        self.page = page
        self.tip_height, self.tip_hash = utxos.tip()
        self.counters = {"full_loads": 0, "incremental": 0, "listunspent_calls": 0,
                         "upserted": 0, "removed": 0, "reorgs": 0, "tip_unknown": 0,
                         "unusable": 0, "restored": 0, "streamed": 0, "largest_page": 0,
                         "tip_moved": 0}
        self._spend_nothing: set[str] = set()  # conflicted sends, their inputs settled
        self._node_tip: int | None = None      # getblockcount, as last asked

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
        self._node_tip = None
        best = self.rpc.call("getbestblockhash")
        height = self.rpc.call("getblockheader", best)["height"]
        loaded = self.load_pages(0, UNCONFIRMED, generation=generation)
        swept = self.utxos.sweep(generation)
        self._set_tip(height, best)
        self.counters["full_loads"] += 1
        log.info("wallet_loaded", utxos=loaded, swept=swept, tip_height=height,
                 listunspent_calls=self.counters["listunspent_calls"],
                 streamed=self.counters["streamed"], largest_page=self.counters["largest_page"],
                 seconds=round(time.monotonic() - started, 3))

    def load_pages(self, low: int, high: int, *, generation: int = 0) -> int:
        """Upsert every usable wallet output of the blocks at heights
        low..high (up to UNCONFIRMED: and the mempool's), holding at most
        `page` of them at a time; the lowest heights first."""
        low = max(0, low)
        if high < low:
            return 0   # a young chain: no coinbase has matured
        ranges = [(low, high)]
        loaded = 0
        while ranges:
            low, high = ranges.pop()
            if low == high:
                loaded += self._stream(low, generation)
                continue
            tip, rows = self._at_tip(lambda tip: self._listunspent(tip, low, high, self.page))
            self._held(len(rows))
            if len(rows) < self.page:
                loaded += self._store(rows, tip, generation)
                continue
            heights = [tip - r.get("confirmations", 0) + 1 for r in rows]
            ranges += reversed(_cut_range(heights, low, high))
        return loaded

    def _listunspent(self, tip: int, low: int, high: int, count: int) -> Any:
        """At most `count` outputs of the blocks low..high. include_unsafe
        false: not an unconfirmed payment from outside the wallet, nor the
        output of a replaced or replacing transaction (what bitcoind itself
        would not spend)."""
        # Height h has tip - h + 1 confirmations; the mempool's outputs 0 (tip + 1).
        minconf, maxconf = max(0, tip - high + 1), tip - low + 1
        if maxconf < minconf:
            return []   # above the tip: nothing there yet
        self.counters["listunspent_calls"] += 1
        return self.rpc.call("listunspent", minconf, maxconf, [], False, {"maximumCount": count})

    def _stream(self, height: int, generation: int) -> int:
        """Upsert the outputs of one block (tip + 1: the mempool's), read as
        a stream, a page at a time."""

        def ask(tip: int) -> Iterator[tuple[str | None, Any]]:
            conf = tip - height + 1
            if conf < 0:
                return (output for output in ())  # above the tip: nothing there yet
            self.counters["listunspent_calls"] += 1
            return self.rpc.stream("listunspent", conf, conf, [], False)

        tip, outputs = self._at_tip(ask, discard=True)
        self.counters["streamed"] += 1
        loaded = 0
        page: list[dict[str, Any]] = []
        with closing(outputs):
            for _, output in outputs:
                page.append(output)
                if len(page) == self.page:
                    self._held(len(page))
                    loaded += self._store(page, tip, generation)
                    page = []
        self._held(len(page))
        return loaded + self._store(page, tip, generation)

    def _at_tip(self, ask: Callable[[int], T], discard: bool = False) -> tuple[int, T]:
        """ask(tip) with the node's tip as it was while bitcoind answered:
        the same before and after (a block found in between: asked again;
        `discard`: the answer is a stream, closed unread)."""
        if self._node_tip is None:
            self._node_tip = self.rpc.call("getblockcount")
        for _ in range(TIP_ATTEMPTS):
            tip = self._node_tip
            answer = ask(tip)
            self._node_tip = self.rpc.call("getblockcount")
            if self._node_tip == tip:
                return tip, answer
            self.counters["tip_moved"] += 1
            if discard:
                answer.close()  # type: ignore[attr-defined]
        raise RpcUnavailable(f"bitcoind found a block during each of {TIP_ATTEMPTS} "
                             "listunspent calls")

    def _held(self, count: int) -> None:
        self.counters["largest_page"] = max(self.counters["largest_page"], count)

    def _store(self, rows: list[dict[str, Any]], tip: int, generation: int) -> int:
        usable = [r for r in rows if r.get("spendable", True) and r.get("solvable", True)]
        # Watch-only or unsolvable outputs: the wallet cannot sign for them;
        # in the table they would be reserved, fail to sign, and be picked again.
        self.counters["unusable"] += len(rows) - len(usable)
        for start in range(0, len(usable), UPSERT_ROWS):
            self.utxos.upsert([self._row(r, tip) for r in usable[start:start + UPSERT_ROWS]],
                              generation)
        self.counters["upserted"] += len(usable)
        return len(usable)

    @staticmethod
    def _row(entry: dict[str, Any], tip: int) -> dict[str, Any]:
        confirmations = entry.get("confirmations", 0)
        return {"txid": entry["txid"], "vout": entry["vout"], "amount_sat": to_sat(entry["amount"]),
                "address": entry.get("address"), "script_pubkey": entry.get("scriptPubKey"),
                "block_height": tip - confirmations + 1 if confirmations > 0 else None}

    # --- incremental ------------------------------------------------------------------

    def incremental(self, best: str) -> None:
        started = time.monotonic()
        height = self.rpc.call("getblockheader", best)["height"]
        self._node_tip = None
        try:
            since = self.rpc.stream("listsinceblock", self.tip_hash, 1, False, True)
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
        removed = sends = disconnected = 0
        seen: set[str] = set()  # the sends handled: a send of n outputs is n entries
        with closing(since):
            for key, entry in since:
                if key == "removed":
                    disconnected += 1
                    removed += self._disconnected(entry)
                elif key == "transactions" and entry.get("category") == "send" and \
                        entry["txid"] not in seen and entry["txid"] not in self._spend_nothing:
                    seen.add(entry["txid"])
                    if self._spends(entry):
                        removed += self._remove_inputs(entry["txid"])
                        sends += 1
                    else:
                        self._restore_inputs(entry)
        fork_height = self._fork_height()
        if fork_height < self.tip_height:
            self.counters["reorgs"] += 1
            log.warning("wallet_reorg", old_tip=self.tip_hash, fork_height=fork_height,
                        new_tip=best, removed=disconnected)
        # Outputs of the blocks since the fork point or the last sync, and unconfirmed ones.
        since_height = min(fork_height, self.tip_height)
        recent = self.load_pages(since_height, UNCONFIRMED)
        # Coinbase outputs listed for the first time: those that reached 101
        # confirmations in these blocks (listunspent hides them until then).
        recent += self.load_pages(since_height - COINBASE_MATURITY, height - COINBASE_MATURITY)
        self.counters["removed"] += removed
        self._set_tip(height, best)
        self.counters["incremental"] += 1
        log.info("wallet_synced", tip_height=height, recent_outputs=recent, spent=removed,
                 sends=sends, seconds=round(time.monotonic() - started, 3))

    def _disconnected(self, entry: dict[str, Any]) -> int:
        """A payment whose transaction left the chain and did not come back
        (a `removed` entry that gettxout no longer finds) is spent."""
        if entry.get("category") == "receive" and \
                self.rpc.call("gettxout", entry["txid"], entry["vout"], True) is None:
            return self.utxos.remove([(entry["txid"], entry["vout"])])
        return 0

    def _remove_inputs(self, txid: str) -> int:
        points = self._inputs(txid)
        return sum(self.utxos.remove(points[start:start + UPSERT_ROWS], spending_txid=txid)
                   for start in range(0, len(points), UPSERT_ROWS))

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


def _cut_range(values: list[int], low: int, high: int) -> list[tuple[int, int]]:
    """low..high (holding `values`, the heights of a full page's outputs) in
    ascending parts that each hold some of them: around the value most of
    them share, else at their median."""
    value, count = Counter(values).most_common(1)[0]
    if count * 2 > len(values):
        parts = [(low, value - 1), (value, value), (value + 1, high)]
    else:
        middle = sorted(values)[len(values) // 2]  # above the smallest: none holds half
        parts = [(low, middle - 1), (middle, high)]
    return [(a, b) for a, b in parts if a <= b]
