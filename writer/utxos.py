"""The wallet's UTXOs: reservations under leases, spends, and wallet sync.

The writer owns the `utxos` table (schema in storage/schema.py and
docs/protocol.md; its queries in storage/utxos.py); the anchor worker reaches it over the control endpoint with
the `utxo_*` commands handled here. Each command that changes a row is one
transaction, committed before the reply is sent: a reply always describes
what is on disk, so a crash of either side never hands out a UTXO twice.

Why it holds:
- The writer is single-threaded and answers one request at a time; a
  reservation is an UPDATE ... WHERE status = available inside the
  transaction that picked the row.
- A lease has an expiry; expired leases are returned to the pool before every
  command and once a second, so a crashed worker's UTXOs come back.
- A mutating request carries a `request_id`; its reply is stored with the
  change, and a retry with the same id (a lost reply, a writer restart)
  gets that stored reply instead of a second change.

Confirmations are not stored per row: a row keeps the height of the block that
confirmed it, and the wallet's tip height is kept once, so a new block is one
write, not one per UTXO. "At least K confirmations" is "block_height <=
tip - K + 1", which the partial index (amount_sat, block_height) WHERE status =
available answers with one range seek on the amount.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgpack

import storage
from bus.protocol import REQUEST_ID_REUSED
from storage import utxos as rows_of
from storage.utxos import RESERVED, SPENT, STATUS_NAMES, read_tip, write_tip

MAX_SAT = 21_000_000 * 100_000_000
MAX_ROWS_PER_REQUEST = 5000      # utxo_upsert / utxo_remove rows per request
SWEEP_CHUNK_ROWS = 5000          # rows one utxo_sweep or request pruning touches
POLICIES = ("smallest", "largest")
_TXID = re.compile(r"[0-9a-f]{64}\Z")

class UtxoError(ValueError):
    """A request that cannot be carried out; `code` is the error reply's code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def request_fingerprint(cmd: str, args: dict[str, Any]) -> bytes:
    """What a retry must repeat: the command and its arguments (but the id).
    A stored reply answers only the request it was the reply to: the same id
    with other arguments (a fee bump rebuilt after a lost reply) would get a
    reply about a transaction it does not carry."""
    body = sorted((key, value) for key, value in args.items() if key != "request_id")
    return hashlib.sha256(msgpack.packb([cmd, body])).digest()


# --- argument checks (shared with writer/anchors.py) -------------------------

def check_int(args: dict[str, Any], key: str, low: int, high: int, default: Any = ...) -> int:
    value = args.get(key, default)
    if value is ...:
        raise UtxoError("bad_request", f"missing '{key}'")
    if type(value) is not int or not low <= value <= high:
        raise UtxoError("bad_request", f"'{key}' must be an integer in {low}..{high}")
    return value


def check_str(args: dict[str, Any], key: str, required: bool = True,
              max_len: int = 128) -> str | None:
    value = args.get(key)
    if value is None and not required:
        return None
    if not (isinstance(value, str) and 0 < len(value) <= max_len and value.isprintable()):
        raise UtxoError("bad_request", f"'{key}' must be a printable string of 1-{max_len} chars")
    return value


def check_txid(value: Any, key: str = "txid") -> str:
    if not (isinstance(value, str) and _TXID.match(value)):
        raise UtxoError("bad_request", f"'{key}' must be 64 lowercase hex characters")
    return value


def _utxo_row(item: Any, generation: int, now_ns: int) -> tuple[Any, ...]:
    if not isinstance(item, dict):
        raise UtxoError("bad_request", "each UTXO must be a map")
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
        raise UtxoError("bad_request", "an outpoint is [txid, vout]")
    return check_txid(item[0]), check_int({"vout": item[1]}, "vout", 0, 2**32 - 1)


def _rows(args: dict[str, Any], key: str) -> list[Any]:
    items = args.get(key)
    if not isinstance(items, list) or len(items) > MAX_ROWS_PER_REQUEST:
        raise UtxoError("bad_request",
                        f"'{key}' must be a list of at most {MAX_ROWS_PER_REQUEST} items")
    return items


