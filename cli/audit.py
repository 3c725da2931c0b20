"""bus-cli audit: the tamper-evident message log (docs/protocol.md, "Audit seals").

    bus-cli audit verify [--from-id N]   recompute every seal from the database
    bus-cli audit verify --node          ... and require it to account for every
                                         anchor the worker's wallet put on chain
    bus-cli audit proof ID               one sealed message's proof (JSON)

Both read the database (BUS_DB) directly, read-only, as `bus-cli db` does:
they are run where the database is, or against a PostgreSQL replica. Without
--node, verify checks the database against itself only: whoever can write it
can rewrite seals, digests and anchor rows together (re-sealing altered
messages, which the worker then anchors again); only the chain keeps what was
anchored before.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

import storage
from bus.config import role_fields
from cli.common import InputError, build_config, said_if_slow, setting_options
from proofs.audit import (AUDIT_PROOF_FORMAT, AUDIT_PROOF_FORMAT_RECORD, EMPTY_ROOT, SEAL_RECORD,
                          RootBuilder, message_digest, seal_document)
from proofs.document import make_proof, parse_payload, stored_payload
from proofs.merkle import MerkleTree
from storage import anchors as anchor_rows
from storage import audit as seal_rows
from storage import messages, retention


@click.group()
def audit() -> None:
    """The tamper-evident log of the sealed topics (BUS_AUDIT_PREFIXES)."""


@contextlib.contextmanager
def _snapshot(ctx: click.Context, flags: dict[str, Any]
              ) -> Iterator[tuple[Any, tuple[type, ...]]]:
    """The database, read-only, in one snapshot, and the errors its engine
    raises. One snapshot: the bus goes on while the audit reads, and a message
    its retention deleted after the audit read how far retention went would
    look deleted behind its back."""
    cfg = build_config(ctx, flags, "audit")
    try:
        with said_if_slow(storage.describe(cfg.db)):
            conn = storage.open_read_only(cfg.db, cfg.sqlite_busy_timeout_ms)
    except storage.NotReadable as exc:
        raise InputError(str(exc)) from None
    try:
        with storage.snapshot(conn):
            yield conn, storage.errors_of(cfg.db)[1]
    finally:
        conn.close()


def _document(seal: dict[str, Any]) -> bytes:
    """What is anchored for the seal, recomputed from its fields as stored:
    its record's hash (version 2), its root (version 1)."""
    return seal_document(seal["seal_version"], seal["seal_id"], seal["first_id"],
                         seal["last_id"], seal["size"], seal["digest_version"], seal["root"],
                         seal["prefixes"])


def _anchoring(conn: Any, document: bytes) -> tuple[str, bool]:
    """What the database says of a seal document's anchoring, and whether it
    holds together (the document is a leaf of the anchor's tree, whose root
    is in the recorded transaction's OP_RETURN)."""
    found = anchor_rows.proof_rows(conn, document)
    if found is None:
        return "not anchored yet", True
    anchor, _index, _ref, leaves = found
    payload = stored_payload(anchor)
    if MerkleTree(leaves).root != anchor["root"] or parse_payload(payload)[0] != anchor["root"] \
            or payload not in (anchor["raw_tx"] or b""):
        return (f"anchor {anchor['anchor_id']}: its documents, root and transaction do not agree"
                " (altered)", False)
    where = f"confirmed in block {anchor['block_hash']} (height {anchor['block_height']:,})" \
        if anchor["status"] == "confirmed" else anchor["status"]
    return f"anchored in transaction {anchor['txid']}, {where}", True


