"""The admins' `purge` (bus-cli purge; docs/protocol.md, "Purging a topic
prefix"): the stored messages of a topic prefix deleted, all or those before
an id or a time, like NATS `stream purge --subject` and Redis `XTRIM`.

It deletes a window of BUS_RETENTION_CHUNK_ROWS ids per transaction, as
retention does, and answers after the window that ends past PURGE_BUDGET_S
with `more` and where it got (`after_id`): the client asks again from there,
so that ingest never waits for more than one request's budget.

What it never deletes:
- a message of a sealed topic (BUS_AUDIT_PREFIXES, or a prefix a seal of the
  database names): a prefix that overlaps one is refused (`sealed_topic`).
  `audit verify` would report a sealed message gone above retention's mark
  as deleted by someone, and an unsealed one would never be sealed: such
  messages leave by retention only, once sealed;
- the newest stored message: SQLite gives the next message the largest id
  stored plus one, so deleting the newest would hand its id out again (a
  durable consumer at that position would skip the new message).
`$` topics are never stored: a `$` prefix is a bad request.
"""

from __future__ import annotations

import time
from typing import Any

from bus import protocol
from bus.config import BusConfig
from bus.control import CommandFailed, Request, check_int
from bus.logging import get_logger
from storage import audit as audit_rows
from storage import messages, retention

log = get_logger("writer")

# One purge request deletes windows of ids for about this long, then answers.
PURGE_BUDGET_S = 0.2


def check_prefix(args: dict[str, Any], max_bytes: int) -> str:
    prefix = args.get("prefix")
    if not (isinstance(prefix, str) and "\x00" not in prefix
            and len(prefix.encode("utf-8", "surrogatepass")) <= max_bytes):
        raise CommandFailed(protocol.BAD_REQUEST, f"'prefix' must be a string of at most "
                                                  f"{max_bytes} bytes, no NUL")
    if protocol.is_reserved(prefix):
        raise CommandFailed(protocol.BAD_REQUEST, f"topics starting with "
                                                  f"{protocol.RESERVED_PREFIX!r} are never "
                                                  "stored: nothing to purge")
    return prefix


def _optional_int(args: dict[str, Any], key: str, low: int) -> int | None:
    return None if args.get(key) is None else check_int(args, key, low, protocol.MAX_INT64)


def sealed_overlap(prefix: str, sealed: set[str]) -> list[str]:
    """The sealed prefixes some topic under `prefix` could fall under (a topic
    under both)."""
    return [s for s in sorted(sealed) if prefix.startswith(s) or s.startswith(prefix)]


def purge(store: Any, config: BusConfig, request: Request) -> dict[str, Any]:
    """{prefix, before_id?, before_ns?, after_id?} -> {prefix, deleted,
    after_id, upto, more, newest_kept}: see the module's doc."""
    args = request.args
    prefix = check_prefix(args, config.max_topic_bytes)
    before_id = _optional_int(args, "before_id", 1)
    before_ns = _optional_int(args, "before_ns", 0)
    after_id = _optional_int(args, "after_id", 0) or 0
    conn = store.conn
    sealed = sealed_overlap(prefix, set(config.sealed_prefixes)
                            | audit_rows.sealed_prefixes(conn))
    if sealed:
        inside = any(prefix.startswith(s) for s in sealed)
        raise CommandFailed(protocol.SEALED_TOPIC, (
            f"topics under {prefix!r} are sealed" if inside else
            f"topics under {prefix!r} include sealed ones") +
            f" ({', '.join(map(repr, sealed))}: BUS_AUDIT_PREFIXES or a seal): their messages "
            "leave by retention only (BUS_RETENTION_MAX_AGE_S, BUS_RETENTION_MAX_MESSAGES), "
            "once sealed" + ("" if inside else "; a prefix that names no sealed topic can be "
                             "purged"))
    first, last = messages.id_range(conn)
    if first is None:
        return {"prefix": prefix, "deleted": 0, "after_id": after_id, "upto": 0,
                "more": False, "newest_kept": None}
    upto = last - 1
    if before_id is not None:
        upto = min(upto, before_id - 1)
    if before_ns is not None:
        upto = min(upto, messages.id_before(conn, before_ns, first, last))
    position = max(after_id, first - 1)
    deleted = 0
    deadline = time.monotonic() + PURGE_BUDGET_S
    while position < upto:
        window = min(upto, position + config.retention_chunk_rows)
        with store.transaction() as held:
            deleted += retention.purge_window(held, prefix, position, window)
        position = window
        if time.monotonic() >= deadline:
            break
    more = position < upto
    log.info("purged", prefix=prefix, deleted=deleted, after_id=after_id, upto=upto,
             more=more, by_key=request.user)
    return {"prefix": prefix, "deleted": deleted, "after_id": max(position, after_id),
            "upto": upto, "more": more,
            "newest_kept": None if more else _newest_kept(conn, prefix, last, before_id,
                                                          before_ns)}


def _newest_kept(conn: Any, prefix: str, last: int, before_id: int | None,
                 before_ns: int | None) -> int | None:
    """The newest message's id if the purge would have deleted it but kept it."""
    newest = messages.topic_and_time(conn, last)
    if newest is None or not newest[0].startswith(prefix):
        return None
    if (before_id is not None and last >= before_id) or \
            (before_ns is not None and newest[1] >= before_ns):
        return None
    return last
