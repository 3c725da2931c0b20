"""The tamper-evident message log: a stored message's digest, Merkle roots
over many of them computed as they stream by, and the seal record that binds
a seal's fields to what is anchored.

A seal covers the messages of some topic prefixes in an id range; its root is
the RFC 6962 Merkle root (proofs/merkle.py) over their digests in id order. A
message's digest is SHA-256 of a length-prefixed encoding of every column the
database holds of it, so that any language can recompute it (docs/protocol.md,
"Audit seals"); digest version 2:

    id              8 bytes, big-endian
    topic           4-byte length, UTF-8
    payload         4-byte length, bytes
    meta            4-byte length, msgpack as stored; length 0xFFFFFFFF if none
    producer_id     4-byte length, UTF-8; 0xFFFFFFFF if none
    producer_seq    8 bytes, big-endian; 0xFFFFFFFFFFFFFFFF if none
    publish_ns      1 byte 0x00 if none, else 0x01 and 8 bytes (two's complement)
    committed_ns    8 bytes (two's complement)

Changing any of them (a payload edited in place, a producer's sequence
renumbered, a row moved to another id, its commit time rewritten) changes the
digest. Digest version 1 (seals made before) stops after producer_seq.

What is anchored for a seal (version 2) is not its bare root but the SHA-256
of its seal record, which binds everything a message's proof says of the
seal: its id, id range, size, digest version, root and topic prefixes. With
the root alone (version 1, seals made before), a proof's seal id and tree
size were its own word: any size whose tree has the same path shape (4,097 to
8,192 for a leaf below 4,096) led to the same root.
"""

from __future__ import annotations

import hashlib
from typing import Any

from proofs.document import ProofError
from proofs.merkle import leaf_hash, node_hash, root_from_path

NONE_LENGTH = b"\xff" * 4
EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 6962's root of no leaves: an empty seal
NONE_SEQ = b"\xff" * 8
DIGEST_VERSIONS = (1, 2)       # 1: up to producer_seq (seals made before); 2: every column


def _field(value: bytes | None) -> bytes:
    return NONE_LENGTH if value is None else len(value).to_bytes(4, "big") + value


def message_digest(message_id: int, topic: str, payload: bytes, meta: bytes | None,
                   producer_id: str | None, producer_seq: int | None,
                   publish_ns: int | None = None, committed_ns: int | None = None,
                   version: int = 1) -> bytes:
    """The 32-byte digest a seal's Merkle tree has as this message's leaf:
    version 1 over the columns up to producer_seq, version 2 over every one
    (publish_ns and committed_ns too). Arguments in the messages table's
    column order, so that a row of them can be passed as it is read."""
    encoded = (message_id.to_bytes(8, "big") + _field(topic.encode()) + _field(payload)
               + _field(meta) + _field(None if producer_id is None else producer_id.encode())
               + (NONE_SEQ if producer_seq is None else producer_seq.to_bytes(8, "big")))
    if version == 2:
        if committed_ns is None:
            raise ValueError("digest version 2 covers committed_ns, which every message has")
        encoded += (b"\x00" if publish_ns is None else
                    b"\x01" + publish_ns.to_bytes(8, "big", signed=True))
        encoded += committed_ns.to_bytes(8, "big", signed=True)
    elif version != 1:
        raise ValueError(f"digest version {version} is not one of {DIGEST_VERSIONS}")
    return hashlib.sha256(encoded).digest()


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


SEAL_MAGIC = b"BUS-SEAL"
SEAL_BARE_ROOT = 1             # seal version 1: its root anchored bare (seals made before records)
SEAL_RECORD = 2                # seal version 2: its seal record's hash anchored
SEAL_VERSIONS = (SEAL_BARE_ROOT, SEAL_RECORD)
MAX_SEAL_PREFIXES = 64

AUDIT_PROOF_FORMAT = "bus-audit-proof/1"     # a version 1 seal: the seal's fields unbound
AUDIT_PROOF_FORMAT_RECORD = "bus-audit-proof/2"  # a version 2 seal: its record bound
AUDIT_PROOF_FORMATS = (AUDIT_PROOF_FORMAT, AUDIT_PROOF_FORMAT_RECORD)


def seal_record(seal_id: int, first_id: int, last_id: int, size: int, digest_version: int,
                root: bytes, prefixes: list[str]) -> bytes:
    """The bytes of a version 2 seal's record (docs/protocol.md, "Audit seals",
    the seal record): every integer unsigned big-endian, every string
    length-prefixed, so that any language encodes it the same way."""
    if len(root) != 32 or not 0 < len(prefixes) <= MAX_SEAL_PREFIXES:
        raise ValueError("a seal record has a 32-byte root and 1 to 64 prefixes")
    return (SEAL_MAGIC + bytes([SEAL_RECORD]) + seal_id.to_bytes(8, "big")
            + first_id.to_bytes(8, "big") + last_id.to_bytes(8, "big") + size.to_bytes(8, "big")
            + bytes([digest_version]) + root + len(prefixes).to_bytes(4, "big")
            + b"".join(_field(p.encode()) for p in prefixes))


def seal_document(seal_version: int, seal_id: int, first_id: int, last_id: int, size: int,
                  digest_version: int, root: bytes, prefixes: list[str]) -> bytes:
    """What is anchored for a seal: its record's SHA-256 (version 2), or its
    root (version 1)."""
    if seal_version == SEAL_BARE_ROOT:
        return root
    if seal_version != SEAL_RECORD:
        raise ValueError(f"seal version {seal_version} is not one of {SEAL_VERSIONS}")
    return hashlib.sha256(seal_record(seal_id, first_id, last_id, size, digest_version, root,
                                      prefixes)).digest()