class Comparison:
    """One pass over a seal's stored leaves and the stored messages it covers
    (both in id order, a chunk at a time): the root of the stored digests, the
    root of the digests recomputed from the messages (a stored digest where
    the message is gone), and the first of each kind of difference."""

    def __init__(self, seal: dict[str, Any], retained: int) -> None:
        self.seal, self.retained = seal, retained
        self.stored, self.recomputed = RootBuilder(), RootBuilder()
        self.first: dict[str, tuple[int, str]] = {}   # kind -> (message id, topic)
        self.counts = {"differs": 0, "deleted": 0, "inserted": 0}
        self.gone = 0                                 # sealed messages retention took
        self.bad_ids: str | None = None
        self._previous = seal["first_id"] - 1

    def _note(self, kind: str, message_id: int, topic: str) -> None:
        self.counts[kind] += 1
        self.first.setdefault(kind, (message_id, topic))

    def _leaf(self, message_id: int, digest: bytes) -> bool:
        seal = self.seal
        if not self._previous < message_id <= seal["last_id"]:
            self.bad_ids = (f"its leaf ids were altered (id {message_id:,} after "
                            f"{self._previous:,}, outside {seal['first_id']:,}.."
                            f"{seal['last_id']:,} or out of order)")
            return False
        self._previous = message_id
        self.stored.add(digest)
        return True

    def run(self, leaves: Iterator[tuple[int, bytes]], rows: Iterator[tuple[Any, ...]]
            ) -> Comparison:
        version = self.seal["digest_version"]
        leaf, row = next(leaves, None), next(rows, None)
        while leaf is not None or row is not None:
            if row is None or (leaf is not None and leaf[0] < row[0]):
                if not self._leaf(*leaf):
                    break
                self.recomputed.add(leaf[1])  # gone: its stored digest is all there is
                if leaf[0] <= self.retained:
                    self.gone += 1
                else:
                    self._note("deleted", leaf[0], "")
                leaf = next(leaves, None)
            elif leaf is None or row[0] < leaf[0]:
                self._note("inserted", row[0], row[1])
                row = next(rows, None)
            else:
                if not self._leaf(*leaf):
                    break
                digest = message_digest(*row, version=version)
                self.recomputed.add(digest)
                if digest != leaf[1]:
                    self._note("differs", row[0], row[1])
                leaf, row = next(leaves, None), next(rows, None)
        return self

    def gives_root(self, builder: RootBuilder) -> bool:
        seal = self.seal
        if not seal["size"]:
            return builder.size == 0 and seal["root"] == EMPTY_ROOT
        return self.bad_ids is None and builder.size == seal["size"] and \
            builder.root == seal["root"]


def _changes(comparison: Comparison) -> tuple[list[str], tuple[str, int, str] | None]:
    """(problems, the first message changed (kind, id, topic)) of a seal: a
    digest that differs is blamed on the message only when the stored digests
    still give the seal's root; when the messages give it instead, the stored
    digests were changed, and the messages are as sealed."""
    problems: list[str] = []
    digests_hold = comparison.gives_root(comparison.stored)
    messages_hold = comparison.gives_root(comparison.recomputed)
    if comparison.bad_ids is not None:
        problems.append(comparison.bad_ids)
    kinds = {"deleted": "deleted", "inserted": "inserted"}
    differs = comparison.first.get("differs")
    if differs is not None and messages_hold and not digests_hold:
        message_id, topic = differs
        problems.append(f"the stored digest of message {message_id:,} ({topic}) was changed "
                        f"(and {comparison.counts['differs'] - 1:,} more): the message is as "
                        "sealed, its stored digests were altered")
    elif differs is not None:
        kinds["differs"] = "altered"
    if not digests_hold and not (differs is not None and messages_hold):
        problems.append("its stored digests do not give its root (the seal's leaves or root "
                        "were altered)")
    changes = sorted((comparison.first[kind][0], name, comparison.first[kind][1])
                     for kind, name in kinds.items() if kind in comparison.first)
    if not changes:
        return problems, None
    message_id, kind, topic = changes[0]
    more = sum(comparison.counts[k] for k in kinds) - 1
    problems.append(f"message {message_id:,}{' (' + topic + ')' if topic else ''} {kind} "
                    f"after sealing (and {more:,} more change(s))")
    return problems, (kind, message_id, topic)


def _check_seal(conn: Any, seal: dict[str, Any], retained: int, anchored: bytes | None
                ) -> tuple[list[str], tuple[str, int, str] | None, int, str]:
    """(problems, first message changed (kind, id, topic), sealed messages
    retention took, what its anchoring says) of one seal."""
    comparison = Comparison(seal, retained).run(
        seal_rows.leaves(conn, seal["seal_id"]),
        seal_rows.sealed_messages(conn, seal["first_id"], seal["last_id"], seal["prefixes"]))
    problems, first = _changes(comparison)
    document = _document(seal)
    record = "record (its id, ids, size, digest version, root and prefixes)" \
        if seal["seal_version"] == SEAL_RECORD else "root"
    if anchored is not None and anchored != document:
        problems.append(f"its {record} is not the one anchored as audit-seal:{seal['seal_id']} "
                        f"({anchored.hex()})")
    if seal["document"] is not None and seal["document"] != document:
        problems.append(f"its stored document {seal['document'].hex()} is not its {record}'s "
                        f"hash {document.hex()}")
    anchoring, anchor_ok = _anchoring(conn, document) if seal["size"] else \
        ("empty: not anchored", True)
    if not anchor_ok:
        problems.append(anchoring)
        anchoring = "its anchoring does not hold"
    return problems, first, comparison.gone, anchoring


