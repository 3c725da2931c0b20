"""bus-cli commands of the anchoring side.

    bus-cli anchor                      the anchor worker (what bus-anchor.service runs)
    bus-cli anchor submit FILE|--hash   request an anchoring; --wait for the proof
    bus-cli anchor proof HASH           a document's inclusion proof (JSON)
    bus-cli anchor verify PROOF_FILE    check a proof (--tx-hex: its transaction; --node: its block)
    bus-cli utxo stats                  the wallet's UTXO table and reservation counters

Proofs and the UTXO summary come from the reader (off the write path); the
reservation counters from the writer.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

import click
import msgpack

from bus import protocol, security
from bus.client import BusError, ControlClient, Publisher
from bus.config import role_fields
from cli.common import (MAX_SECONDS, FiniteFloat, Liveness, build_config, print_sections,
                        setting_options)


@click.group(invoke_without_command=True)
@setting_options(*role_fields("anchor"))
@click.pass_context
def anchor(ctx: click.Context, **flags: Any) -> None:
    """Run the anchor worker (without a sub-command), or talk to it."""
    if ctx.invoked_subcommand is not None:
        return
    from anchor.worker import AnchorWorker
    from bus.runner import run_role
    sys.exit(run_role(AnchorWorker(build_config(ctx, flags, "anchor"))))


def _document_hash(file: str | None, hex_hash: str | None, hint: str = "--hash") -> bytes:
    """`hint`: what the user typed the hash as (an option, an argument)."""
    if (file is None) == (hex_hash is None):
        raise click.UsageError("give FILE or --hash HEX (one of them)")
    if hex_hash is not None:
        try:
            digest = bytes.fromhex(hex_hash)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise click.BadParameter(f"{hex_hash!r} is not a SHA-256: 64 hex characters",
                                     param_hint=hint)
        return digest
    sha = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.digest()


# How long `submit --wait` gives the anchor worker to take a request (read it
# into its batch) before it says that no worker has; the worker reads a
# request within a commit of it, unless it is down, reads no more, or is busy
# reading older ones (which moves the deadline on).
TAKE_TIMEOUT_S = 10.0


class Taking:
    """Whether an anchor worker has taken the request for `digest`: it waits
    in the worker's batch (the worker's `request_status`), or is recorded in
    an anchor (its proof exists). Asked in that order, a request moving from
    the batch to its anchor between the two questions is seen in one of them.
    `bound`: the newest stored message id once the request was stored, so its
    id is at most this; a worker that has read every request up to it and
    does not hold this one has passed it by."""

    def __init__(self, cfg: Any, digest: bytes, take_timeout: float) -> None:
        self.cfg = cfg
        self.digest = digest
        self.take_timeout = take_timeout
        self.deadline = time.monotonic() + take_timeout
        self.taken = False
        self.read_through: int | None = None
        self.bound: int | None = None
        self.consumer_exists: bool | None = None
        try:
            with ControlClient(cfg.control_endpoint, timeout_ms=cfg.request_timeout_ms,
                               curve=security.client_keys(cfg)) as client:
                known = client.request("consumer_get", {"consumer": cfg.anchor_consumer})
            self.bound, self.consumer_exists = known["last_message_id"], \
                known["last_id"] is not None
        except BusError:
            pass  # a key that may not ask (a publisher's): no bound, no hint

    def status(self) -> dict[str, Any] | None:
        """The worker's `request_status` for the digest; None if it does not
        answer. A worker from before the command: taken, as far as we can tell."""
        with ControlClient(self.cfg.anchor_control_endpoint,
                           timeout_ms=min(self.cfg.request_timeout_ms, 1000),
                           curve=security.client_keys(self.cfg)) as client:
            try:
                return client.request("request_status", {"hash": self.digest})
            except BusError as exc:
                if exc.code == protocol.UNKNOWN_COMMAND:
                    self.taken = True
                return None

    def verdict(self, status: dict[str, Any] | None, proof: dict[str, Any] | None,
                proof_known: bool = True) -> str | None:
        """Why no worker has taken the request (the end of a sentence), once
        that is certain or the take deadline has passed; None meanwhile and
        once it is taken.
        `proof_known`: False when the reader did not answer (no proof then
        says nothing, unless the worker does not answer either)."""
        if self.taken or (status is not None and status["waiting"]) or proof is not None:
            self.taken = True
            return None
        if status is not None and not proof_known:
            return None
        now = time.monotonic()
        where = f"the anchor worker at {self.cfg.anchor_control_endpoint}"
        if status is not None:
            through = status["read_through_id"]
            if through is not None and self.bound is not None and through >= self.bound:
                return (f": {where} has read every stored request up to message {through:,} "
                        "and does not hold this one: a defect; report it (the worker reads "
                        f"every stored request again after `bus-cli consumers rm "
                        f"{status['consumer']}` and a restart)")
            if through is not None and through != self.read_through:
                if self.read_through is not None:  # reading older requests: progress
                    self.deadline = now + self.take_timeout
                self.read_through = through
        if now < self.deadline:
            return None
        waited = f" within {self.take_timeout:g} s"
        if status is None:
            why = f"{where} does not answer (is bus-anchor running?)"
            if self.consumer_exists is False:
                why += (f"; no anchor worker has started on this bus (no durable consumer "
                        f"'{self.cfg.anchor_consumer}')")
            return f"{waited}: {why}. The request is stored: a worker anchors it once it starts"
        if not status["reading"]:
            return (f"{waited}: {where} has not opened its durable consumer yet (it needs the "
                    "writer and the reader: bus-cli health says which does not answer)")
        if status["documents"] >= status["max_documents"]:
            return (f"{waited}: {where} holds a full batch of {status['documents']:,} documents "
                    "(BUS_ANCHOR_MAX_DOCUMENTS) and reads no more requests until it has "
                    "anchored them (bus-cli health --anchor says why it has not)")
        return (f"{waited}: {where} has read the stored requests up to message "
                f"{status['read_through_id'] or 0:,}, not this one yet")


def _proof(cfg: Any, digest: bytes) -> dict[str, Any] | None:
    with ControlClient(cfg.read_endpoint, timeout_ms=cfg.request_timeout_ms,
                       curve=security.client_keys(cfg)) as client:
        return client.request("anchor_proof", {"hash": digest})


@anchor.command()
@click.argument("file", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--hash", "hex_hash", help="the document's SHA-256 (hex) instead of FILE")
@click.option("--ref", default=None,
              help=f"a reference stored with the anchoring ({protocol.MAX_ANCHOR_REF_CHARS} "
                   "characters at most)")
@click.option("--wait", is_flag=True, help="wait until the document is anchored in a "
              "broadcast transaction, then print its proof")
@click.option("--timeout", type=FiniteFloat(min=0, max=MAX_SECONDS), default=300.0,
              show_default=True,
              help="seconds --wait waits")
@click.option("--take-timeout", type=FiniteFloat(min=0, max=MAX_SECONDS), default=TAKE_TIMEOUT_S,
              show_default=True,
              help="seconds --wait gives the anchor worker to take the request (longer while "
                   "it reads older requests); exit 1 if none has")
@setting_options(*role_fields("anchor_requester", "reader_client", "anchor_client", "curve"))
@click.pass_context
def submit(ctx: click.Context, file: str | None, hex_hash: str | None, ref: str | None,
           wait: bool, timeout: float, take_timeout: float, **flags: Any) -> None:
    """Request the anchoring of FILE's SHA-256 (or --hash). Exits once the
    request is stored by the bus (so the worker will see it), or with --wait
    once the document is in a broadcast anchor transaction; --wait exits 1
    within --take-timeout seconds if no anchor worker has taken the request
    (the request stays stored)."""
    cfg = build_config(ctx, flags, "anchor", client_of=True)
    digest = _document_hash(file, hex_hash)
    if ref is not None and len(ref) > protocol.MAX_ANCHOR_REF_CHARS:
        raise click.BadParameter(f"{len(ref)} characters; at most "
                                 f"{protocol.MAX_ANCHOR_REF_CHARS}", param_hint="--ref")
    request = {"hash": digest} | ({"ref": ref} if ref else {})
    try:
        with Publisher(cfg) as pub:
            pub.publish(protocol.ANCHOR_REQUEST_TOPIC, msgpack.packb(request),
                        content_type=protocol.CONTENT_MSGPACK, wait=True,
                        timeout=cfg.request_timeout_ms / 1000 * 3)
    except BusError as exc:
        click.echo(f"Error: the request was not stored: {exc}", err=True)
        sys.exit(1)
    click.echo(f"requested {digest.hex()}", err=True)
    if not wait:
        return
    deadline = time.monotonic() + timeout
    # Says on stderr when the worker or the reader stops answering, and again
    # when it is back: --wait never waits silently for a worker that is not there.
    liveness = Liveness(cfg, ["anchor", "reader"])
    taking = Taking(cfg, digest, take_timeout)
    while True:
        liveness.check()
        status = None if taking.taken else taking.status()  # before the proof: see Taking
        try:
            proof, proof_known = _proof(cfg, digest), True
        except BusError:
            proof, proof_known = None, False
        if proof is not None and proof["status"] in ("submitted", "confirmed"):
            click.echo(json.dumps(proof, indent=2))
            return
        if (not_taken := taking.verdict(status, proof, proof_known)) is not None:
            click.echo(f"Error: no anchor worker has taken the request for {digest.hex()}"
                       f"{not_taken}", err=True)
            sys.exit(1)
        if time.monotonic() >= deadline:
            down = f" (not answering: {', '.join(liveness.down)})" if liveness.down else \
                " (bus-cli health --anchor and the worker's log say why)"
            click.echo(f"Error: {digest.hex()} is not anchored after {timeout:g} s{down}",
                       err=True)
            sys.exit(1)
        time.sleep(0.5)


@anchor.command()
@click.argument("hex_hash", metavar="HASH")
@setting_options(*role_fields("reader_client", "curve"))
@click.pass_context
def proof(ctx: click.Context, hex_hash: str, **flags: Any) -> None:
    """Print the inclusion proof (JSON) of the document whose SHA-256 is HASH."""
    cfg = build_config(ctx, flags, "anchor", client_of=True)
    digest = _document_hash(None, hex_hash, hint="HASH")
    try:
        found = _proof(cfg, digest)
    except BusError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    if found is None:
        click.echo(f"Error: {hex_hash} is not anchored", err=True)
        sys.exit(1)
    click.echo(json.dumps(found, indent=2))


@anchor.command()
@click.argument("proof_file", type=click.File("rb"))
@click.option("--tx-hex", default=None, help="the anchor transaction (hex), to check it too")
@click.option("--node", is_flag=True,
              help="ask bitcoind (BUS_BITCOIND_RPC_*) that the transaction is in the proof's "
                   "block, and the block in its best chain")
@setting_options(*role_fields("bitcoind", "bitcoind_deadline"))
@click.pass_context
def verify(ctx: click.Context, proof_file: Any, tx_hex: str | None, node: bool,
           **flags: Any) -> None:
    """Check a proof (of a document, or of a sealed message: `bus-cli audit
    proof`), saying what was checked and what was not: its audit path
    leads to its root; its OP_RETURN data commits to that root (and, for
    anchors since the size is committed, to the tree size); with --tx-hex (or
    --node) that the transaction has the proof's txid and carries that data;
    with --node that bitcoind holds the transaction in the proof's block, in
    its best chain. Exit 0 if everything checked holds, 1 if not."""
    from anchor.bitcoind import BitcoinRpc, RpcAuthRefused, RpcUnavailable
    from anchor.proof import find_in_chain, verify_proof
    from proofs.audit import AUDIT_PROOF_FORMATS, verify_message
    from proofs.document import ProofError
    try:
        proof_json = json.loads(proof_file.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError: ValueError
        click.echo(f"INVALID: {proof_file.name} is not a proof (JSON text): {exc}", err=True)
        sys.exit(1)
    in_chain = message = None
    try:
        if isinstance(proof_json, dict) and proof_json.get("format") in AUDIT_PROOF_FORMATS:
            message = verify_message(proof_json)  # then the seal root's anchor proof
            proof_json = proof_json["anchor"]
        checked = verify_proof(proof_json)
        if node:
            cfg = build_config(ctx, flags, "anchor", client_of=True)
            try:
                rpc = BitcoinRpc(cfg.bitcoind_rpc_url, cfg.bitcoind_rpc_user,
                                 cfg.bitcoind_rpc_password, cfg.bitcoind_rpc_cookie,
                                 timeout_s=cfg.request_timeout_ms / 1000)
            except ValueError as exc:  # the URL
                raise click.BadParameter(str(exc), param_hint="BUS_BITCOIND_RPC_URL") from None
            try:
                in_chain = find_in_chain(proof_json, rpc)
            finally:
                rpc.close()
            tx_hex = tx_hex or in_chain["tx_hex"]
        if tx_hex is not None:
            checked = verify_proof(proof_json, tx_hex)
    except ProofError as exc:
        click.echo(f"INVALID: {exc}", err=True)
        sys.exit(1)
    except (RpcUnavailable, RpcAuthRefused) as exc:
        click.echo(f"Error: cannot check with the node: {exc}", err=True)
        sys.exit(1)
    size = f"{checked['tree_size']:,}"
    lines = [] if message is None else _message_lines(message)
    lines += [f"OK: the audit path leads from document {checked['document']} (leaf "
             f"{checked['leaf_index']:,} of {size}) to root {checked['root']}"]
    if checked["size_committed"]:
        lines.append(f"OK: the OP_RETURN data commits to that root and to a tree of {size} leaves")
    else:
        lines.append("OK: the OP_RETURN data commits to that root (version 1: the tree size "
                     "and leaf index are the proof's word, not the chain's)")
    if checked["transaction_checked"]:
        lines.append(f"OK: transaction {checked['txid']} carries that data in its one OP_RETURN "
                     f"(output {checked['op_return_vout']})")
    else:
        lines.append("NOT CHECKED: that the proof's transaction carries that data (give "
                     "--tx-hex, or --node)")
    if in_chain is not None:
        lines.append(f"OK: bitcoind holds it in block {in_chain['block_hash']} at height "
                     f"{in_chain['block_height']:,} of its best chain, "
                     f"{in_chain['confirmations']:,} confirmations (gettxoutproof, "
                     "verifytxoutproof)")
    else:
        lines.append("NOT CHECKED: that the transaction is in a block of the best chain "
                     "(give --node)")
    click.echo("\n".join(lines))


def _message_lines(message: dict[str, Any]) -> list[str]:
    """What `verify` says of an audit proof's message and seal: every number
    it prints is checked, or NOT CHECKED is printed beside it."""
    head = f"OK: message {message['message_id']:,} ({message['topic']}) has digest " \
           f"{message['digest']}"
    if message["bound"]:
        return [f"{head} (digest version {message['digest_version']}), leaf "
                f"{message['leaf_index']:,} of {message['tree_size']:,} of seal "
                f"{message['seal_id']} (ids {message['first_id']:,}..{message['last_id']:,} of "
                f"{', '.join(message['prefixes'])}), whose root is {message['seal_root']}",
                f"OK: the seal record binding that seal id, id range, size, digest version, "
                f"root and prefixes hashes to {message['document']}, the anchored document"]
    return [f"{head}, which leads to seal root {message['seal_root']}, the anchored document",
            f"NOT CHECKED: that it is leaf {message['leaf_index']:,} of "
            f"{message['tree_size']:,} of seal {message['seal_id']} (a seal of version 1 "
            "anchors its root alone: its id and size are the proof's word, and any size whose "
            "tree has the same path shape leads to the same root)"]


@click.group()
def utxo() -> None:
    """The wallet's UTXO table (owned by the writer)."""


@utxo.command("stats")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@setting_options(*role_fields("writer_client", "reader_client", "curve"))
@click.pass_context
def utxo_stats(ctx: click.Context, as_json: bool, **flags: Any) -> None:
    """Available, reserved and spent UTXOs, the wallet tip, and the writer's
    reservation counters (reserved, expired, no_utxo, replayed...)."""
    cfg = build_config(ctx, flags, "utxo")
    result: dict[str, Any] = {}
    failed = False
    for name, endpoint, cmd in (("table", cfg.read_endpoint, "utxo_stats"),
                                ("writer", cfg.control_endpoint, "stats")):
        with ControlClient(endpoint, timeout_ms=cfg.request_timeout_ms,
                           curve=security.client_keys(cfg)) as client:
            try:
                reply = client.request(cmd)
                result[name] = reply["utxos"] if cmd == "stats" else reply
            except BusError as exc:
                result[name] = {"error": str(exc)}
                failed = True
    print_sections(result, as_json)
    sys.exit(1 if failed else 0)
