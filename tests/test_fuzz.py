"""The fuzz harness (tests/fuzz.py) with a short budget: every endpoint gets
malformed frames of every shape while valid messages are published."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Bus, mounted_tmpfs
from tests.fuzz import (ENDPOINTS, ROLES, fuzz, long_reader, seed_history, small_disk,
                        subscription_flood_and_churn)

FRAMES_PER_ENDPOINT = 3000
# What a burst may leave behind in each process once it is over (allocator
# arenas, libzmq's buffers): a bound, so that growth per frame would show.
SETTLED_GROWTH_KIB = 64 << 10


def test_no_malformed_frame_costs_a_process_or_a_valid_message(bus: Bus) -> None:
    result = fuzz(bus, FRAMES_PER_ENDPOINT, seconds=30)
    assert result["sender_errors"] == {}
    assert all(result["frames_per_endpoint"][name] >= 500 for name in ENDPOINTS), result
    assert result["alive"] == dict.fromkeys(ROLES, True)
    assert result["unanswered"] == {}, "every request with an envelope is answered"
    assert result["valid_published"] > 0
    assert result["valid_stored"] == result["valid_distinct"] == result["valid_published"]
    assert result["integrity"] == "ok"
    assert sum(result["writer_rejected"].values()) > 0
    # The fuzzer's own session: forged and altered macs dropped, malformed
    # messages with its valid mac refused with a nack, valid ones stored.
    assert result["writer_not_authentic"] > 0
    assert sum(result["writer_nacked"].values()) > 0 and result["fuzz_session_stored"] > 0
    for role, rss in result["rss_kib"].items():
        assert rss["settled"] <= rss["before"] + SETTLED_GROWTH_KIB, (role, rss)


def test_a_subscription_flood_and_churn_stall_nothing(bus: Bus) -> None:
    """Issue 22's shape with a short budget: 2 SUBs flooding 5,000 prefixes of
    1,000 bytes, then churning subscribers while acknowledged rounds go on.
    The stall bound is generous: a stall, not a benchmark."""
    result = subscription_flood_and_churn(bus, flooders=2, prefixes=5000, churn_seconds=4)
    assert result["alive"] == dict.fromkeys(ROLES, True)
    assert result["stored"] == result["published"] > 0
    assert result["longest_ack_wait_s"] < 3.0, result
    assert sum(result["subscriptions"]["refused"].values()) >= 2, result


def test_a_small_disk_fills_and_recovers_round_after_round(make_bus, tmp_path: Path) -> None:
    """Issue 22's small-disk shape with a short budget: on a 20 MiB tmpfs
    (skipped where one cannot be mounted), three rounds of a disk filled by
    acknowledged publishers and then freed; each recovers, every message is
    stored once, the WAL stays within its bound, SIGTERM exits 0."""
    with mounted_tmpfs(tmp_path / "disk", 20) as disk:
        bus = make_bus(BUS_DB=disk / "bus.db", BUS_SHUTDOWN_TIMEOUT_MS=10_000).start()
        result = small_disk(bus, disk, rounds=3, seconds=30)
    assert all(result["checks"].values()), result
    assert len(result["rounds"]) == 3, result


def test_a_long_reader_leaves_the_wal_bounded_and_acks_flowing(make_bus) -> None:
    """Issue 22's long-reader shape with a short budget: 4 history clients
    (whole pages, scans that match nothing or little) while 2,000 messages a
    second are published for 5 s."""
    bus = make_bus()
    seed_history(bus, 20_000)
    bus.start()
    result = long_reader(bus, seconds=5, rate=2000, clients=4)
    assert all(result["checks"].values()), result