def _tiling(rows: list[tuple[Any, ...]]) -> list[str]:
    """What is wrong with the seals as a whole: states a writer never leaves
    (a seal hidden by editing its status), ids covered by no seal (a seal
    deleted), more than one open seal."""
    problems, expected, open_seals = [], 1, 0
    for row in rows:
        seal_id, _prefixes, first_id, last_id, size, root, status = row[:7]
        if status == "open":
            open_seals += 1
            continue
        if status != "sealed" or not isinstance(last_id, int) or not isinstance(size, int) \
                or root is None or first_id != expected or last_id < first_id - 1:
            problems.append(f"seal {seal_id} is not as a writer leaves one (status {status!r}, "
                            f"ids {first_id}..{last_id}; the ids from {expected:,} on should "
                            "come next): the seals were altered or deleted")
            break
        expected = last_id + 1
    if open_seals > 1:
        problems.append(f"{open_seals} open seals: a writer leaves at most one")
    return problems


class ChainCheck:
    """The database held against the chain (`verify --node`): every root the
    anchor worker's wallet put in a confirmed transaction must be an anchor of
    the database whose documents rebuild it, and each seal document among them
    a seal of the database with that record; every anchor the database says is
    confirmed must be in the chain. What does not hold is a problem (exit 1);
    what is merely not confirmed yet is a note."""

    def __init__(self, conn: Any, rpc: Any) -> None:
        self.conn, self.rpc = conn, rpc
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.proven: set[int] = set()   # seal ids whose record a confirmed anchor holds

    def run(self) -> ChainCheck:
        from anchor.chain import confirmed_in_chain, wallet_anchors
        wallet = wallet_anchors(self.rpc)
        anchors = anchor_rows.every_anchor(self.conn)
        by_root: dict[bytes, list[dict[str, Any]]] = {}
        for anchor in anchors:
            by_root.setdefault(bytes(anchor["root"]), []).append(anchor)
        self.seals = {seal["seal_id"]: seal for seal in seal_rows.seals(self.conn)}
        self.wallet = wallet
        for entry in wallet.roots.values():
            held = by_root.get(entry.root, [])
            if entry.confirmed is None:
                if not held:
                    self.notes.append(
                        f"transaction(s) {', '.join(entry.txids)} carry root {entry.root.hex()}"
                        ", which no anchor of the database has; none is confirmed (in the "
                        "mempool, replaced or conflicted)")
                continue
            self._account(entry.root, entry.size, entry.confirmed, held)
        for anchor in anchors:  # what the database claims, and the wallet does not show
            entry = wallet.roots.get(bytes(anchor["root"]))
            if anchor["status"] == "failed" or (entry is not None and entry.confirmed):
                continue
            if anchor["status"] != "confirmed":
                self.notes.append(f"anchor {anchor['anchor_id']} (transaction {anchor['txid']}, "
                                  f"{anchor['status']}) is not confirmed in the chain yet")
                continue
            payload = stored_payload(anchor)
            found = confirmed_in_chain(self.rpc, anchor, payload)
            if found is None:
                self.problems.append(
                    f"anchor {anchor['anchor_id']}: the database says transaction "
                    f"{anchor['txid']} confirmed it in block {anchor['block_hash']} (height "
                    f"{anchor['block_height']}); the chain does not hold it there (a reorg "
                    "the worker has not seen yet: run again; or rows no worker wrote)")
                continue
            root, size = parse_payload(payload)
            self._account(root, size, found, by_root.get(root, []))
        return self

    def _account(self, root: bytes, size: int | None, confirmed: dict[str, Any],
                 held: list[dict[str, Any]]) -> None:
        """The database's account of a root confirmed in the chain."""
        where = f"transaction {confirmed['txid']} (block {confirmed['block_hash']}, height " \
                f"{confirmed['block_height']:,})"
        anchor = next((a for a in held if a["status"] != "failed"), held[0] if held else None)
        if anchor is None:
            self.problems.append(
                f"{where} anchors root {bytes(root).hex()}"
                f"{'' if size is None else f' of {size:,} document(s)'}, which no anchor of "
                "the database has: what it anchored (seals, documents) was deleted from the "
                "database")
            return
        leaves = anchor_rows.leaves(self.conn, anchor["anchor_id"])
        hashes = [bytes(leaf[0]) for leaf in leaves]
        if not hashes or MerkleTree(hashes).root != root or \
                (size is not None and size != len(hashes)):
            self.problems.append(
                f"{where} anchors root {bytes(root).hex()}: the {len(hashes):,} document(s) of "
                f"anchor {anchor['anchor_id']} ({anchor['status']}) in the database do not "
                "rebuild it (documents deleted or altered)")
            return
        if anchor["status"] == "confirmed" and anchor["txid"] != confirmed["txid"]:
            self.problems.append(f"anchor {anchor['anchor_id']}: the database names transaction "
                                 f"{anchor['txid']}, the chain holds its root in {where}")
        for document, ref, _message_id in leaves:
            if not (isinstance(ref, str) and ref.startswith("audit-seal:")
                    and ref[11:].isdigit()):
                continue
            seal = self.seals.get(int(ref[11:]))
            if seal is None:
                self.problems.append(f"seal {ref[11:]}, anchored in {where}, is not in the "
                                     "database")
            elif _document(seal) != bytes(document):
                self.problems.append(f"seal {ref[11:]} is not the one anchored in {where}: "
                                     f"its record's hash is {_document(seal).hex()}, the anchored"
                                     f" one {bytes(document).hex()} (the seal was rewritten)")
            else:
                self.proven.add(seal["seal_id"])


