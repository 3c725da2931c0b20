"""A proof's transaction check: what proofs/document.py cannot do without a
transaction parser. The transaction must have the proof's txid and exactly
one OP_RETURN output, carrying the proof's data."""

from __future__ import annotations

from typing import Any

from anchor.bitcoind import op_return_outputs, parse_tx
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
