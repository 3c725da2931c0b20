"""A reader on a PostgreSQL hot standby (issue 27): streaming replication
from a private primary (tests/pgserver.py, pg_basebackup), the writer on the
primary, the reader on the standby. It serves what the standby has replayed,
never a later row without the ones below it, and says how far behind it is."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bus.client import HistoryClient, Subscriber
from reader.health import reader_health
from tests.conftest import BUS_CLI, Bus, execute, free_port, wait_for
from tests.test_docs import PROTOCOL_MD, documented_stats, stats_differences
from tests.test_hostile import publish_acked

pytestmark = pytest.mark.parametrize("db_engine", ["postgresql"], indirect=True)


@pytest.fixture
def primary_and_standby() -> Iterator[tuple[Any, Any]]:
    """A primary of its own (the session's server holds every test's
    databases: a base backup of it would copy them all) and its hot standby."""
    from tests.pgserver import PACKAGE_HINT, PgServer, find_bindir
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(PACKAGE_HINT)
    primary = PgServer(bindir, free_port()).start()
    standby = None
    try:
        standby = PgServer(bindir, free_port()).start_replica_of(primary)
        yield primary, standby
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


def ids_read(bus: Bus, endpoint: str) -> list[int]:
    """Every id the reader serves, page after page (small pages)."""
    ids: list[int] = []
    with HistoryClient(bus.config(), endpoint=endpoint, timeout_ms=5000) as history:
        after = 0
        while True:
            page = history.page(after_id=after, limit=50)
            ids += [message.id for message in page.messages]
            if not page.more:
                return ids
            after = page.after_id


def test_a_reader_on_a_hot_standby_serves_what_is_replayed_and_says_how_far_behind(
        make_bus, primary_and_standby) -> None:
    primary, standby = primary_and_standby
    url = primary.create_database()
    replica_url = url.replace(f":{primary.port}/", f":{standby.port}/")
    bus: Bus = make_bus(BUS_DB=url)
    bus.start_writer()
    bus.start_proxy()
    reader = bus.spawn([BUS_CLI, "reader"],
                       env={"BUS_DB": replica_url, "BUS_READER_MAX_LAG_S": "1"})
    bus.reader = bus._answering(reader, "reader", "BUS_READ_ENDPOINT")
    endpoint = bus["BUS_READ_ENDPOINT"]
    publish_acked(bus, "r", "replica.t", 100)
    wait_for(lambda: len(ids_read(bus, endpoint)) == 100, message="the standby to replay 100")
    stats = bus.request("BUS_READ_ENDPOINT", "stats")
    assert stats["replica"]["receiver"] == "streaming" and reader_health(stats) is None
    # Replay paused: the primary commits on, the standby serves what it has
    # replayed, a prefix of the ids, and says how far behind it is.
    execute(replica_url, "SELECT pg_wal_replay_pause()")
    publish_acked(bus, "r", "replica.t", 100)
    behind = wait_for(lambda: (s := bus.request("BUS_READ_ENDPOINT", "stats"))["replica"]
                      ["behind_s"] and s["replica"]["behind_s"] > 1 and s,
                      message="the standby's lag to pass BUS_READER_MAX_LAG_S")
    assert behind["replica"]["behind_bytes"] > 0
    assert "behind its primary" in reader_health(behind)
    # The fields docs/protocol.md lists for it (tests/test_docs.py leaves
    # this one reply to this test).
    documented = documented_stats(PROTOCOL_MD.read_text())["reader"]
    problems, seen = stats_differences("reader", documented, behind)
    assert problems == [] and ("reader", "replica") in seen, problems
    served = ids_read(bus, endpoint)
    assert served == list(range(1, len(served) + 1)) and len(served) < 200
    # A subscriber catching up from the start through the lagging reader, then
    # live: it waits for the standby where the stored stream stops short of
    # the live one, and sees every message once, in order, with no gap.
    with Subscriber(["replica."], bus.config(), after_id=0) as sub:
        first = [sub.receive(timeout=10) for _ in range(len(served))]
        assert [m.id for m in first] == served
        publish_acked(bus, "r", "replica.t", 10)  # live while the standby is paused
        execute(replica_url, "SELECT pg_wal_replay_resume()")
        rest = [sub.receive(timeout=10) for _ in range(210 - len(served))]
    seqs = [int(m.payload) for m in first + rest]
    assert seqs == list(range(100)) + list(range(100)) + list(range(10))
    wait_for(lambda: ids_read(bus, endpoint) == list(range(1, 211)),
             message="the standby to replay all 210, in order")
    caught_up = wait_for(lambda: (s := bus.request("BUS_READ_ENDPOINT", "stats"))["replica"]
                         ["behind_s"] == 0 and s, message="the standby to catch up")
    assert reader_health(caught_up) is None
    assert bus.stop() == (0, 0)
