"""The tamper-evident message log: a stored message's digest, and Merkle roots
over many of them computed as they stream by.

A seal covers the messages of some topic prefixes in an id range; its root is
the RFC 6962 Merkle root (proofs/merkle.py) over their digests in id order,
and is anchored in Bitcoin like any document hash. A message's digest is
SHA-256 of a length-prefixed encoding of what the database holds of it, so
that any language can recompute it (docs/protocol.md, "Audit seals"):

    id              8 bytes, big-endian
    topic           4-byte length, UTF-8
    payload         4-byte length, bytes
    meta            4-byte length, msgpack as stored; length 0xFFFFFFFF if none
    producer_id     4-byte length, UTF-8; 0xFFFFFFFF if none
    producer_seq    8 bytes, big-endian; 0xFFFFFFFFFFFFFFFF if none

Changing any of them (a payload edited in place, a producer's sequence
renumbered, a row moved to another id) changes the digest.
"""

from __future__ import annotations

import hashlib
from typing import Any

from proofs.document import ProofError
from proofs.merkle import leaf_hash, node_hash, root_from_path

NONE_LENGTH = b"\xff" * 4
EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 6962's root of no leaves: an empty seal
NONE_SEQ = b"\xff" * 8


def _field(value: bytes | None) -> bytes:
    return NONE_LENGTH if value is None else len(value).to_bytes(4, "big") + value


def message_digest(message_id: int, topic: str, payload: bytes, meta: bytes | None,
                   producer_id: str | None, producer_seq: int | None) -> bytes:
    """The 32-byte digest a seal's Merkle tree has as this message's leaf."""
    return hashlib.sha256(
        message_id.to_bytes(8, "big") + _field(topic.encode()) + _field(payload)
        + _field(meta) + _field(None if producer_id is None else producer_id.encode())
        + (NONE_SEQ if producer_seq is None else producer_seq.to_bytes(8, "big"))).digest()


class RootBuilder:
    """The RFC 6962 root of digests added one at a time, in O(log n) memory:
    a stack of the roots of perfect subtrees (sizes strictly decreasing),
    folded from the right at the end, which is the tree MerkleTree builds."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.size = 0

    def add(self, document_hash: bytes) -> None:
        size, node = 1, leaf_hash(document_hash)
        stack = self._stack
        while stack and stack[-1][0] == size:
            node = node_hash(stack.pop()[1], node)
            size *= 2
        stack.append((size, node))
        self.size += 1

    @property
    def root(self) -> bytes:
        if not self._stack:
            raise ValueError("a Merkle tree needs at least one leaf")
        node = self._stack[-1][1]
        for _size, left in reversed(self._stack[:-1]):
            node = node_hash(left, node)
        return node


AUDIT_PROOF_FORMAT = "bus-audit-proof/1"


def verify_message(proof: Any) -> dict[str, Any]:
    """Check an audit proof's first half (decoded JSON of any shape): the
    message's digest, and its path to the seal's root, which must be the
    document of its anchor proof (`proof["anchor"]`, checked by
    proofs/document.py's verify_path and anchor/proof.py). Returns what was
    checked; ProofError on the first step that fails."""
    if not isinstance(proof, dict) or proof.get("format") != AUDIT_PROOF_FORMAT:
        raise ProofError(f"not a {AUDIT_PROOF_FORMAT} proof")
    message, seal, anchor = proof.get("message"), proof.get("seal"), proof.get("anchor")
    if not (isinstance(message, dict) and isinstance(seal, dict) and isinstance(anchor, dict)):
        raise ProofError("'message', 'seal' and 'anchor' must be objects")
    try:
        digest = message_digest(
            _int(message, "id"), _str(message, "topic"), bytes.fromhex(_str(message, "payload")),
            None if message.get("meta") is None else bytes.fromhex(_str(message, "meta")),
            None if message.get("producer_id") is None else _str(message, "producer_id"),
            None if message.get("producer_seq") is None else _int(message, "producer_seq"))
        index, size = _int(seal, "leaf_index"), _int(seal, "tree_size")
        steps = seal.get("path")
        if not isinstance(steps, list) or len(steps) > 32 or \
                not all(isinstance(p, str) and len(p) == 64 for p in steps):
            raise ProofError("the seal's 'path' must be a list of at most 32 hashes")
        root = bytes.fromhex(_str(seal, "root"))
        computed = root_from_path(digest, index, size, [bytes.fromhex(p) for p in steps])
    except (ValueError, OverflowError) as exc:
        raise ProofError(f"the message or its seal path is malformed: {exc}") from None
    if computed != root:
        raise ProofError(f"the message's digest and path lead to {computed.hex()}, not to the "
                         f"seal's root {root.hex()}: the message is not the one sealed")
    if str(anchor.get("document")).lower() != root.hex():
        raise ProofError("the anchor proof is not the seal root's")
    try:
        seal_id = _int(seal, "seal_id")
    except ValueError as exc:
        raise ProofError(str(exc)) from None
    return {"message_id": message["id"], "topic": message["topic"], "digest": digest.hex(),
            "seal_id": seal_id, "leaf_index": index, "tree_size": size,
            "seal_root": root.hex()}


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is not int or not 0 <= value < 2**63:
        raise ValueError(f"'{key}' must be an integer from 0 to 2^63 - 1")
    return value


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    return value