def _against_chain(ctx: click.Context, flags: dict[str, Any], conn: Any) -> ChainCheck:
    """ChainCheck with the node at BUS_BITCOIND_RPC_* (the anchor worker's
    settings: its wallet's URL), each call given bitcoind's own 30 s as the
    worker does: a page of a large wallet's list takes a while."""
    from anchor.bitcoind import BitcoinRpc, RpcAuthRefused, RpcError, RpcUnavailable
    cfg = build_config(ctx, flags, "audit")
    try:
        rpc = BitcoinRpc(cfg.bitcoind_rpc_url, cfg.bitcoind_rpc_user, cfg.bitcoind_rpc_password,
                         cfg.bitcoind_rpc_cookie)
    except ValueError as exc:  # the URL
        raise click.BadParameter(str(exc), param_hint="BUS_BITCOIND_RPC_URL") from None
    try:
        return ChainCheck(conn, rpc).run()
    except (RpcUnavailable, RpcAuthRefused, RpcError) as exc:
        click.echo(f"Error: cannot check against the chain: {exc}", err=True)
        sys.exit(1)
    finally:
        rpc.close()


@audit.command("verify")
@click.option("--from-id", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="check the seals that cover messages from this id on")
@click.option("--node", is_flag=True,
              help="also require the database to account for every anchor transaction of the "
                   "anchor worker's wallet (BUS_BITCOIND_RPC_*), and the chain to hold every "
                   "anchor the database says is confirmed")
