"""The wallet's UTXOs: reservations under leases, spends, and wallet sync.

The writer owns the `utxos` table (schema in storage/schema.py and
docs/protocol.md; its queries in storage/utxos.py); the anchor worker reaches
it over the control endpoint with the `utxo_*` commands handled here. Each
command is one transaction (writer/commands.py runs it), committed before the
reply is sent: a reply always describes what is on disk, so a crash of either
side never hands out a UTXO twice.

Why it holds:
- The writer is single-threaded and answers one request at a time; a
  reservation is an UPDATE ... WHERE status = available inside the
  transaction that picked the row.
- A lease has an expiry; expired leases are returned to the pool before every
  command and once a second, so a crashed worker's UTXOs come back.
- A mutating request carries a `request_id`; its reply is stored with the
  change (writer/commands.py), and a retry with the same id (a lost reply, a
  writer restart) gets that stored reply instead of a second change.

Confirmations are not stored per row: a row keeps the height of the block that
confirmed it, and the wallet's tip height is kept once, so a new block is one
write, not one per UTXO. "At least K confirmations" is "block_height <=
tip - K + 1", which the partial index (amount_sat, block_height) WHERE status =
available answers with one range seek on the amount.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from bus.control import CommandFailed, check_int, check_str, check_txid
from bus.protocol import BAD_REQUEST, LEASE_EXPIRED, NO_UTXO, NOT_FOUND, UTXO_SPENT
from storage import utxos as utxo_rows
from storage.utxos import RESERVED, SPENT, STATUS_NAMES, read_tip, write_tip

MAX_SAT = 21_000_000 * 100_000_000
MAX_ROWS_PER_REQUEST = 5000      # utxo_upsert / utxo_remove rows per request
SWEEP_CHUNK_ROWS = 5000          # rows one utxo_sweep or request pruning touches
POLICIES = ("smallest", "largest")


def _utxo_row(item: Any, generation: int, now_ns: int) -> tuple[Any, ...]:
    if not isinstance(item, dict):
        raise CommandFailed(BAD_REQUEST, "each UTXO must be a map")
    height = item.get("block_height")
    if height is not None:
        height = check_int(item, "block_height", 0, 10**9)
    block_time = item.get("block_time")
    if block_time is not None:
        block_time = check_int(item, "block_time", 0, 2**40)
    return (check_txid(item.get("txid")), check_int(item, "vout", 0, 2**32 - 1),
            check_int(item, "amount_sat", 0, MAX_SAT), check_str(item, "address", False, 128),
            check_str(item, "script_pubkey", False, 20_000), height, block_time,
            generation, now_ns)


def _outpoint(item: Any) -> tuple[str, int]:
    if not (isinstance(item, (list, tuple)) and len(item) == 2):
        raise CommandFailed(BAD_REQUEST, "an outpoint is [txid, vout]")
    return check_txid(item[0]), check_int({"vout": item[1]}, "vout", 0, 2**32 - 1)


def _rows(args: dict[str, Any], key: str) -> list[Any]:
    items = args.get(key)
    if not isinstance(items, list) or len(items) > MAX_ROWS_PER_REQUEST:
        raise CommandFailed(BAD_REQUEST,
                            f"'{key}' must be a list of at most {MAX_ROWS_PER_REQUEST} items")
    return items


class UtxoBook:
    """The `utxo_*` commands over the writer's connection, each run in one
    transaction by writer/commands.py (which returns run-out leases to the
    pool first: `expire`). `transaction` is Store.transaction, one BEGIN
    IMMEDIATE ... COMMIT, for the upkeep that runs outside a command."""

    def __init__(self, conn: Any, transaction: Callable[[], Any],
                 max_lease_s: float, request_ttl_s: float) -> None:
        self.conn = conn
        self.transaction = transaction
        self.max_lease_s = max_lease_s
        self.request_ttl_s = request_ttl_s
        self.counters = {"reserved": 0, "renewed": 0, "released": 0, "expired": 0,
                         "spent": 0, "replaced": 0, "no_utxo": 0, "replayed": 0,
                         "upserted": 0, "removed": 0, "restored": 0, "swept": 0,
                         "errors": 0}
        self.tip_height, self.tip_hash = read_tip(conn)

    # --- leases ---------------------------------------------------------------

    def reserve(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{request_id, min_amount_sat, lease_seconds, policy?, min_confirmations?,
        owner?} -> the UTXO and its lease."""
        amount = check_int(args, "min_amount_sat", 0, MAX_SAT)
        lease_s = self._lease_seconds(args)
        policy = args.get("policy", "smallest")
        if policy not in POLICIES:
            raise CommandFailed(BAD_REQUEST, f"'policy' must be one of {', '.join(POLICIES)}")
        min_conf = check_int(args, "min_confirmations", 0, 10**6, 1)
        owner = check_str(args, "owner", required=False)
        if min_conf and self.tip_height is None:
            raise self._no_utxo(amount, min_conf, "the wallet tip is unknown (no sync yet)")
        row = utxo_rows.pick(self.conn, policy, amount,
                             self.tip_height - min_conf + 1 if min_conf else None)
        if row is None:
            raise self._no_utxo(amount, min_conf, "")
        lease_id = secrets.token_hex(12)
        expires_ns = now_ns + int(lease_s * 1e9)
        if not utxo_rows.lease(self.conn, row[0], row[1], lease_id, expires_ns, owner, now_ns):
            # Cannot happen: one thread, one transaction.
            raise RuntimeError(f"UTXO {row[0]}:{row[1]} changed under a reservation")
        self.counters["reserved"] += 1
        return {**self._describe(row), "lease_id": lease_id, "expires_ns": expires_ns}

    def _lease_seconds(self, args: dict[str, Any]) -> float:
        lease_s = args.get("lease_seconds")
        if not isinstance(lease_s, (int, float)) or isinstance(lease_s, bool) \
                or not 0 < lease_s <= self.max_lease_s:
            raise CommandFailed(BAD_REQUEST, f"'lease_seconds' must be in (0, {self.max_lease_s}]"
                                             " (BUS_UTXO_MAX_LEASE_S)")
        return lease_s

    def _no_utxo(self, amount: int, min_conf: int, why: str) -> CommandFailed:
        self.counters[NO_UTXO] += 1
        largest = utxo_rows.largest_available(self.conn)
        return CommandFailed(NO_UTXO, why or (
            f"no available UTXO of at least {amount} sat with {min_conf} confirmations "
            f"(largest available: {largest if largest is not None else 'none'} sat)"))

    def _leased(self, args: dict[str, Any], now_ns: int) -> tuple[Any, ...]:
        lease_id = check_str(args, "lease_id", max_len=64)
        row = utxo_rows.by_lease(self.conn, lease_id)
        if row is None or (row[7] == RESERVED and row[8] <= now_ns):
            raise CommandFailed(LEASE_EXPIRED, f"lease {lease_id} does not exist or has expired;"
                                               " its UTXO is back in the pool")
        return row

    def renew(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{lease_id, lease_seconds} -> {lease_id, expires_ns}."""
        lease_s = self._lease_seconds(args)
        row = self._leased(args, now_ns)
        if row[7] != RESERVED:
            raise CommandFailed(UTXO_SPENT, f"lease {args['lease_id']} already spent its UTXO")
        expires_ns = now_ns + int(lease_s * 1e9)
        utxo_rows.renew(self.conn, args["lease_id"], expires_ns, now_ns)
        self.counters["renewed"] += 1
        return {"lease_id": args["lease_id"], "expires_ns": expires_ns}

    def release(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{lease_id} -> {released}: the UTXO is available again. Releasing an
        unknown or expired lease is not an error (released: false)."""
        lease_id = check_str(args, "lease_id", max_len=64)
        released = utxo_rows.release(self.conn, lease_id, now_ns)
        self.counters["released"] += released
        return {"lease_id": lease_id, "released": released}

    def spend(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{lease_id, spending_txid, change?: [utxo...]} -> {txid, vout, spending_txid,
        replaced_txid, change}. The leased UTXO is marked spent by `spending_txid`
        and the change outputs join the pool, unconfirmed. Spending it again
        under the same lease with another txid records a replacement (RBF): the
        change of the replaced transaction is removed."""
        spending = check_txid(args.get("spending_txid"), "spending_txid")
        change = [_utxo_row(item, 0, now_ns) for item in _rows({"change": args.get("change", [])},
                                                                "change")]
        for item in change:
            if item[0] != spending:
                raise CommandFailed(BAD_REQUEST, "change outputs must belong to 'spending_txid'")
        row = self._leased(args, now_ns)
        txid, vout, status, previous = row[0], row[1], row[7], row[9]
        replaced = None
        if status == SPENT:
            if previous != spending:
                replaced = previous
                utxo_rows.drop_unspent_outputs(self.conn, previous)
                self.counters["replaced"] += 1
        else:
            self.counters["spent"] += 1
        utxo_rows.mark_spent(self.conn, txid, vout, spending, now_ns)
        utxo_rows.upsert(self.conn, change)
        return {"txid": txid, "vout": vout, "spending_txid": spending,
                "replaced_txid": replaced, "change": len(change)}

    def expire_leases(self) -> int:
        """Return every expired lease's UTXO to the pool (its own transaction)."""
        with self.transaction():
            return self.expire(time.time_ns())

    def expire(self, now_ns: int) -> int:
        """Return the UTXOs of leases run out by `now_ns` to the pool, in the
        caller's transaction: before every command, so that each sees them as
        expired (an index probe when none has)."""
        expired = utxo_rows.expire_leases(self.conn, now_ns)
        self.counters["expired"] += expired
        return expired

    def prune_requests(self) -> int:
        """Forget stored replies older than BUS_UTXO_REQUEST_TTL_S, a chunk at a time."""
        cutoff = time.time_ns() - int(self.request_ttl_s * 1e9)
        with self.transaction():
            return utxo_rows.prune_replies(self.conn, cutoff, SWEEP_CHUNK_ROWS)

    # --- wallet sync ----------------------------------------------------------

    def upsert(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{utxos: [{txid, vout, amount_sat, address?, script_pubkey?, block_height?,
        block_time?}], generation?} -> {upserted}. New outputs join the pool;
        known ones get their block and generation, never a new status."""
        generation = check_int(args, "generation", 0, 2**62, 0)
        rows = [_utxo_row(item, generation, now_ns) for item in _rows(args, "utxos")]
        utxo_rows.upsert(self.conn, rows)
        self.counters["upserted"] += len(rows)
        return {"upserted": len(rows)}

    def remove(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{outpoints: [[txid, vout]...], spending_txid?} -> {removed}: outputs
        spent outside the bus (or gone in a reorg) are marked spent, whatever
        their lease."""
        spending = args.get("spending_txid")
        if spending is not None:
            check_txid(spending, "spending_txid")
        points = [_outpoint(item) for item in _rows(args, "outpoints")]
        removed = 0
        for txid, vout in points:
            # The lease goes too: its holder's spend or renew is refused.
            removed += utxo_rows.mark_removed(self.conn, txid, vout, spending, now_ns)
        self.counters["removed"] += removed
        return {"removed": removed}

    def restore(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{outpoints: [[txid, vout]...], spent_txid} -> {restored}: outputs
        marked spent by `spent_txid`, a wallet transaction that no longer
        spends them (replaced, conflicted, dropped from the mempool), are
        available again; the wallet sync asks only for those bitcoind says
        are unspent."""
        spent_txid = check_txid(args.get("spent_txid"), "spent_txid")
        restored = 0
        for txid, vout in (_outpoint(item) for item in _rows(args, "outpoints")):
            restored += utxo_rows.restore(self.conn, txid, vout, spent_txid, now_ns)
        self.counters["restored"] += restored
        return {"restored": restored}

    def sweep(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{generation} -> {swept, more}: after a full load tagged `generation`
        (the time it started, ns), available rows that the load did not see and
        that nothing touched since it started are gone from the wallet; marks
        up to SWEEP_CHUNK_ROWS of them spent. Repeat while `more`."""
        generation = check_int(args, "generation", 0, 2**62)
        swept = utxo_rows.sweep(self.conn, generation, now_ns, SWEEP_CHUNK_ROWS)
        self.counters["swept"] += swept
        return {"swept": swept, "more": swept == SWEEP_CHUNK_ROWS}

    def set_tip(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{height, hash} -> the same: the wallet's best block, from which
        confirmations are counted. {} -> the tip as stored (nil if none)."""
        if not args:
            return {"height": self.tip_height, "hash": self.tip_hash}
        height = check_int(args, "height", 0, 10**9)
        block_hash = check_txid(args.get("hash"), "hash")
        write_tip(self.conn, height, block_hash)
        self.tip_height, self.tip_hash = height, block_hash
        return {"height": height, "hash": block_hash}

    def get(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{txid, vout} -> the row with its status and lease."""
        txid, vout = _outpoint([args.get("txid"), args.get("vout")])
        row = utxo_rows.get(self.conn, txid, vout)
        if row is None:
            raise CommandFailed(NOT_FOUND, f"no UTXO {txid}:{vout}")
        return {**self._describe(row), "status": STATUS_NAMES[row[7]], "expires_ns": row[8],
                "spending_txid": row[9], "lease_id": row[10]}

    def _describe(self, row: tuple[Any, ...]) -> dict[str, Any]:
        height = row[5]
        confirmations = 0 if height is None or self.tip_height is None \
            else max(0, self.tip_height - height + 1)
        return {"txid": row[0], "vout": row[1], "amount_sat": row[2], "address": row[3],
                "script_pubkey": row[4], "block_height": height, "block_time": row[6],
                "confirmations": confirmations}

    def snapshot(self) -> dict[str, Any]:
        return {**self.counters, "tip_height": self.tip_height, "tip_hash": self.tip_hash}


