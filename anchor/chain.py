"""What the chain holds of a bus's anchors, as the anchor worker's wallet
knows them: every transaction the wallet sent whose one OP_RETURN carries
`BUSA` data, grouped by the root it carries. `bus-cli audit verify --node`
requires the database to account for each of them (docs/protocol.md, "Audit
seals": the chain as ground truth).

The wallet, not a scan of the chain: on a shared chain anyone can publish
`BUSA` data, and only the wallet's own sends are this bus's anchors. Its list
is read with `listtransactions` a page at a time (Core has no cursor: a page
is the newest `count` entries after `skip`, so the total cost grows with the
wallet, the memory with the page), then `gettransaction` for each send. A fee
bump and the transaction it replaced, or a transaction and the conflicting
one that was mined in its place, carry the same root: they are one anchor,
confirmed if one of them is in the best chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anchor.bitcoind import BitcoinRpc, RpcError, op_return_outputs, parse_tx
from anchor.proof import NodeAnswer
from proofs.document import ANCHOR_MAGIC, ProofError, parse_payload

PAGE_ENTRIES = 5000            # listtransactions entries a call
MAX_PAGES = 20_000             # 100,000,000 wallet entries: past that, the wallet is not one


@dataclass
class ChainRoot:
    """A root the wallet's transactions put on chain."""
    root: bytes
    size: int | None                       # committed tree size (None: payload version 1)
    txids: list[str] = field(default_factory=list)   # every wallet transaction carrying it
    confirmed: dict[str, Any] | None = None  # {txid, block_hash, block_height, confirmations}


@dataclass
class WalletAnchors:
    roots: dict[bytes, ChainRoot] = field(default_factory=dict)
    transactions: int = 0                  # wallet transactions carrying BUSA data
    sends: int = 0                         # wallet sends examined
    unreadable: list[str] = field(default_factory=list)  # BUSA data of no known version


def send_txids(rpc: BitcoinRpc, page: int = PAGE_ENTRIES) -> list[str]:
    """The txid of every transaction the wallet sent (category "send"), each
    once, oldest first as far as the pages tell."""
    seen: dict[str, None] = {}
    for number in range(MAX_PAGES):
        entries = rpc.call("listtransactions", "*", page, number * page)
        if not isinstance(entries, list):
            raise NodeAnswer("bitcoind's listtransactions answer is not a list")
        # Newer entries push older ones to later pages: one may come twice.
        for entry in reversed(entries):
            if entry.get("category") == "send" and isinstance(entry.get("txid"), str):
                seen.setdefault(entry["txid"], None)
        if len(entries) < page:
            return list(reversed(seen))
    raise NodeAnswer(f"the wallet lists more than {MAX_PAGES * page:,} entries")


def wallet_anchors(rpc: BitcoinRpc, page: int = PAGE_ENTRIES) -> WalletAnchors:
    """Every root the wallet's sends carry (RpcUnavailable, RpcError and
    NodeAnswer are the caller's)."""
    found = WalletAnchors()
    for txid in send_txids(rpc, page):
        found.sends += 1
        wallet_tx = rpc.call("gettransaction", txid)
        try:
            payloads = [data for _vout, data in op_return_outputs(parse_tx(wallet_tx["hex"]))
                        if data[:4] == ANCHOR_MAGIC]
            confirmations = int(wallet_tx["confirmations"])
        except (KeyError, TypeError, ValueError) as exc:
            raise NodeAnswer(f"bitcoind's gettransaction answer for {txid} has not the shape "
                             f"bitcoind's has ({exc!r})") from None
        if len(payloads) != 1:  # not an anchor: the worker's have one OP_RETURN
            continue
        try:
            root, size = parse_payload(payloads[0])
        except ProofError as exc:
            found.unreadable.append(f"transaction {txid}: {exc}")
            continue
        found.transactions += 1
        entry = found.roots.setdefault(root, ChainRoot(root, size))
        entry.txids.append(txid)
        if confirmations >= 1:
            entry.confirmed = {"txid": txid, "block_hash": wallet_tx.get("blockhash"),
                               "block_height": wallet_tx.get("blockheight"),
                               "confirmations": confirmations}
    return found


def confirmed_in_chain(rpc: BitcoinRpc, anchor: dict[str, Any], payload: bytes
                       ) -> dict[str, Any] | None:
    """Whether the best chain holds the anchor's transaction in the block the
    database says, carrying `payload`: for an anchor the wallet does not list
    (a wallet replaced since). None if not; RpcUnavailable is the caller's."""
    if not anchor.get("block_hash"):
        return None
    try:
        header = rpc.call("getblockheader", anchor["block_hash"])
        if header["confirmations"] < 1:
            return None
        tx_hex = rpc.call("getrawtransaction", anchor["txid"], False, anchor["block_hash"])
        outputs = op_return_outputs(parse_tx(tx_hex))
    except RpcError:
        return None
    except (KeyError, TypeError, ValueError) as exc:
        raise NodeAnswer(f"bitcoind's answer has not the shape bitcoind's has ({exc!r})"
                         ) from None
    if [data for _vout, data in outputs] != [payload]:
        return None
    return {"txid": anchor["txid"], "block_hash": anchor["block_hash"],
            "block_height": header["height"], "confirmations": header["confirmations"]}