class UtxoBook:
    """The `utxo_*` commands over the writer's connection.

    `transaction` is Store.transaction: one BEGIN IMMEDIATE ... COMMIT.
    """

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
        self.handlers: dict[str, Callable[[dict[str, Any], int], Any]] = {
            "utxo_reserve": self.reserve, "utxo_renew": self.renew,
            "utxo_release": self.release, "utxo_spend": self.spend,
            "utxo_upsert": self.upsert, "utxo_remove": self.remove,
            "utxo_restore": self.restore,
            "utxo_sweep": self.sweep, "utxo_tip": self.set_tip, "utxo_get": self.get,
        }
        # Commands whose reply is stored under their request_id (required if listed).
        self.idempotent = {"utxo_reserve": True, "utxo_renew": False, "utxo_release": False,
                           "utxo_spend": False}

    def register(self, cmd: str, handler: Callable[[dict[str, Any], int], Any],
                 request_id: bool | None = None) -> None:
        """Add a command run like the utxo_* ones (the anchor records use it):
        one transaction; request_id True: required and its reply stored,
        False: optional, None: not used."""
        self.handlers[cmd] = handler
        if request_id is not None:
            self.idempotent[cmd] = request_id

    # --- dispatch -------------------------------------------------------------

    def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        """Run one command; raises UtxoError for a refused request.

        A mutating command with a `request_id` seen before returns the stored
        reply of its first run without running again.
        """
        handler = self.handlers.get(cmd)
        if handler is None:
            raise UtxoError("unknown_command", f"no command {cmd!r}")
        now_ns = time.time_ns()
        request_id = None
        if cmd in self.idempotent:
            request_id = check_str(args, "request_id", required=self.idempotent[cmd])
        refused: UtxoError | None = None
        fingerprint = request_fingerprint(cmd, args) if request_id is not None else b""
        with self.transaction():
            if request_id is not None:
                stored = rows_of.stored_reply(self.conn, request_id)
                if stored is not None:
                    reply, stored_fingerprint = stored
                    if stored_fingerprint not in (None, fingerprint):
                        self.counters["errors"] += 1
                        raise UtxoError(REQUEST_ID_REUSED, f"request id {request_id!r} was used"
                                        " for another request (other arguments), whose reply"
                                        " stands: a new request needs a new id")
                    self.counters["replayed"] += 1
                    return msgpack.unpackb(reply, raw=False)
            # Leases that have run out go back to the pool first, so that every
            # command sees them as expired (an index probe when none has).
            self._expire(now_ns)
            try:
                with storage.savepoint(self.conn, rollback_on=UtxoError):
                    result = handler(args, now_ns)  # a refused command leaves nothing behind
                    if request_id is not None:
                        rows_of.store_reply(self.conn, request_id, msgpack.packb(result),
                                            fingerprint, now_ns)
            except UtxoError as exc:
                refused = exc
        if refused is not None:
            self.counters["errors"] += 1
            raise refused
        return result

    # --- leases ---------------------------------------------------------------

    def reserve(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{request_id, min_amount_sat, lease_seconds, policy?, min_confirmations?,
        owner?} -> the UTXO and its lease."""
        amount = check_int(args, "min_amount_sat", 0, MAX_SAT)
        lease_s = self._lease_seconds(args)
        policy = args.get("policy", "smallest")
        if policy not in POLICIES:
            raise UtxoError("bad_request", f"'policy' must be one of {', '.join(POLICIES)}")
        min_conf = check_int(args, "min_confirmations", 0, 10**6, 1)
        owner = check_str(args, "owner", required=False)
        if min_conf and self.tip_height is None:
            raise self._no_utxo(amount, min_conf, "the wallet tip is unknown (no sync yet)")
        row = rows_of.pick(self.conn, policy, amount,
                           self.tip_height - min_conf + 1 if min_conf else None)
        if row is None:
            raise self._no_utxo(amount, min_conf, "")
        lease_id = secrets.token_hex(12)
        expires_ns = now_ns + int(lease_s * 1e9)
        if not rows_of.lease(self.conn, row[0], row[1], lease_id, expires_ns, owner, now_ns):
            # Cannot happen: one thread, one transaction.
            raise RuntimeError(f"UTXO {row[0]}:{row[1]} changed under a reservation")
        self.counters["reserved"] += 1
        return {**self._describe(row), "lease_id": lease_id, "expires_ns": expires_ns}

    def _lease_seconds(self, args: dict[str, Any]) -> float:
        lease_s = args.get("lease_seconds")
        if not isinstance(lease_s, (int, float)) or isinstance(lease_s, bool) \
                or not 0 < lease_s <= self.max_lease_s:
            raise UtxoError("bad_request", f"'lease_seconds' must be in (0, {self.max_lease_s}]"
                                           " (BUS_UTXO_MAX_LEASE_S)")
        return lease_s

    def _no_utxo(self, amount: int, min_conf: int, why: str) -> UtxoError:
        self.counters["no_utxo"] += 1
        largest = rows_of.largest_available(self.conn)
        return UtxoError("no_utxo", why or (
            f"no available UTXO of at least {amount} sat with {min_conf} confirmations "
            f"(largest available: {largest if largest is not None else 'none'} sat)"))

    def _leased(self, args: dict[str, Any], now_ns: int) -> tuple[Any, ...]:
        lease_id = check_str(args, "lease_id", max_len=64)
        row = rows_of.by_lease(self.conn, lease_id)
        if row is None or (row[7] == RESERVED and row[8] <= now_ns):
            raise UtxoError("lease_expired", f"lease {lease_id} does not exist or has expired;"
                                             " its UTXO is back in the pool")
        return row

    def renew(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{lease_id, lease_seconds} -> {lease_id, expires_ns}."""
        lease_s = self._lease_seconds(args)
        row = self._leased(args, now_ns)
        if row[7] != RESERVED:
            raise UtxoError("utxo_spent", f"lease {args['lease_id']} already spent its UTXO")
        expires_ns = now_ns + int(lease_s * 1e9)
        rows_of.renew(self.conn, args["lease_id"], expires_ns, now_ns)
        self.counters["renewed"] += 1
        return {"lease_id": args["lease_id"], "expires_ns": expires_ns}

    def release(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{lease_id} -> {released}: the UTXO is available again. Releasing an
        unknown or expired lease is not an error (released: false)."""
        lease_id = check_str(args, "lease_id", max_len=64)
        released = rows_of.release(self.conn, lease_id, now_ns)
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
                raise UtxoError("bad_request", "change outputs must belong to 'spending_txid'")
        row = self._leased(args, now_ns)
        txid, vout, status, previous = row[0], row[1], row[7], row[9]
        replaced = None
        if status == SPENT:
            if previous != spending:
                replaced = previous
                rows_of.drop_unspent_outputs(self.conn, previous)
                self.counters["replaced"] += 1
        else:
            self.counters["spent"] += 1
        rows_of.mark_spent(self.conn, txid, vout, spending, now_ns)
        rows_of.upsert(self.conn, change)
        return {"txid": txid, "vout": vout, "spending_txid": spending,
                "replaced_txid": replaced, "change": len(change)}

    def expire_leases(self) -> int:
        """Return every expired lease's UTXO to the pool (its own transaction)."""
        with self.transaction():
            return self._expire(time.time_ns())

    def _expire(self, now_ns: int) -> int:
        expired = rows_of.expire_leases(self.conn, now_ns)
        self.counters["expired"] += expired
        return expired

    def prune_requests(self) -> int:
        """Forget stored replies older than BUS_UTXO_REQUEST_TTL_S, a chunk at a time."""
        cutoff = time.time_ns() - int(self.request_ttl_s * 1e9)
        with self.transaction():
            return rows_of.prune_replies(self.conn, cutoff, SWEEP_CHUNK_ROWS)

    # --- wallet sync ----------------------------------------------------------

    def upsert(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{utxos: [{txid, vout, amount_sat, address?, script_pubkey?, block_height?,
        block_time?}], generation?} -> {upserted}. New outputs join the pool;
        known ones get their block and generation, never a new status."""
        generation = check_int(args, "generation", 0, 2**62, 0)
        rows = [_utxo_row(item, generation, now_ns) for item in _rows(args, "utxos")]
        rows_of.upsert(self.conn, rows)
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
            removed += rows_of.mark_removed(self.conn, txid, vout, spending, now_ns)
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
            restored += rows_of.restore(self.conn, txid, vout, spent_txid, now_ns)
        self.counters["restored"] += restored
        return {"restored": restored}

    def sweep(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{generation} -> {swept, more}: after a full load tagged `generation`
        (the time it started, ns), available rows that the load did not see and
        that nothing touched since it started are gone from the wallet; marks
        up to SWEEP_CHUNK_ROWS of them spent. Repeat while `more`."""
        generation = check_int(args, "generation", 0, 2**62)
        swept = rows_of.sweep(self.conn, generation, now_ns, SWEEP_CHUNK_ROWS)
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
        row = rows_of.get(self.conn, txid, vout)
        if row is None:
            raise UtxoError("not_found", f"no UTXO {txid}:{vout}")
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