def verify_message(proof: Any) -> dict[str, Any]:
    """Check an audit proof's first half (decoded JSON of any shape): the
    message's digest, its path to the seal's root, and what is anchored for
    the seal: for a version 2 seal (bus-audit-proof/2) the hash of the seal
    record built from the proof's seal fields, for a version 1 seal
    (bus-audit-proof/1) the root alone. That must be the document of its
    anchor proof (`proof["anchor"]`, checked by proofs/document.py's
    verify_path and anchor/proof.py). Returns what was checked, with `bound`
    True when the seal's id, range and size are (False: the proof's word);
    ProofError on the first step that fails."""
    if not isinstance(proof, dict) or proof.get("format") not in AUDIT_PROOF_FORMATS:
        raise ProofError(f"not a {' or '.join(AUDIT_PROOF_FORMATS)} proof")
    bound = proof["format"] == AUDIT_PROOF_FORMAT_RECORD
    message, seal, anchor = proof.get("message"), proof.get("seal"), proof.get("anchor")
    if not (isinstance(message, dict) and isinstance(seal, dict) and isinstance(anchor, dict)):
        raise ProofError("'message', 'seal' and 'anchor' must be objects")
    try:
        digest_version = _int(seal, "digest_version") if bound else 1
        if digest_version not in DIGEST_VERSIONS:
            raise ProofError(f"digest version {digest_version} is not one of "
                             f"{DIGEST_VERSIONS}")
        digest = message_digest(
            _int(message, "id"), _str(message, "topic"), bytes.fromhex(_str(message, "payload")),
            None if message.get("meta") is None else bytes.fromhex(_str(message, "meta")),
            None if message.get("producer_id") is None else _str(message, "producer_id"),
            None if message.get("producer_seq") is None else _int(message, "producer_seq"),
            *((None if message.get("publish_ns") is None else _signed(message, "publish_ns"),
               _signed(message, "committed_ns")) if digest_version == 2 else ()),
            version=digest_version)
        index, size = _int(seal, "leaf_index"), _int(seal, "tree_size")
        steps = seal.get("path")
        if not isinstance(steps, list) or len(steps) > 32 or \
                not all(isinstance(p, str) and len(p) == 64 for p in steps):
            raise ProofError("the seal's 'path' must be a list of at most 32 hashes")
        root = bytes.fromhex(_str(seal, "root"))
        computed = root_from_path(digest, index, size, [bytes.fromhex(p) for p in steps])
        seal_id = _int(seal, "seal_id")
        checked = {"message_id": message["id"], "topic": message["topic"],
                   "digest": digest.hex(), "seal_id": seal_id, "leaf_index": index,
                   "tree_size": size, "seal_root": root.hex(), "bound": bound,
                   "digest_version": digest_version}
        if bound:
            checked.update(_record_fields(seal, message["id"], message["topic"], size))
            document = seal_document(SEAL_RECORD, seal_id, checked["first_id"],
                                     checked["last_id"], size, digest_version, root,
                                     checked["prefixes"])
        else:
            document = root
    except (ValueError, OverflowError, UnicodeEncodeError) as exc:
        if isinstance(exc, ProofError):
            raise
        raise ProofError(f"the message or its seal is malformed: {exc}") from None
    if computed != root:
        raise ProofError(f"the message's digest and path lead to {computed.hex()}, not to the "
                         f"seal's root {root.hex()}: the message is not the one sealed")
    if str(anchor.get("document")).lower() != document.hex():
        raise ProofError("the anchor proof's document is not the seal record's hash (the seal's "
                         "id, id range, size, digest version, prefixes or root differ from what "
                         "was anchored)" if bound else "the anchor proof is not the seal root's")
    return checked | {"document": document.hex()}


def _record_fields(seal: dict[str, Any], message_id: int, topic: str, size: int
                   ) -> dict[str, Any]:
    """A version 2 proof's seal fields, each checked against the message."""
    first_id, last_id = _int(seal, "first_id"), _int(seal, "last_id")
    prefixes = seal.get("prefixes")
    if not (isinstance(prefixes, list) and 0 < len(prefixes) <= MAX_SEAL_PREFIXES
            and all(isinstance(p, str) and p for p in prefixes)):
        raise ProofError(f"the seal's 'prefixes' must be 1 to {MAX_SEAL_PREFIXES} topic "
                         "prefixes")
    if not first_id <= message_id <= last_id:
        raise ProofError(f"message {message_id} is outside the seal's ids {first_id}.."
                         f"{last_id}")
    if not any(topic.startswith(p) for p in prefixes):
        raise ProofError(f"topic {topic!r} has none of the seal's prefixes {prefixes}")
    if size > last_id - first_id + 1:
        raise ProofError(f"a seal of ids {first_id}..{last_id} cannot hold {size} messages")
    return {"first_id": first_id, "last_id": last_id, "prefixes": prefixes}


def _int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is not int or not 0 <= value < 2**63:
        raise ValueError(f"'{key}' must be an integer from 0 to 2^63 - 1")
    return value


def _signed(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is not int or not -2**63 <= value < 2**63:
        raise ValueError(f"'{key}' must be an integer from -2^63 to 2^63 - 1")
    return value


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    return value
