"""Durable consumer positions: the last message id each named consumer acknowledged.

The writer is the only process that writes them (the seed's "consumptions"):
a consumer reports its position over the control endpoint, the new position
joins the next batch and is committed with it. All positions are kept in
memory (at most BUS_MAX_CONSUMERS, each a few dozen bytes) so that `get` answers
with the newest position even before its commit.

With CURVE, a consumer name belongs to the key that acknowledged it first, as a
producer id does: no other key can move it (`forbidden`); an admin key can
delete it, which frees the name. One key owns at most BUS_MAX_CONSUMERS_PER_KEY
names (`quota_exceeded`), so that one key cannot take every one of the
BUS_MAX_CONSUMERS places; with CURVE off there are no keys to tell apart, and
BUS_MAX_CONSUMERS alone applies.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from bus.control import CommandFailed
from bus.protocol import BAD_REQUEST, FORBIDDEN, QUOTA_EXCEEDED, TOO_MANY_CONSUMERS
from storage.sessions import ConsumptionRow

MAX_NAME_CHARS = 128


def check_name(name: Any) -> str:
    if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name.isprintable()):
        raise CommandFailed(BAD_REQUEST,
                            f"'consumer' must be a printable string of 1-{MAX_NAME_CHARS} chars")
    return name


class ConsumerPositions:
    def __init__(self, stored: dict[str, tuple[int, int, str | None]],
                 max_consumers: int, max_per_key: int = 0) -> None:
        self.positions = dict(stored)  # name -> (last_id, updated_ns, owner)
        self.max_consumers = max_consumers
        self.max_per_key = max_per_key  # 0: no quota per key
        self.owned = Counter(owner for _, _, owner in self.positions.values() if owner)

    def ack(self, name: Any, last_id: Any, now_ns: int, newest_id: int,
            user: str | None = None) -> tuple[int, ConsumptionRow | None]:
        """Move `name` forward to `last_id`; never back (a late, repeated ack
        must not undo a newer one), nor past `newest_id`, the newest stored
        message (a position beyond it would silently skip what comes next).
        `user`: the request's key (CURVE), which must own the name.
        Returns the position and the row to store, None if nothing changed."""
        name = check_name(name)
        current = self.positions.get(name)
        # A name first acknowledged while CURVE was off is its first key's now.
        owner = (current[2] if current is not None else None) or user
        if user is not None and owner != user:
            raise CommandFailed(FORBIDDEN, f"consumer {name!r} belongs to another key: "
                                           "acknowledge under your own consumer name")
        if type(last_id) is not int or last_id < 0:
            raise CommandFailed(BAD_REQUEST, "'last_id' must be a non-negative integer")
        if last_id > newest_id:
            raise CommandFailed(BAD_REQUEST, f"'last_id' {last_id} is beyond the newest "
                                             f"stored message ({newest_id})")
        if current is None and len(self.positions) >= self.max_consumers:
            raise CommandFailed(TOO_MANY_CONSUMERS,
                                f"{self.max_consumers} consumers exist (BUS_MAX_CONSUMERS); "
                                "delete unused ones")
        claims = current is not None and current[2] is None and user is not None
        if (current is None or claims) and user is not None:
            self._check_quota(user)
        if current is not None and last_id <= current[0] and not claims:
            return current[0], None
        position = max(last_id, current[0]) if current is not None else last_id
        self.positions[name] = (position, now_ns, owner)
        if owner is not None and (current is None or claims):
            self.owned[owner] += 1
        return position, (name, position, now_ns, owner)

    def _check_quota(self, user: str) -> None:
        """May `user` own one more consumer name? (The writer names the quota
        and the key in its reply, and counts the refusal: writer/quotas.py.)"""
        if self.max_per_key and self.owned[user] >= self.max_per_key:
            raise CommandFailed(QUOTA_EXCEEDED,
                                f"owns {self.owned[user]} durable consumers "
                                f"(BUS_MAX_CONSUMERS_PER_KEY={self.max_per_key}); an admin can "
                                "delete unused ones (bus-cli consumers rm)")

    def get(self, name: Any) -> dict[str, Any]:
        name = check_name(name)
        last_id, updated_ns, _owner = self.positions.get(name, (None, None, None))
        return {"consumer": name, "last_id": last_id, "updated_ns": updated_ns}

    def delete(self, name: Any, now_ns: int) -> ConsumptionRow | None:
        name = check_name(name)
        removed = self.positions.pop(name, None)
        if removed is None:
            return None
        owner = removed[2]
        if owner is not None:
            self.owned[owner] -= 1
            if not self.owned[owner]:
                del self.owned[owner]
        return (name, None, now_ns, None)

    def snapshot(self, last_message_id: int | None, shown: int = 100) -> dict[str, Any]:
        """Each consumer's position and lag (messages stored after it), the most
        lagging first, at most `shown` of them."""
        head = last_message_id or 0
        ranked = sorted(self.positions.items(), key=lambda item: item[1][0])[:shown]
        return {"count": len(self.positions),
                "positions": {name: {"last_id": last_id, "lag": max(0, head - last_id),
                                     "updated_ns": updated_ns}
                              for name, (last_id, updated_ns, _owner) in ranked}}
