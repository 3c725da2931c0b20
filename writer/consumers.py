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
from collections.abc import Callable
from typing import Any

from bus.control import CommandFailed
from bus.protocol import BAD_REQUEST, FORBIDDEN, QUOTA_EXCEEDED, TOO_MANY_CONSUMERS
from storage.sessions import ConsumptionRow, StoredConsumer

MAX_NAME_CHARS = 128
# The topic prefixes a consumer may name (as a history read: reader/service.py).
MAX_PREFIXES = 64
# The most bytes (UTF-8) of prefixes kept for one consumer (BUS_MAX_CONSUMERS of
# them are in memory): a consumer naming more has its lag counted on every
# topic, as one that names none. Bytes, not characters: 4,096 characters of
# four bytes each were 21 KB a consumer in the writer (UCS-4 strings).
MAX_PREFIX_BYTES_KEPT = 4096
# A consumer's lag is counted among at most this many ids after its position
# (exact if the newest is among them, else a lower bound: `lag_exact`), and
# one `stats` counts among at most LAG_BUDGET_IDS ids for all consumers: the
# writer's loop answers stats, and with HTTP on makes one every second. On
# SQLite 10,000 ids take about 1 ms (1,000,000: 100 ms) with no index on topic,
# for one prefix: each id is compared with every prefix, so both bounds count
# ids times prefixes (64 prefixes cost 40 times one: 100,000 ids, 0.2-0.4 s).
LAG_COUNT_IDS = 10_000
LAG_BUDGET_IDS = 100_000

# count(after_id, upto, prefixes) -> the messages after_id < id <= upto under one
# of prefixes (every topic if None or empty); None if the database cannot say now.
LagCounter = Callable[[int, int, "tuple[str, ...] | None"], "int | None"]


def check_prefixes(prefixes: Any, max_topic_bytes: int) -> tuple[str, ...] | None:
    """consumer_ack's `prefixes` (None if not given): 1-MAX_PREFIXES strings,
    no NUL, as a history read takes them; () if one is "" (every topic). One
    longer than BUS_MAX_TOPIC_BYTES matches no stored topic: it is kept cut to
    one character more, which matches none either; more than
    MAX_PREFIX_BYTES_KEPT in all are not kept (None), so that what the writer
    holds for 10,000 consumers stays bounded."""
    if prefixes is None:
        return None
    if not (isinstance(prefixes, list) and 0 < len(prefixes) <= MAX_PREFIXES
            and all(isinstance(p, str) and "\x00" not in p for p in prefixes)):
        raise CommandFailed(BAD_REQUEST, f"'prefixes' must be a list of 1-{MAX_PREFIXES} "
                                         "strings, no NUL")
    if "" in prefixes:
        return ()
    kept = tuple(dict.fromkeys(p[:max_topic_bytes + 1] for p in prefixes))
    return kept if sum(len(p.encode()) for p in kept) <= MAX_PREFIX_BYTES_KEPT else None


def check_name(name: Any) -> str:
    if not (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name.isprintable()):
        raise CommandFailed(BAD_REQUEST,
                            f"'consumer' must be a printable string of 1-{MAX_NAME_CHARS} chars")
    return name


class ConsumerPositions:
    def __init__(self, stored: dict[str, StoredConsumer],
                 max_consumers: int, max_per_key: int = 0, max_topic_bytes: int = 256) -> None:
        self.positions = dict(stored)  # name -> (last_id, updated_ns, owner, prefixes)
        self.max_consumers = max_consumers
        self.max_per_key = max_per_key  # 0: no quota per key
        self.max_topic_bytes = max_topic_bytes
        self.owned = Counter(owner for _, _, owner, _ in self.positions.values() if owner)

    def ack(self, name: Any, last_id: Any, now_ns: int, newest_id: int,
            user: str | None = None, prefixes: Any = None) -> tuple[int, ConsumptionRow | None]:
        """Move `name` forward to `last_id`; never back (a late, repeated ack
        must not undo a newer one), nor past `newest_id`, the newest stored
        message (a position beyond it would silently skip what comes next).
        `user`: the request's key (CURVE), which must own the name.
        `prefixes`: the topic prefixes it reads, what its lag is counted on
        (None: as before; a consumer that never said has its lag counted on
        every topic). Returns the position and the row to store, None if
        nothing changed."""
        name = check_name(name)
        said = check_prefixes(prefixes, self.max_topic_bytes)
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
        kept = current[3] if current is not None else None
        reads = kept if said is None else said
        if current is not None and last_id <= current[0] and not claims and reads == kept:
            return current[0], None
        position = max(last_id, current[0]) if current is not None else last_id
        self.positions[name] = (position, now_ns, owner, reads)
        if owner is not None and (current is None or claims):
            self.owned[owner] += 1
        return position, (name, position, now_ns, owner, reads)

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
        last_id, updated_ns, _owner, _prefixes = self.positions.get(name,
                                                                   (None, None, None, None))
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
        return (name, None, now_ns, None, None)

    def snapshot(self, last_message_id: int | None, count: LagCounter,
                 shown: int = 100) -> dict[str, Any]:
        """Each consumer's position and lag, the most lagging first, at most
        `shown` of them. `lag`: the messages of its prefixes stored after its
        position (`count`), among the LAG_COUNT_IDS ids after it (exact if
        `lag_exact`, else at least that many; None if the database could not
        say); `behind`: the ids stored after it, every topic's."""
        head = last_message_id or 0
        ranked = sorted(self.positions.items(), key=lambda item: item[1][0])[:shown]
        lags = self._lags(head, ranked, count)
        return {"count": len(self.positions),
                "positions": {name: {"last_id": last_id, **lags[name],
                                     "behind": max(0, head - last_id),
                                     "prefixes": None if prefixes is None else list(prefixes),
                                     "updated_ns": updated_ns}
                              for name, (last_id, updated_ns, _owner, prefixes) in ranked}}

    @staticmethod
    def _lags(head: int, ranked: list[tuple[str, StoredConsumer]],
              count: LagCounter) -> dict[str, dict[str, Any]]:
        """{name: {lag, lag_exact}}: the nearest to the head counted first,
        each on at most LAG_COUNT_IDS ids, all on at most LAG_BUDGET_IDS (ids
        times the consumer's prefixes: LAG_COUNT_IDS / 64 ids for 64);
        consumers at the same position reading the same prefixes counted once."""
        budget = LAG_BUDGET_IDS
        counted: dict[tuple[int, tuple[str, ...] | None], tuple[int | None, bool]] = {}
        lags = {}
        for name, (last_id, _updated, _owner, prefixes) in reversed(ranked):
            key = (last_id, prefixes)
            if key not in counted:
                # Each id is compared with every prefix (no index on topic):
                # the windows are in ids x prefixes, so 64 cost what one does.
                weight = max(1, len(prefixes or ()))
                upto = min(head, last_id + LAG_COUNT_IDS // weight, last_id + budget // weight)
                lag = count(last_id, upto, prefixes) if upto > last_id else 0
                budget -= max(0, upto - last_id) * weight
                counted[key] = (lag, lag is not None and upto >= head)
            lag, exact = counted[key]
            lags[name] = {"lag": lag, "lag_exact": exact}
        return lags
