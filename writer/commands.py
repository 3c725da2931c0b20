"""The writer's control commands, each declared once (docs/protocol.md,
"Control requests", "UTXO reservations", "Anchoring", "Audit seals"), and the
runner of those that run in one transaction.

To add a command: one row in `writer_table` (its handler, arguments, who may
run it, the error codes it answers, whether it takes a request id, whether it
runs in one transaction), its handler (a Writer method taking a Request, or a
book's method taking (args, now_ns) for a transaction command), one row in
docs/protocol.md's table (tests/test_docs.py checks the two agree), and a test.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import msgpack

import storage
from bus.control import Command, CommandFailed, CommandTable, Request, check_str
from bus.logging import get_logger
from bus.protocol import (ALREADY_ANCHORED, FLUSH_FAILED, FORBIDDEN, LEASE_EXPIRED, NO_UTXO,
                          NOT_FOUND, QUOTA_EXCEEDED, REQUEST_ID_REUSED, SEALED_TOPIC,
                          TOO_MANY_CONSUMERS, UNAVAILABLE, UTXO_SPENT)
from bus.security import PUBLISHERS, READERS
from storage import utxos as utxo_rows
from writer.purge import purge

if TYPE_CHECKING:
    from writer.service import Writer

log = get_logger("writer")


def request_fingerprint(cmd: str, args: dict[str, Any]) -> bytes:
    """What a retry must repeat: the command and its arguments (but the id).
    A stored reply answers only the request it was the reply to: the same id
    with other arguments (a fee bump rebuilt after a lost reply) would get a
    reply about a transaction it does not carry."""
    body = sorted((key, value) for key, value in args.items() if key != "request_id")
    return hashlib.sha256(msgpack.packb([cmd, body])).digest()


class TransactionRunner:
    """Runs a command declared `transaction=True`: one BEGIN IMMEDIATE ...
    COMMIT (Store.transaction) around leases run out returned to the pool
    (UtxoBook.expire: every command sees them as expired) and the handler, in
    a savepoint that a refusal (CommandFailed) rolls back, so a refused
    command leaves nothing behind. A command declared with a request id has
    its reply stored with its change: a request with an id seen before gets
    that reply without running again (the same arguments), or
    `request_id_reused` (other arguments). `counters` (the wallet's, where
    stats has always shown them) count replays and refusals; a database busy
    or reconnecting is answered `unavailable`: retry."""

    def __init__(self, store: Any, utxos: Any, counters: dict[str, int]) -> None:
        self.store = store
        self.utxos = utxos
        self.counters = counters

    def __call__(self, command: Command, request: Request) -> Any:
        try:
            return self._run(command, request.args)
        except self.store.transient_errors as exc:
            log.warning("wallet_request_failed", cmd=command.name, error=str(exc))
            raise CommandFailed(UNAVAILABLE,
                                f"database busy ({type(exc).__name__}); retry") from None

    def _run(self, command: Command, args: dict[str, Any]) -> Any:
        conn = self.store.conn
        now_ns = time.time_ns()
        request_id = None
        if command.request_id is not None:
            request_id = check_str(args, "request_id", required=command.request_id)
        refused: CommandFailed | None = None
        fingerprint = request_fingerprint(command.name, args) if request_id is not None else b""
        with self.store.transaction():
            if request_id is not None:
                stored = utxo_rows.stored_reply(conn, request_id)
                if stored is not None:
                    reply, stored_fingerprint = stored
                    if stored_fingerprint not in (None, fingerprint):
                        self.counters["errors"] += 1
                        raise CommandFailed(REQUEST_ID_REUSED,
                                            f"request id {request_id!r} was used for another "
                                            "request (other arguments), whose reply stands: a "
                                            "new request needs a new id")
                    self.counters["replayed"] += 1
                    return msgpack.unpackb(reply, raw=False)
            self.utxos.expire(now_ns)
            try:
                with storage.savepoint(conn, rollback_on=CommandFailed):
                    result = command.handler(args, now_ns)  # type: ignore[call-arg]
                    if request_id is not None:
                        utxo_rows.store_reply(conn, request_id, msgpack.packb(result),
                                              fingerprint, now_ns)
            except CommandFailed as exc:
                refused = exc
        if refused is not None:
            self.counters["errors"] += 1
            raise refused
        return result


def writer_table(writer: Writer) -> CommandTable:
    """Every command of the writer's control endpoint. Admins may run every
    command; `roles` names who else may (bus/security.py)."""
    both = (PUBLISHERS, READERS)
    utxos, anchors, audit = writer.utxos, writer.anchors, writer.audit
    commands = (
        Command("stats", lambda _request: writer.stats(time.monotonic()), roles=both),
        Command("flush", writer._flush_command, errors=(FLUSH_FAILED,)),
        # Producer sessions (writer/producers.py); the admins' `bus-cli producers`.
        Command("producer_open", writer._producer_open, roles=(PUBLISHERS,),
                args=("producer",), errors=(FORBIDDEN, QUOTA_EXCEEDED, UNAVAILABLE)),
        Command("producer_status", writer._producer_status, roles=(PUBLISHERS,),
                args=("producer",)),
        Command("producers_list", writer._producers_list, args=("after", "limit")),
        Command("producer_info", writer._producer_info, args=("producer",)),
        Command("producer_remove", writer._producer_remove, args=("producer",),
                errors=(UNAVAILABLE,)),
        # Durable consumers (writer/consumers.py).
        Command("consumer_ack", writer._consumer_ack, roles=(READERS,),
                args=("consumer", "last_id", "prefixes"),
                errors=(FORBIDDEN, TOO_MANY_CONSUMERS, QUOTA_EXCEEDED)),
        Command("consumer_get", writer._consumer_get, roles=(READERS,), args=("consumer",)),
        Command("consumer_delete", writer._consumer_delete, args=("consumer",)),
        # Stored messages of a topic prefix deleted (writer/purge.py); admins only.
        Command("purge", lambda request: purge(writer.store, writer.config, request),
                args=("prefix", "before_id", "before_ns", "after_id"),
                errors=(SEALED_TOPIC, UNAVAILABLE)),
        # The wallet's UTXOs (writer/utxos.py).
        Command("utxo_reserve", utxos.reserve, request_id=True, transaction=True,
                args=("min_amount_sat", "lease_seconds", "policy", "min_confirmations",
                      "owner"), errors=(NO_UTXO,)),
        Command("utxo_renew", utxos.renew, request_id=False, transaction=True,
                args=("lease_id", "lease_seconds"), errors=(LEASE_EXPIRED, UTXO_SPENT)),
        Command("utxo_release", utxos.release, request_id=False, transaction=True,
                args=("lease_id",)),
        Command("utxo_spend", utxos.spend, request_id=False, transaction=True,
                args=("lease_id", "spending_txid", "change"), errors=(LEASE_EXPIRED,)),
        Command("utxo_get", utxos.get, transaction=True, args=("txid", "vout"),
                errors=(NOT_FOUND,)),
        Command("utxo_upsert", utxos.upsert, transaction=True, args=("utxos", "generation")),
        Command("utxo_remove", utxos.remove, transaction=True,
                args=("outpoints", "spending_txid")),
        Command("utxo_restore", utxos.restore, transaction=True,
                args=("outpoints", "spent_txid")),
        Command("utxo_sweep", utxos.sweep, transaction=True, args=("generation",)),
        Command("utxo_tip", utxos.set_tip, transaction=True, args=("height", "hash")),
        # Anchor records (writer/anchors.py).
        Command("anchor_known", anchors.known, transaction=True, args=("hashes",)),
        Command("anchor_record", anchors.record, request_id=True, transaction=True,
                args=("root", "size", "documents", "txid", "raw_tx", "fee_sat", "vsize",
                      "lease_id", "change", "tip_height"),
                errors=(ALREADY_ANCHORED, LEASE_EXPIRED)),
        Command("anchor_update", anchors.update, transaction=True,
                args=("anchor_id", "status", "txid", "block_hash", "block_height"),
                errors=(NOT_FOUND,)),
        Command("anchor_replace", anchors.replace, request_id=True, transaction=True,
                args=("anchor_id", "txid", "raw_tx", "fee_sat", "vsize", "change",
                      "tip_height"), errors=(NOT_FOUND, LEASE_EXPIRED)),
        Command("anchor_fail", anchors.fail, request_id=False, transaction=True,
                args=("anchor_id", "reason", "inputs_spent"), errors=(NOT_FOUND,)),
        Command("anchor_open", anchors.open_anchors, transaction=True),
        Command("anchor_confirmed", anchors.confirmed_anchors, transaction=True,
                args=("min_height",)),
        Command("anchor_leaves", anchors.leaves, transaction=True, args=("anchor_id",),
                errors=(NOT_FOUND,)),
        # Audit seals (writer/audit.py).
        Command("audit_last", audit.last, transaction=True),
        Command("audit_begin", audit.begin, request_id=True, transaction=True,
                args=("prefixes", "seal_version", "digest_version")),
        Command("audit_leaves", audit.leaves, transaction=True,
                args=("seal_id", "chunk", "ids", "digests"), errors=(NOT_FOUND,)),
        Command("audit_finish", audit.finish, request_id=True, transaction=True,
                args=("seal_id", "last_id", "size", "root"), errors=(NOT_FOUND,)),
        Command("audit_unanchored", audit.unanchored, transaction=True),
    )
    return CommandTable(commands, TransactionRunner(writer.store, utxos, utxos.counters))
