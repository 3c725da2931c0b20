"""The anchoring proof: what a document's owner keeps, and its offline check.

An anchor transaction has exactly one OP_RETURN output whose data is

    b"BUSA" || 0x01 || root        (4 + 1 + 32 = 37 bytes)

where root is the RFC 6962 Merkle root of the anchored document hashes
(proofs/merkle.py). A proof (JSON, `bus-cli anchor proof HASH`) carries the
document hash, its leaf index, the tree size, the audit path, the root, the
OP_RETURN data and the transaction id; docs/protocol.md describes every field.
`verify_path` checks it without any service: the path leads to the root and
the root is in the OP_RETURN data. That the transaction carries that data is
checked by anchor/proof.py, which can parse transactions.
"""

from __future__ import annotations

from typing import Any

from proofs.merkle import root_from_path

PROOF_FORMAT = "bus-anchor-proof/1"
ANCHOR_MAGIC = b"BUSA\x01"
HASHING = "RFC 6962: leaf = SHA-256(0x00 || document), node = SHA-256(0x01 || left || right)"


class ProofError(ValueError):
    """The proof does not hold; the message says which step failed."""


def op_return_payload(root: bytes) -> bytes:
    return ANCHOR_MAGIC + root


def make_proof(document: bytes, index: int, size: int, path: list[bytes],
               anchor: dict[str, Any], ref: str | None = None) -> dict[str, Any]:
    """A proof as JSON-ready values (hex strings). `anchor` is a stored anchor
    row (writer/anchors.py `describe`)."""
    return {"format": PROOF_FORMAT, "hashing": HASHING, "document": document.hex(), "ref": ref,
            "leaf_index": index, "tree_size": size, "path": [p.hex() for p in path],
            "root": anchor["root"].hex(), "op_return": op_return_payload(anchor["root"]).hex(),
            "anchor_id": anchor["anchor_id"], "txid": anchor["txid"],
            "replaced_txids": anchor["replaced_txids"], "status": anchor["status"],
            "block_hash": anchor["block_hash"], "block_height": anchor["block_height"]}


def _hex(proof: dict[str, Any], key: str, size: int | None = 32) -> bytes:
    try:
        value = bytes.fromhex(proof[key])
    except (KeyError, TypeError, ValueError):
        raise ProofError(f"'{key}' is missing or not hex") from None
    if size is not None and len(value) != size:
        raise ProofError(f"'{key}' must be {size} bytes, not {len(value)}")
    return value


def verify_path(proof: Any) -> dict[str, Any]:
    """Check a proof (decoded JSON of any shape) up to its OP_RETURN data;
    returns what was checked, raises ProofError on the first step that fails."""
    if not isinstance(proof, dict):
        raise ProofError(f"a proof is a JSON object, not {type(proof).__name__}")
    if proof.get("format") != PROOF_FORMAT:
        raise ProofError(f"not a {PROOF_FORMAT} proof (format {proof.get('format')!r})")
    document, root = _hex(proof, "document"), _hex(proof, "root")
    index, size = proof.get("leaf_index"), proof.get("tree_size")
    if type(index) is not int or type(size) is not int:
        raise ProofError("'leaf_index' and 'tree_size' must be integers")
    steps = proof.get("path")
    if not isinstance(steps, list) or not all(isinstance(p, str) for p in steps):
        raise ProofError("'path' must be a list of hex strings")
    try:
        path = [bytes.fromhex(p) for p in steps]
        computed = root_from_path(document, index, size, path)
    except ValueError as exc:
        raise ProofError(f"the audit path does not fit the tree: {exc}") from None
    if computed != root:
        raise ProofError(f"the audit path leads to {computed.hex()}, not to the root {root.hex()}")
    payload = _hex(proof, "op_return", None)
    if payload != op_return_payload(root):
        raise ProofError("the OP_RETURN data is not BUSA 0x01 followed by the root")
    return {"document": document.hex(), "root": root.hex(), "leaf_index": index,
            "tree_size": size, "op_return": payload, "transaction_checked": False}
