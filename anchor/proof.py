"""A proof's checks beyond proofs/document.py's: its transaction (which needs
a transaction parser) and, with a node, that the transaction is in a block of
the best chain. The transaction must have the proof's txid and exactly one
OP_RETURN output, carrying the proof's data."""

from __future__ import annotations

from typing import Any

from anchor.bitcoind import (RPC_INVALID_ADDRESS_OR_KEY, BitcoinRpc, RpcError, RpcUnavailable,
                             op_return_outputs, parse_tx)
from proofs.document import ProofError, verify_path


def verify_proof(proof: Any, tx_hex: str | None = None) -> dict[str, Any]:
    """verify_path, and with `tx_hex` the transaction too; returns what was
    checked, raises ProofError on the first step that fails."""
    checked = verify_path(proof)
    payload = checked.pop("op_return")
    if tx_hex is not None:
        try:
            tx = parse_tx(tx_hex.strip())
        except ValueError as exc:
            raise ProofError(str(exc)) from None
        txid = tx.txid().hex()
        if txid != proof.get("txid"):
            raise ProofError(f"the transaction is {txid}, the proof names {proof.get('txid')}")
        outputs = op_return_outputs(tx)
        if len(outputs) != 1:
            raise ProofError(f"the transaction has {len(outputs)} OP_RETURN outputs, not one")
        if outputs[0][1] != payload:
            raise ProofError("the transaction's OP_RETURN data differs from the proof's")
        checked.update(transaction_checked=True, txid=txid, op_return_vout=outputs[0][0])
    return checked


def _is_hash(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


class NodeAnswer(RpcUnavailable):
    """The node's answer cannot be read (not a Bitcoin Core, or a broken one):
    nothing was checked, which is not the proof's fault."""


def find_in_chain(proof: dict[str, Any], rpc: BitcoinRpc) -> dict[str, Any]:
    """Ask bitcoind whether the proof's transaction is in the proof's block,
    and that block in its best chain: `getblockheader`, then `gettxoutproof`
    and `verifytxoutproof` (bitcoind checks the transaction's Merkle branch
    against the header it holds; no -txindex needed), then the transaction
    itself (`getrawtransaction` with the block). Returns {block_hash,
    block_height, confirmations, tx_hex}; ProofError if any step fails.
    RpcUnavailable (bitcoind did not answer) is the caller's."""
    txid, block_hash = proof.get("txid"), proof.get("block_hash")
    if not isinstance(txid, str) or not isinstance(block_hash, str) or \
            not _is_hash(txid) or not _is_hash(block_hash):
        raise ProofError("the proof names no block (its anchor was not confirmed when it was "
                         "made): ask for the proof again once it is")
    try:
        header = rpc.call("getblockheader", block_hash)
        if header["confirmations"] < 1:
            raise ProofError(f"block {block_hash} is not in bitcoind's best chain (a reorg): "
                             "ask for the proof again")
        if proof.get("block_height") != header["height"]:
            raise ProofError(f"block {block_hash} is at height {header['height']}, the proof "
                             f"says {proof.get('block_height')}")
        merkle_block = rpc.call("gettxoutproof", [txid], block_hash)
        if txid not in rpc.call("verifytxoutproof", merkle_block):
            raise ProofError(f"bitcoind's Merkle proof for block {block_hash} does not commit "
                             f"to {txid}")
        tx_hex = rpc.call("getrawtransaction", txid, False, block_hash)
    except RpcError as exc:
        if exc.code == RPC_INVALID_ADDRESS_OR_KEY:
            raise ProofError(f"bitcoind: {exc.message} (block {block_hash}, transaction "
                             f"{txid})") from None
        raise ProofError(f"bitcoind refused: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:  # an answer of the wrong shape
        raise NodeAnswer(f"bitcoind's answer has not the shape bitcoind's has ({exc!r})"
                         ) from None
    if not isinstance(tx_hex, str):
        raise NodeAnswer("bitcoind's getrawtransaction answer is not a transaction")
    return {"block_hash": block_hash, "block_height": header["height"],
            "confirmations": header["confirmations"], "tx_hex": tx_hex}
