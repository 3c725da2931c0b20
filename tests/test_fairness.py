"""Fairness between publishers (issue 22, item 6): one publisher connection
flooding invalid messages does not delay another's acknowledgements."""

from __future__ import annotations

import pytest

from tests.conftest import Bus
from tests.fuzz import ROLES, noisy_neighbour

# The bound on the honest publisher's acknowledgement p99 under the
# flood is 50 ms; bench/noisy_neighbour.py measured 28-57 ms here (p50 9-14
# ms). This 2-core VM is shared (the flood, the proxy, the writer, the test
# and other suites compete for it: the honest p99 without any flood was 4-115
# ms in the same hour), so the test allows 4 times the bound for p99, and the
# bound itself for p50. Before the fix: p50 4.6 s, p99 8.2 s, 320 of 500
# acknowledgements later than 5 s.
HONEST_P99_MS = 4 * 50.0
HONEST_P50_MS = 50.0


@pytest.mark.parametrize("kind", ["bad_meta", "forged"])
def test_a_noisy_publisher_leaves_honest_acknowledgements_fast(bus: Bus, kind: str) -> None:
    # bad_meta: messages the writer refuses (meta_not_msgpack); forged:
    # well-formed messages of a session, dropped at the mac check.
    result = noisy_neighbour(bus, seconds=10, kind=kind)
    assert result["alive"] == dict.fromkeys(ROLES, True)
    assert result["noise_refused_per_s"] > 10_000, result  # the flood really reached the writer
    assert result["honest_timeouts"] == 0, result
    # Refused messages are no load to batch for: the honest rows (50 a second,
    # under BATCH_LOW_LOAD_THRESHOLD) are committed as soon as a read brings
    # no valid message, not BATCH_FLUSH_INTERVAL_MS later.
    flushes = result["writer_flushes"]
    assert flushes["low_load"] > 10 * flushes["time"], result
    assert result["honest_ms"]["p50"] < HONEST_P50_MS, result
    assert result["honest_ms"]["p99"] < HONEST_P99_MS, result
    published = result["honest_published"] + 1  # and the first one
    assert result["honest_stored"] == (published, published)
