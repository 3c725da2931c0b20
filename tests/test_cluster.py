"""A deployment of three hosts (issue 27), across network namespaces this
test makes on this machine (tests/cluster.py: host A the PostgreSQL
primary, the proxy and a writer; B a hot standby, a standby writer and the
reader; C an edge proxy, an acknowledged publisher and subscribers through
the edge; CURVE between them all). One deployment goes through the
scenarios in turn, as a real one would, each under acknowledged load:

1. kill -9 of A's writer at 5,000 msg/s: B's standby takes over (and A's
   writer, restarted by its unit, waits as a standby);
2. B's link down, B's writer being the active one: the primary (on A)
   ends B's session, A's writer takes over, and B's writer, cut off from
   the database, exits 75 and never commits again (checked in the database:
   no transaction from B's address committed after A's first);
3. A's link down (the primary's host: no writer can take over; the bus
   waits, and the publisher sends again once A is back);
4. B's hot standby stopped and started again (the reader says why it cannot
   serve meanwhile, and catches up).

After each: no acknowledged message lost, none stored twice, the live
subscriber through the edge missed nothing; at the end, a subscriber
catching up from the reader on the hot standby through the edge gets every
stored message, none missing. The links are cut for 8 s here, at 1,000 msg/s (the suite's time);
bench/cluster_bench.py cuts them for 30 s and prints the figures (README).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import Deployment, Hosts, missing
from tests.pgserver import PACKAGE_HINT, find_bindir

SESSION_TIMEOUT_S = 5
CUT_S = 8  # past a takeover's SESSION_TIMEOUT_S and then some
CUT_RATE = 1000


@pytest.fixture
def deployment(tmp_path: Path):
    why = missing() or (None if find_bindir() else PACKAGE_HINT)
    if why:
        pytest.skip(f"three hosts cannot be made here: {why}")
    hosts = Hosts()
    deployment = Deployment(hosts, tmp_path, session_timeout_s=SESSION_TIMEOUT_S)
    try:  # whatever fails, from the first namespace on, is undone
        hosts.up()
        yield deployment.start()
    finally:
        try:
            deployment.close()
        finally:
            hosts.close()


def lost_nothing(row: dict) -> None:
    """Nothing acknowledged lost or stored twice, and the live subscriber
    (receiving before the scenario's hit) missed nothing after its first."""
    assert (row["lost"], row["twice"], row["live_missing"]) == (0, 0, 0), row


@pytest.mark.xdist_group("cpu_heavy")  # never beside tests/test_hostile.py's memory bounds
def test_three_hosts_lose_nothing_through_a_kill_two_partitions_and_a_replica_restart(
        deployment: Deployment) -> None:
    killed = deployment.kill_writer(rate=5000, seconds=4)
    lost_nothing(killed)
    assert killed["takeover_s"] < 5, killed
    assert deployment.active_writer() == "b"

    partitioned = deployment.cut("b", rate=CUT_RATE, cut_s=CUT_S)
    lost_nothing(partitioned)
    assert partitioned["takeover_s"] < SESSION_TIMEOUT_S + 5, partitioned
    assert partitioned["old_exit"] == 75, partitioned
    assert partitioned["commits_after_takeover"] == 0, partitioned
    assert partitioned["new_writer_commits"] > 0, partitioned  # the audit sees commits
    assert deployment.active_writer() == "a"

    primary_cut = deployment.cut("a", rate=CUT_RATE, cut_s=CUT_S)
    lost_nothing(primary_cut)
    assert primary_cut["kept_the_lock"] and deployment.active_writer() == "a", primary_cut
    assert primary_cut["ack_max_ms"] >= CUT_S * 1000 * 0.9  # it waited out the cut

    replica = deployment.restart_replica(rate=CUT_RATE, down_s=3)
    lost_nothing(replica)
    assert replica["kept_the_lock"], replica
    assert "database not readable" in replica["reader_said"], replica

    caught_up = deployment.catch_up()
    stored = deployment.query("SELECT count(*) FROM messages WHERE topic = 'bench.acked'")[0][0]
    assert (caught_up["received"], caught_up["distinct"], caught_up["gaps"]) == \
        (stored, stored, 0), caught_up
