"""The anchoring proof: what a document's owner keeps, and its offline check.

An anchor transaction has exactly one OP_RETURN output whose data is

    b"BUSA" || 0x02 || root || tree size   (4 + 1 + 32 + 4 = 41 bytes, size big-endian)

where root is the RFC 6962 Merkle root of the anchored document hashes
(proofs/merkle.py). Committing the size binds a proof's `tree_size` (and with
it `leaf_index`: for one size, the path's shape is the index's) to the chain;
anchors made before it carry version 0x01 (`BUSA 0x01 root`, 37 bytes), whose
proofs still verify, saying that the size is only the proof's word. A proof
(JSON, `bus-cli anchor proof HASH`) carries the document hash, its leaf index,
the tree size, the audit path, the root, the OP_RETURN data and the
transaction id; docs/protocol.md describes every field. `verify_path` checks it
without any service: the path leads to the root, and the OP_RETURN data
commits to that root (and size). That a transaction carries that data, and
that the transaction is in a block, is checked by anchor/proof.py.
"""

from __future__ import annotations

from typing import Any

from proofs.merkle import root_from_path

PROOF_FORMAT = "bus-anchor-proof/1"
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")  # no spaces, which bytes.fromhex lets by
ANCHOR_MAGIC = b"BUSA"
PAYLOAD_ROOT_ONLY = 0x01       # root: anchors made before the tree size was committed
PAYLOAD_ROOT_AND_SIZE = 0x02   # root and tree size (4 bytes, big-endian)
MAX_TREE_SIZE = 2**32 - 1
MAX_PATH_LENGTH = 32           # a tree of 2^32 - 1 leaves is 32 levels deep
HASHING = "RFC 6962: leaf = SHA-256(0x00 || document), node = SHA-256(0x01 || left || right)"


class ProofError(ValueError):
    """The proof does not hold; the message says which step failed."""


def op_return_payload(root: bytes, size: int) -> bytes:
    """The OP_RETURN data of a new anchor: its root and its tree's size."""
    return ANCHOR_MAGIC + bytes([PAYLOAD_ROOT_AND_SIZE]) + root + size.to_bytes(4, "big")


def stored_payload(anchor: dict[str, Any]) -> bytes:
    """The OP_RETURN data a stored anchor's transactions carry: version 2,
    unless its signed transaction holds the version 1 data (an anchor made
    before the size was committed; its fee bumps keep that data)."""
    current = op_return_payload(anchor["root"], anchor["size"])
    old = ANCHOR_MAGIC + bytes([PAYLOAD_ROOT_ONLY]) + anchor["root"]
    raw = anchor.get("raw_tx") or b""
    return old if current not in raw and old in raw else current


def parse_payload(payload: bytes) -> tuple[bytes, int | None]:
    """(root, committed tree size or None for version 1) of OP_RETURN data."""
    if payload[:4] != ANCHOR_MAGIC or len(payload) < 5:
        raise ProofError("the OP_RETURN data does not start with BUSA and a version")
    version, rest = payload[4], payload[5:]
    if version == PAYLOAD_ROOT_ONLY and len(rest) == 32:
        return rest, None
    if version == PAYLOAD_ROOT_AND_SIZE and len(rest) == 36:
        return rest[:32], int.from_bytes(rest[32:], "big")
    raise ProofError(f"the OP_RETURN data is not BUSA 0x01 root or BUSA 0x02 root size "
                     f"(version {version}, {len(payload)} bytes)")


def make_proof(document: bytes, index: int, size: int, path: list[bytes],
               anchor: dict[str, Any], ref: str | None = None) -> dict[str, Any]:
    """A proof as JSON-ready values (hex strings). `anchor` is a stored anchor
    row (writer/anchors.py `describe`)."""
    return {"format": PROOF_FORMAT, "hashing": HASHING, "document": document.hex(), "ref": ref,
            "leaf_index": index, "tree_size": size, "path": [p.hex() for p in path],
            "root": anchor["root"].hex(), "op_return": stored_payload(anchor).hex(),
            "anchor_id": anchor["anchor_id"], "txid": anchor["txid"],
            "replaced_txids": anchor["replaced_txids"], "status": anchor["status"],
            "block_hash": anchor["block_hash"], "block_height": anchor["block_height"]}


def _hex(proof: dict[str, Any], key: str, size: int | None = 32) -> bytes:
    value = proof.get(key)
    if not isinstance(value, str) or len(value) % 2 or not HEX_DIGITS.issuperset(value):
        raise ProofError(f"'{key}' is missing or not hex")
    value = bytes.fromhex(value)
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
    if not 1 <= size <= MAX_TREE_SIZE or not 0 <= index < size:
        raise ProofError(f"leaf {index} of a tree of {size}: the size must be 1 to "
                         f"{MAX_TREE_SIZE} and the leaf below it")
    steps = proof.get("path")
    if not isinstance(steps, list) or len(steps) > MAX_PATH_LENGTH or \
            not all(isinstance(p, str) and len(p) == 64 for p in steps):
        raise ProofError(f"'path' must be a list of at most {MAX_PATH_LENGTH} hashes of 64 hex "
                         "characters")
    try:
        path = [bytes.fromhex(p) for p in steps]
        computed = root_from_path(document, index, size, path)
    except ValueError as exc:
        raise ProofError(f"the audit path does not fit the tree: {exc}") from None
    if computed != root:
        raise ProofError(f"the audit path leads to {computed.hex()}, not to the root {root.hex()}")
    payload = _hex(proof, "op_return", None)
    committed_root, committed_size = parse_payload(payload)
    if committed_root != root:
        raise ProofError("the OP_RETURN data commits to another root")
    if committed_size is not None and committed_size != size:
        raise ProofError(f"the OP_RETURN data commits to a tree of {committed_size} leaves, the "
                         f"proof says {size}")
    return {"document": document.hex(), "root": root.hex(), "leaf_index": index,
            "tree_size": size, "size_committed": committed_size is not None,
            "op_return": payload, "transaction_checked": False, "block_checked": False}
