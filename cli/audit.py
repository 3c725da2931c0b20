"""bus-cli audit: the tamper-evident message log (docs/protocol.md, "Audit seals").

    bus-cli audit verify [--from-id N]   recompute every seal from the database
    bus-cli audit proof ID               one sealed message's proof (JSON)

Both read the database (BUS_DB) directly, read-only, as `bus-cli db` does:
they are run where the database is, or against a PostgreSQL replica.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import click

import storage
from cli.common import InputError, build_config, setting_options
from proofs.audit import AUDIT_PROOF_FORMAT, RootBuilder, message_digest
from proofs.document import make_proof, parse_payload, stored_payload
from proofs.merkle import MerkleTree
from storage import anchors as anchor_rows
from storage import audit as seal_rows
from storage import messages


@click.group()
def audit() -> None:
    """The tamper-evident log of the sealed topics (BUS_AUDIT_PREFIXES)."""


def _open(ctx: click.Context, flags: dict[str, Any]) -> Any:
    cfg = build_config(ctx, flags, "audit")
    try:
        return storage.open_read_only(cfg.db, cfg.sqlite_busy_timeout_ms)
    except storage.NotReadable as exc:
        raise InputError(str(exc)) from None


def _anchoring(conn: Any, root: bytes) -> tuple[str, bool]:
    """What the database says of a seal root's anchoring, and whether it holds
    together (the root is a leaf of the anchor's tree, whose root is in the
    recorded transaction's OP_RETURN)."""
    found = anchor_rows.proof_rows(conn, root)
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


def _changes(conn: Any, seal: dict[str, Any], oldest: int) -> Iterator[tuple[str, int, str]]:
    """(kind, message id, topic) of each difference between the seal's leaves
    and the stored messages, in id order: altered, deleted (above `oldest`,
    the oldest message retention left), inserted."""
    sealed = seal_rows.leaves(conn, seal["seal_id"])
    stored = seal_rows.sealed_messages(conn, seal["first_id"], seal["last_id"], seal["prefixes"])
    leaf, row = next(sealed, None), next(stored, None)
    while leaf is not None or row is not None:
        if row is None or (leaf is not None and leaf[0] < row[0]):
            if leaf[0] >= oldest:
                yield "deleted", leaf[0], ""
            leaf = next(sealed, None)
        elif leaf is None or row[0] < leaf[0]:
            yield "inserted", row[0], row[1]
            row = next(stored, None)
        else:
            if message_digest(*row) != leaf[1]:
                yield "altered", row[0], row[1]
            leaf, row = next(sealed, None), next(stored, None)


@audit.command("verify")
@click.option("--from-id", type=click.IntRange(0, 2**62), default=0, show_default=True,
              help="check the seals that cover messages from this id on")
@setting_options("db", "sqlite_busy_timeout_ms")
@click.pass_context
def verify(ctx: click.Context, from_id: int, **flags: Any) -> None:
    """Recompute every seal from the database: each sealed message's digest
    against the one stored when it was sealed, the stored digests against the
    seal's root, the root against its anchor. Names the first message that
    was altered, deleted or inserted after sealing. Exit 0 if nothing changed,
    1 if something did."""
    conn = _open(ctx, flags)
    first_change: tuple[int, str, int, str] | None = None
    checked = retained_out = 0
    try:
        oldest = messages.first_id(conn) or 0
        seals = seal_rows.seals(conn, from_id)
        for seal in seals:
            builder, sealed_ids = RootBuilder(), []
            for message_id, digest in seal_rows.leaves(conn, seal["seal_id"]):
                builder.add(digest)
                sealed_ids.append(message_id)
            span = f"seal {seal['seal_id']} (ids {seal['first_id']:,}..{seal['last_id']:,}, " \
                   f"{seal['size']:,} messages of {', '.join(seal['prefixes'])})"
            leaves_ok = builder.size == seal["size"] and (not seal["size"] or
                                                          builder.root == seal["root"])
            anchoring, anchor_ok = _anchoring(conn, seal["root"]) if seal["size"] else \
                ("empty: not anchored", True)
            changes = list(_changes(conn, seal, oldest))
            gone = sum(1 for i in sealed_ids if i < oldest)
            retained_out += gone
            checked += seal["size"] - gone
            problems = [] if leaves_ok else ["its stored digests do not give its root (the "
                                             "seal's leaves were altered)"]
            if not anchor_ok:
                problems.append(anchoring)
            if changes:
                kind, message_id, topic = changes[0]
                problems.append(f"{len(changes):,} change(s); the first: message {message_id:,}"
                                f"{' (' + topic + ')' if topic else ''} {kind} after sealing")
                if first_change is None or message_id < first_change[2]:
                    first_change = (seal["seal_id"], kind, message_id, topic)
            retention = f"; {gone:,} deleted by retention (below id {oldest:,}): their " \
                        "digests still check against the root" if gone else ""
            if problems:
                click.echo(f"CHANGED: {span}: {'; '.join(problems)}; {anchoring}{retention}")
            else:
                click.echo(f"OK: {span}: unchanged; {anchoring}{retention}")
    finally:
        conn.close()
    summary = f"{len(seals):,} seals, {checked:,} sealed messages checked"
    if retained_out:
        summary += f", {retained_out:,} deleted by retention (not checkable)"
    if first_change is not None:
        seal_id, kind, message_id, topic = first_change
        click.echo(f"{summary}: the first change is message {message_id:,}"
                   f"{' (' + topic + ')' if topic else ''}, {kind} after seal {seal_id}", err=True)
        sys.exit(1)
    if not seals:
        click.echo("no seals (is BUS_AUDIT_PREFIXES set, and the anchor worker running?)")
    click.echo(f"{summary}: nothing changed")


@audit.command("proof")
@click.argument("message_id", type=click.IntRange(1, 2**62))
@setting_options("db", "sqlite_busy_timeout_ms")
@click.pass_context
def proof(ctx: click.Context, message_id: int, **flags: Any) -> None:
    """A proof that stored message MESSAGE_ID existed, as it is now, before
    the Bitcoin block of its seal's anchor: the message, its path to the
    seal's root, and the seal root's anchor proof. `bus-cli anchor verify`
    checks it offline (--tx-hex, --node: with the transaction and a node)."""
    conn = _open(ctx, flags)
    try:
        seal = seal_rows.seal_of(conn, message_id)
        row = conn.execute("SELECT id, topic, payload, meta, producer_id, producer_seq FROM"
                           " messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise InputError(f"message {message_id} is not stored")
        if seal is None:
            raise InputError(f"message {message_id} is not in a seal (yet)")
        digests, index = [], None
        for i, (leaf_id, digest) in enumerate(seal_rows.leaves(conn, seal["seal_id"])):
            digests.append(digest)
            if leaf_id == message_id:
                index = i
        if index is None:
            raise InputError(f"message {message_id} is not in seal {seal['seal_id']} (not of "
                             f"the sealed topics {', '.join(seal['prefixes'])})")
        if message_digest(*row) != digests[index]:
            raise InputError(f"message {message_id} was altered after sealing: no proof")
        anchored = anchor_rows.proof_rows(conn, seal["root"])
        if anchored is None:
            raise InputError(f"seal {seal['seal_id']} is not anchored yet: ask again later")
    finally:
        conn.close()
    tree = MerkleTree(digests)
    anchor, anchor_index, ref, anchor_leaves = anchored
    anchor_tree = MerkleTree(anchor_leaves)
    click.echo(json.dumps({
        "format": AUDIT_PROOF_FORMAT,
        "message": {"id": row[0], "topic": row[1], "payload": bytes(row[2]).hex(),
                    "meta": None if row[3] is None else bytes(row[3]).hex(),
                    "producer_id": row[4], "producer_seq": row[5]},
        "digest": digests[index].hex(),
        "seal": {"seal_id": seal["seal_id"], "leaf_index": index, "tree_size": tree.size,
                 "path": [p.hex() for p in tree.path(index)], "root": tree.root.hex()},
        "anchor": make_proof(seal["root"], anchor_index, anchor_tree.size,
                             anchor_tree.path(anchor_index), anchor, ref),
    }, indent=2))
