"""Quotas per CURVE key at the writer (docs/protocol.md, "Quotas").

With CURVE, every control request carries its key (the ZAP handler's
User-Id), and a key is the principal that quotas count against:

- producer ids it owns (BUS_MAX_PRODUCERS_PER_KEY): a `producer_open` of an id
  no key owns yet is refused beyond it; `bus-cli producers rm` frees one;
- durable consumers it owns (BUS_MAX_CONSUMERS_PER_KEY, writer/consumers.py);
- control requests a second (BUS_MAX_REQUESTS_PER_KEY_S).

The last is a rate, not a count of requests in flight: the control endpoint is
answered one request at a time, taken from its connections in turn
(libzmq fair-queues them), and a REQ connection has one request outstanding at most. What a
key has "in flight" is then the number of its connections with a request
waiting, which libzmq does not show (nor can the ZAP handler count a key's
connections: it is told when one opens, never when it closes). A key opening
many connections takes a share of the writer's one thread in proportion; a
token bucket per key (a second's worth at once, then `rate` a second) bounds
that share whatever the number of connections, and a refusal costs no
database work. `producer_open` commits before it answers, so the rate bounds
the commits a key can cause too.

With CURVE off no request has a key: there is one anonymous principal, and
only the global limits apply (BUS_MAX_CONSUMERS). Every refusal is answered
`quota_exceeded` with a reason naming the quota and the key, counted in
`stats` (`quotas.refused`) and logged (rate-limited).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from bus import protocol
from bus.config import BusConfig
from bus.control import CommandFailed, Request
from bus.logging import RateLimitedLog

# The keys whose refusals `stats` shows, most refused first.
SHOWN_KEYS = 20
# A request up to this size costs one request of its key's rate; past it, one a KiB.
FREE_REQUEST_BYTES = 4096


class RequestRate:
    """A token bucket per key: `rate` requests a second, `rate` at once."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def admit(self, key: str, now: float, cost: float = 1.0) -> bool:
        tokens, then = self._buckets.get(key, (float(self.rate), now))
        tokens = min(float(self.rate), tokens + (now - then) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - cost, now)
        return True


class KeyQuotas:
    """The writer's quotas on producer ids and requests per key, and the
    refusals of all three (writer/consumers.py checks the consumers' own, and
    the writer answers its refusal through `refuse`)."""

    def __init__(self, config: BusConfig, producers_owned: dict[str, int], log: Any,
                 is_admin: Callable[[str], bool] = lambda _key: False) -> None:
        self.is_admin = is_admin
        self.max_producers = config.max_producers_per_key
        self.max_consumers = config.max_consumers_per_key
        self.requests = RequestRate(config.max_requests_per_key_s) \
            if config.max_requests_per_key_s else None
        self.producers_owned: Counter[str] = Counter(producers_owned)
        self.refused: Counter[str] = Counter()          # quota -> refusals
        self.refused_keys: Counter[str] = Counter()     # key -> refusals
        self._log = RateLimitedLog(log)

    def refuse(self, quota: str, key: str, reason: str) -> CommandFailed:
        """Count a refusal and the error that answers it."""
        self.refused[quota] += 1
        self.refused_keys[key] += 1
        self._log.warning(f"{quota}:{key}", "quota_exceeded", quota=quota, client_key=key,
                          detail=reason)
        return CommandFailed(protocol.QUOTA_EXCEEDED, f"quota {quota}: key {key} {reason}")

    def admit_request(self, request: Request, now: float) -> None:
        """The Dispatcher's `admit` hook: within the key's request rate?"""
        if request.user is None or self.requests is None:
            return
        if not self.requests.admit(request.user, now):
            raise self.refuse("requests_per_key_s", request.user,
                              f"sent more than {self.requests.rate} requests a second "
                              "(BUS_MAX_REQUESTS_PER_KEY_S); retry later")

    def admit_bytes(self, key: str | None, size: int, now: float) -> None:
        """The Dispatcher's `admit_bytes` hook, before a request is decoded: a
        request over FREE_REQUEST_BYTES draws one more request from the key's
        bucket per KiB. Decoding is what a request costs the writer's thread
        (a 4 MiB request of small integers: 85 ms), so a key's rate bounds its
        bytes too. Admins' keys (the anchor worker's UTXO and anchor records,
        megabytes each) are not counted: they may run every command anyway."""
        if key is None or self.requests is None or size <= FREE_REQUEST_BYTES:
            return
        if self.is_admin(key):
            return
        if not self.requests.admit(key, now, size / 1024):
            raise self.refuse("requests_per_key_s", key,
                              f"sent more than {self.requests.rate} requests a second "
                              f"(BUS_MAX_REQUESTS_PER_KEY_S; a request of {size:,} bytes counts "
                              "one per KiB); retry later")

    def check_new_producer(self, key: str | None) -> None:
        """May `key` take one more producer id?"""
        if key is None or not self.max_producers:
            return
        owned = self.producers_owned[key]
        if owned >= self.max_producers:
            raise self.refuse("producers_per_key", key,
                              f"owns {owned} producer ids (BUS_MAX_PRODUCERS_PER_KEY="
                              f"{self.max_producers}); reuse one, or have an admin free one "
                              "(bus-cli producers rm)")

    def producer_taken(self, key: str) -> None:
        self.producers_owned[key] += 1

    def producer_freed(self, key: str) -> None:
        self.producers_owned[key] -= 1
        if self.producers_owned[key] <= 0:
            del self.producers_owned[key]

    def snapshot(self) -> dict[str, Any]:
        return {"producers_per_key": self.max_producers,
                "consumers_per_key": self.max_consumers,
                "requests_per_key_s": self.requests.rate if self.requests else 0,
                "refused": dict(self.refused),
                "refused_keys": dict(self.refused_keys.most_common(SHOWN_KEYS)),
                "keys_owning_producers": len(self.producers_owned)}