@setting_options(*role_fields("database", "bitcoind"))
@click.pass_context
def verify(ctx: click.Context, from_id: int, node: bool, **flags: Any) -> None:
    """Recompute every seal from the database: each sealed message's digest
    against the one stored when it was sealed, the stored digests against the
    seal's root, its record against its anchor, the seals against each other
    (no ids left out). Names the first message that was altered, deleted (and
    not by retention, which records how far it went) or inserted after
    sealing, and a stored digest changed where the message was not. With
    --node, the chain's anchors too (ChainCheck). Exit 0 if nothing changed,
    1 if something did."""
    first_change: tuple[int, str, int, str] | None = None
    checked = retained_out = unanchored = bare = 0
    changed: list[str] = []
    with _snapshot(ctx, flags) as (conn, errors):
        try:
            rows = seal_rows.all_rows(conn)
            anchored = seal_rows.anchored_documents(conn)
            oldest = messages.first_id(conn)
            # A sealed message is taken as retention's only up to where
            # retention recorded it went (and below the oldest one stored):
            # any other missing one was deleted by someone else.
            retained = retention.retained_upto(conn)
            retained = retained if oldest is None else min(retained, oldest - 1)
        except errors as exc:
            raise InputError(f"no audit seals can be read here ({exc}): a bus database of "
                             "schema 10 or later (bus-cli db migrate)") from None
        tiling = _tiling(rows)
        changed += tiling
        seals = seal_rows.seals(conn, from_id)
        for seal in seals:
            span = f"seal {seal['seal_id']} (ids {seal['first_id']:,}..{seal['last_id']:,}, " \
                   f"{seal['size']:,} message(s) of {', '.join(seal['prefixes'])})"
            try:
                problems, first, gone, anchoring = _check_seal(
                    conn, seal, retained, anchored.pop(seal["seal_id"], None))
            except Exception as exc:  # rows no writer wrote: a text payload, a NULL size...
                problems, first, gone, anchoring = [
                    f"its rows are not what a bus writes ({type(exc).__name__}: {exc})"], \
                    None, 0, "not checked"
            unanchored += anchoring == "not anchored yet"
            bare += seal["seal_version"] != SEAL_RECORD and bool(seal["size"])
            retained_out += gone
            checked += seal["size"] - gone
            if first is not None and (first_change is None or first[1] < first_change[2]):
                first_change = (seal["seal_id"], *first)
            retained_note = f"; {gone:,} deleted by retention (which went up to id " \
                        f"{retained:,}): their digests still check against the root" \
                if gone else ""
            if problems:
                changed.append(span)
                click.echo(f"CHANGED: {span}: {'; '.join(problems)}; {anchoring}{retained_note}")
            else:
                click.echo(f"OK: {span}: unchanged; {anchoring}{retained_note}")
        for seal_id in sorted(anchored):  # anchored as audit-seal:N, and N is gone
            if not from_id:
                changed.append(f"seal {seal_id}")
                click.echo(f"CHANGED: seal {seal_id} was anchored, and is not in the database")
        for problem in tiling:
            click.echo(f"CHANGED: {problem}")
        last = seals[-1] if seals else None
        tail = seal_rows.unsealed_count(conn, last["last_id"], last["prefixes"]) if last else 0
        chain = _against_chain(ctx, flags, conn) if node else None
    if chain is not None:
        for note in chain.notes:
            click.echo(f"NOTE: {note}")
        for problem in chain.problems:
            click.echo(f"CHANGED: {problem}")
        nonempty = [s for s in seals if s["size"]]
        click.echo(f"the chain: {chain.wallet.transactions:,} anchor transaction(s) in the "
                   f"worker's wallet ({chain.wallet.sends:,} sends), "
                   f"{sum(1 for e in chain.wallet.roots.values() if e.confirmed):,} root(s) "
                   f"confirmed; {sum(s['seal_id'] in chain.proven for s in nonempty):,} of "
                   f"{len(nonempty):,} seal(s) checked here anchored in it")
        for unreadable in chain.wallet.unreadable:
            click.echo(f"NOTE: BUSA data of no version this bus knows: {unreadable}")
    summary = f"{len(seals):,} seals, {checked:,} sealed messages checked"
    if retained_out:
        summary += f", {retained_out:,} deleted by retention (not checkable)"
    if unanchored:
        summary += f"; {unanchored:,} seal(s) not anchored yet (only the database vouches for them)"
    if bare:
        summary += (f"; {bare:,} seal(s) of version 1 (their root anchored bare: their id, id "
                    "range and size are the database's word)")
    if last is not None:
        age = (time.time_ns() - last["sealed_ns"]) / 1e9
        summary += (f"; {tail:,} message(s) of {', '.join(last['prefixes'])} stored after the "
                    f"last seal (id {last['last_id']:,}, {age:,.0f} s ago), not sealed yet")
    if chain is None:
        summary += "; checked the database against itself only (--node: against the chain)"
    if first_change is not None:
        seal_id, kind, message_id, topic = first_change
        click.echo(f"{summary}: the first change is message {message_id:,}"
                   f"{' (' + topic + ')' if topic else ''}, {kind} after seal {seal_id}", err=True)
        sys.exit(1)
    if changed:
        click.echo(f"{summary}: the seals themselves were changed ({changed[0]})", err=True)
        sys.exit(1)
    if chain is not None and chain.problems:
        click.echo(f"{summary}: the database does not account for what the chain holds "
                   f"({chain.problems[0]})", err=True)
        sys.exit(1)
    if not seals:
        click.echo("no seals (is BUS_AUDIT_PREFIXES set, and the anchor worker running?)")
    click.echo(f"{summary}: nothing changed")


