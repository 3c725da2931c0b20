"""Audit seals, as the writer stores them for the anchor worker that builds
them (docs/protocol.md, "Audit seals"): `audit_begin` opens a seal after the
last sealed message, `audit_leaves` stores its leaves a chunk at a time,
`audit_finish` closes it with its root. The writer stores; it does not hash
(the worker computed the digests and the root, off the write path; `bus-cli
audit verify` recomputes both from the messages). Each command runs in one
transaction (writer/commands.py).
"""

from __future__ import annotations

from typing import Any

from bus.control import CommandFailed, check_int
from bus.protocol import BAD_REQUEST, NOT_FOUND
from proofs.audit import DIGEST_VERSIONS, EMPTY_ROOT, SEAL_VERSIONS, seal_document
from storage import audit as audit_rows
from storage import messages
from storage.audit import CHUNK_LEAVES

MAX_PREFIXES = 64


class AuditBook:
    """The `audit_*` commands over the writer's connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.counters = {"seals": 0, "leaves": 0}

    def last(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{} -> {last_id}: the last message id the seals cover (0: none)."""
        return {"last_id": audit_rows.last_sealed_id(self.conn)}

    def unanchored(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{} -> {seals: [[seal_id, document, size], ...]}: sealed, not yet in
        an anchor (a worker that stopped after sealing): at most 1000."""
        return {"seals": [list(s) for s in audit_rows.unanchored(self.conn, 1000)]}

    def begin(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{request_id, prefixes, seal_version?, digest_version?} -> {seal_id,
        first_id}: an open seal from the message after the last sealed one (an
        unfinished seal is dropped). Without the versions (a worker from
        before seal records): version 1 of both, the root anchored bare."""
        prefixes = args.get("prefixes")
        if not (isinstance(prefixes, list) and 0 < len(prefixes) <= MAX_PREFIXES and
                all(isinstance(p, str) and p and "\n" not in p and "\x00" not in p
                    and len(p) <= 256 for p in prefixes)):
            raise CommandFailed(BAD_REQUEST, f"'prefixes' must be 1-{MAX_PREFIXES} non-empty topic"
                                             " prefixes")
        seal_version = args.get("seal_version", 1)
        digest_version = args.get("digest_version", 1)
        if seal_version not in SEAL_VERSIONS or digest_version not in DIGEST_VERSIONS or \
                type(seal_version) is not int or type(digest_version) is not int:
            raise CommandFailed(BAD_REQUEST, f"'seal_version' must be one of {SEAL_VERSIONS} and "
                                             f"'digest_version' one of {DIGEST_VERSIONS}")
        first_id = audit_rows.last_sealed_id(self.conn) + 1
        return {"seal_id": audit_rows.begin(self.conn, prefixes, first_id, now_ns, seal_version,
                                            digest_version),
                "first_id": first_id}

    def _open_seal(self, args: dict[str, Any]) -> dict[str, Any]:
        seal = audit_rows.get(self.conn, check_int(args, "seal_id", 1, 2**62))
        if seal is None or seal["status"] != "open":
            raise CommandFailed(NOT_FOUND, f"no open seal {args.get('seal_id')}")
        return seal

    def leaves(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{seal_id, chunk, ids, digests}: leaves chunk*4096 on (at most 4096;
        ids 8 bytes each, digests 32). Storing a chunk again replaces it."""
        seal = self._open_seal(args)
        ids, digests = args.get("ids"), args.get("digests")
        if not (isinstance(ids, bytes) and isinstance(digests, bytes) and ids
                and len(ids) % 8 == 0 and len(ids) // 8 <= CHUNK_LEAVES
                and len(digests) == len(ids) // 8 * 32):
            raise CommandFailed(BAD_REQUEST, f"'ids' (8 bytes each) and 'digests' (32 bytes each)"
                                             f" must hold the same 1-{CHUNK_LEAVES} leaves")
        # Chunks in order (one stored again replaces it), each full but the
        # last, ids increasing from the seal's first id on: the seal a verifier
        # recomputes is the one the worker built.
        stored = audit_rows.chunk_bounds(self.conn, seal["seal_id"])
        chunk = check_int(args, "chunk", 0, len(stored))
        numbers = [int.from_bytes(ids[i:i + 8], "big") for i in range(0, len(ids), 8)]
        after = stored[chunk - 1][1] if chunk else seal["first_id"] - 1
        if any(b <= a for a, b in zip([after, *numbers], numbers)) or \
                (chunk < len(stored) - 1 and numbers[-1] >= stored[chunk + 1][0]) or \
                (chunk and stored[chunk - 1][2] != CHUNK_LEAVES):
            raise CommandFailed(BAD_REQUEST, "a chunk's ids must increase from the seal's first "
                                             "id on, after the chunk before (full) and before the "
                                             "next")
        audit_rows.put_leaves(self.conn, seal["seal_id"], chunk, ids, digests)
        self.counters["leaves"] += len(ids) // 8
        return {"seal_id": seal["seal_id"], "chunk": chunk}

    def finish(self, args: dict[str, Any], now_ns: int) -> dict[str, Any]:
        """{request_id, seal_id, last_id, size, root} -> {seal_id, document}:
        sealed, if its stored leaves are `size` (none: nothing matched, no
        seal kept). `document` is what is anchored for it: the hash of its
        seal record (version 2, one SHA-256 of its fields as stored), or its
        root (version 1)."""
        seal = self._open_seal(args)
        # Not past the newest stored message: retention stops at the last
        # sealed id, and must never pass a message not yet stored (nor sealed).
        last_id = check_int(args, "last_id", seal["first_id"] - 1,
                            max(seal["first_id"] - 1, messages.last_id(self.conn) or 0))
        size = check_int(args, "size", 0, 2**32 - 1)
        bounds = audit_rows.chunk_bounds(self.conn, seal["seal_id"])
        stored = sum(leaves for _first, _last, leaves in bounds)
        if stored != size:
            raise CommandFailed(BAD_REQUEST, f"seal {seal['seal_id']} has {stored} leaves stored,"
                                             f" not {size}")
        root = args.get("root")
        if not (isinstance(root, bytes) and len(root) == 32) or (not size and root != EMPTY_ROOT):
            raise CommandFailed(BAD_REQUEST, "'root' must be 32 bytes (an empty seal's: SHA-256 of"
                                             " nothing)")
        if bounds and bounds[-1][1] > last_id:
            raise CommandFailed(BAD_REQUEST, f"a leaf has id {bounds[-1][1]}, after last_id "
                                             f"{last_id}")
        document = seal_document(seal["seal_version"], seal["seal_id"], seal["first_id"],
                                 last_id, size, seal["digest_version"], root, seal["prefixes"])
        audit_rows.finish(self.conn, seal["seal_id"], last_id, size, root, document, now_ns)
        self.counters["seals"] += 1
        return {"seal_id": seal["seal_id"], "document": document}

    def snapshot(self) -> dict[str, Any]:
        return dict(self.counters)