@audit.command("proof")
@click.argument("message_id", type=click.IntRange(1, 2**63 - 1))
@setting_options(*role_fields("database"))
@click.pass_context
def proof(ctx: click.Context, message_id: int, **flags: Any) -> None:
    """A proof that stored message MESSAGE_ID existed, as it is now, before
    the Bitcoin block of its seal's anchor: the message, its path to the
    seal's root, and the seal root's anchor proof. `bus-cli anchor verify`
    checks it offline (--tx-hex, --node: with the transaction and a node).
    Refused when the database does not hold together (`audit verify` says how)."""
    with _snapshot(ctx, flags) as (conn, errors):
        try:
            built = _message_proof(conn, message_id)
        except errors as exc:
            raise InputError(f"no audit seals can be read here ({exc}): a bus database of "
                             "schema 10 or later (bus-cli db migrate)") from None
        except InputError:
            raise
        except Exception as exc:  # rows no writer wrote (a text payload, a NULL size...)
            raise InputError(f"the database's rows for message {message_id} are not what a "
                             f"bus writes ({type(exc).__name__}: {exc}): bus-cli audit verify"
                             ) from None
    click.echo(json.dumps(built, indent=2))


def _message_proof(conn: Any, message_id: int) -> dict[str, Any]:
    seal = seal_rows.seal_of(conn, message_id)
    row = seal_rows.message_row(conn, message_id)
    if seal is None and row is None:
        last = messages.last_id(conn)
        if last is None or message_id > last:
            raise InputError(f"no message {message_id}: " + (
                "the database holds no message yet" if last is None
                else f"the last stored is {last}"))
        raise InputError(f"message {message_id} is not stored (deleted: retention?) and in no seal")
    if seal is None:
        raise InputError(f"message {message_id} is in no seal" + (
            "" if row is None else " (yet; or its topic is not sealed: BUS_AUDIT_PREFIXES)"))
    digests, index = [], None
    for i, (leaf_id, digest) in enumerate(seal_rows.leaves(conn, seal["seal_id"])):
        digests.append(digest)
        if leaf_id == message_id:
            index = i
    if digests and MerkleTree(digests).root != seal["root"]:
        raise InputError(f"seal {seal['seal_id']}'s stored leaves do not give its root (altered):"
                         " no proof; bus-cli audit verify")
    if index is None:
        raise InputError(f"message {message_id} is not in seal {seal['seal_id']} (not of the "
                         f"sealed topics {', '.join(seal['prefixes'])})")
    if row is None:
        raise InputError(f"message {message_id} was sealed (seal {seal['seal_id']}) and is no "
                         "longer stored (retention, or deleted): its digest is all that is left")
    if message_digest(*row, version=seal["digest_version"]) != digests[index]:
        raise InputError(f"message {message_id} was altered after sealing: no proof")
    document = _document(seal)
    anchored = anchor_rows.proof_rows(conn, document)
    if anchored is None:
        raise InputError(f"seal {seal['seal_id']} is not anchored yet: ask again later")
    tree = MerkleTree(digests)
    anchor, anchor_index, ref, anchor_leaves = anchored
    anchor_tree = MerkleTree(anchor_leaves)
    bound = seal["seal_version"] == SEAL_RECORD
    seal_fields = {"seal_id": seal["seal_id"]}
    if bound:  # the fields the anchored record binds, all of them
        seal_fields.update(first_id=seal["first_id"], last_id=seal["last_id"],
                           prefixes=seal["prefixes"], digest_version=seal["digest_version"])
    return {
        "format": AUDIT_PROOF_FORMAT_RECORD if bound else AUDIT_PROOF_FORMAT,
        "message": {"id": row[0], "topic": row[1], "payload": bytes(row[2]).hex(),
                    "meta": None if row[3] is None else bytes(row[3]).hex(),
                    "producer_id": row[4], "producer_seq": row[5],
                    **({"publish_ns": row[6], "committed_ns": row[7]}
                       if seal["digest_version"] == 2 else {})},
        "digest": digests[index].hex(),
        "seal": {**seal_fields, "leaf_index": index, "tree_size": tree.size,
                 "path": [p.hex() for p in tree.path(index)], "root": tree.root.hex(),
                 **({"record": document.hex()} if bound else {})},
        "anchor": make_proof(document, anchor_index, anchor_tree.size,
                             anchor_tree.path(anchor_index), anchor, ref),
    }
