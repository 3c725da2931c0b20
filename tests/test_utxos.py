"""UTXO reservations through the writer: leases, retries, spends, sync, and
many concurrent REQ clients against the real writer process."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import sys
import threading
import time
from typing import Any

import pytest

from anchor.reservations import NoUtxo, UtxoClient
from bus.client import BusError
from tests.conftest import Bus, query, wait_for
from storage.utxos import PICK_SQL


def txid(n: int | str) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def utxo(n: int, amount: int, height: int | None = 100, vout: int = 0) -> dict[str, Any]:
    return {"txid": txid(n), "vout": vout, "amount_sat": amount, "address": f"bcrt1q{n}",
            "script_pubkey": "0014" + "00" * 20, "block_height": height,
            "block_time": 1_700_000_000 if height is not None else None}


def client(bus: Bus, **kw: Any) -> UtxoClient:
    kw.setdefault("retry_for_s", 5.0)
    return UtxoClient(bus["BUS_CONTROL_ENDPOINT"], **kw)


def status(bus: Bus, n: int, vout: int = 0) -> str:
    rows = query(bus.db, "SELECT status FROM utxos WHERE txid = ? AND vout = ?", (txid(n), vout))
    return {0: "available", 1: "reserved", 2: "spent"}[rows[0][0]]


@pytest.fixture
def wallet(make_bus: Any) -> Bus:
    """A writer alone, with five UTXOs at tip height 102 (heights 100, 101, 102, unconfirmed)."""
    bus = make_bus()
    bus.start_writer()
    with client(bus) as c:
        c.upsert([utxo(1, 1_000), utxo(2, 2_000, 101), utxo(3, 5_000, 102),
                  utxo(4, 50_000), utxo(5, 3_000, None)])
        c.set_tip(102, txid("tip"))
    return bus


def test_policies_and_confirmations_pick_through_the_index(wallet: Bus) -> None:
    with client(wallet) as c:
        smallest = c.reserve(1_500, 60)
        assert (smallest["txid"], smallest["amount_sat"], smallest["confirmations"]) == \
            (txid(2), 2_000, 2)
        largest = c.reserve(1_500, 60, policy="largest")
        assert largest["txid"] == txid(4)
        # 3 confirmations: only heights <= 100 remain, and 4 is taken.
        assert c.reserve(0, 60, min_confirmations=3)["txid"] == txid(1)
        # The unconfirmed 3,000 sat output only when 0 confirmations are allowed.
        assert c.reserve(2_500, 60)["txid"] == txid(3)
        with pytest.raises(NoUtxo):
            c.reserve(2_500, 60)
        assert c.reserve(2_500, 60, min_confirmations=0)["txid"] == txid(5)
    assert [status(wallet, n) for n in range(1, 6)] == ["reserved"] * 5
    # Whatever the table size, the pick is a range seek on the partial index.
    for sql in PICK_SQL.values():
        params = (1, 1)[:sql.count("?")]
        if wallet.engine == "postgresql":
            # Five rows are cheaper to scan: with scans off, the plan shows that
            # the partial index answers the query (its WHERE implies the index's).
            import psycopg
            with psycopg.connect(wallet.db) as conn:
                conn.execute("SET enable_seqscan = off")
                plan = " ".join(row[0] for row in conn.execute(
                    "EXPLAIN " + sql.replace("?", "%s"), params))
            assert "Index Scan" in plan and "utxos_available" in plan, plan
            continue
        conn = sqlite3.connect(f"file:{wallet.db}?mode=ro", uri=True)
        plan = " ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
        conn.close()
        assert "SEARCH utxos USING INDEX utxos_available (amount_sat" in plan, plan


def test_no_spendable_utxo_is_a_clear_counted_error(wallet: Bus) -> None:
    with client(wallet) as c:
        with pytest.raises(NoUtxo) as err:
            c.reserve(10**9, 60)
    assert err.value.code == "no_utxo"
    assert "no available UTXO of at least 1000000000 sat with 1 confirmations" in str(err.value)
    assert "largest available: 50000 sat" in str(err.value)
    assert wallet.writer_stats()["utxos"]["no_utxo"] == 1


def test_a_retried_request_id_gets_the_same_answer_across_a_restart(wallet: Bus) -> None:
    with client(wallet) as c:
        first = c.reserve(1_000, 60, request_id="req-1")
        assert c.reserve(1_000, 60, request_id="req-1") == first
        spent = c.call("utxo_spend", {"lease_id": first["lease_id"], "request_id": "spend-1",
                                      "spending_txid": txid("tx-a")})
    assert wallet.writer.stop() == 0
    wallet.start_writer()
    with client(wallet) as c:
        assert c.reserve(1_000, 60, request_id="req-1") == first
        assert c.call("utxo_spend", {"lease_id": first["lease_id"], "request_id": "spend-1",
                                     "spending_txid": txid("tx-a")}) == spent
        # The same id with other arguments is not a retry: refused, nothing changed.
        with pytest.raises(BusError) as err:
            c.call("utxo_spend", {"lease_id": first["lease_id"], "request_id": "spend-1",
                                  "spending_txid": txid("tx-b")})
        assert err.value.code == "request_id_reused"
        # A new id is a new reservation: of another UTXO.
        assert c.reserve(1_000, 60, request_id="req-2")["txid"] != first["txid"]
    assert wallet.writer_stats()["utxos"]["replayed"] == 2
    assert query(wallet.db, "SELECT count(*) FROM utxos WHERE status = 1")[0][0] == 1


def test_concurrent_clients_never_share_a_live_lease(make_bus: Any) -> None:
    """16 REQ clients reserve, release and re-reserve 300 UTXOs at once; a
    UTXO handed out while another client holds it live fails the test."""
    bus = make_bus()
    bus.start_writer()
    with client(bus) as c:
        for start in range(0, 300, 100):
            c.upsert([utxo(n, 1_000 + n) for n in range(start, start + 100)])
        c.set_tip(200, txid("tip"))
    live: dict[str, str] = {}     # txid -> lease_id, for leases not released
    lock = threading.Lock()
    violations: list[str] = []
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with client(bus) as c:
                for i in range(1000):
                    try:
                        got = c.reserve(1_000, 60, policy="largest" if k % 2 else "smallest")
                    except NoUtxo:
                        return
                    with lock:
                        if got["txid"] in live:
                            violations.append(f"{got['txid']} leased twice")
                        live[got["txid"]] = got["lease_id"]
                    if i % 3 == 0:  # give some back: they must be handed out again, once
                        with lock:
                            del live[got["txid"]]
                        assert c.release(got["lease_id"]) is True
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert not violations, violations[:5]
    assert len(live) == 300
    rows = query(bus.db, "SELECT txid, lease_id FROM utxos WHERE status = 1")
    assert dict(rows) == live
    stats = bus.writer_stats()["utxos"]
    assert stats["reserved"] - stats["released"] == 300


def test_an_expired_lease_returns_its_utxo_to_the_pool(make_bus: Any) -> None:
    """A worker that reserved and was killed: its lease expires, the UTXO is
    handed out again, and the dead worker's lease can no longer spend it."""
    bus = make_bus()
    bus.start_writer()
    with client(bus) as c:
        c.upsert([utxo(1, 10_000)])
        c.set_tip(100, txid("tip"))
    script = ("import sys, os, signal; from anchor.reservations import UtxoClient;"
              "c = UtxoClient(sys.argv[1]); r = c.reserve(1000, 1.0);"
              "print(r['lease_id'], flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    crashed = bus.spawn([sys.executable, "-c", script, bus["BUS_CONTROL_ENDPOINT"]])
    assert crashed.wait() == -signal.SIGKILL
    dead_lease = crashed.stdout.wait_line(bool)
    assert status(bus, 1) == "reserved"
    with client(bus) as c:
        with pytest.raises(NoUtxo):
            c.reserve(1_000, 60)
        got = wait_for(lambda: _try_reserve(c), message="the expired UTXO back in the pool")
        assert got["txid"] == txid(1) and got["lease_id"] != dead_lease
        with pytest.raises(BusError) as err:
            c.spend(dead_lease, txid("late"))
    assert err.value.code == "lease_expired"
    assert bus.writer_stats()["utxos"]["expired"] == 1


def _try_reserve(c: UtxoClient) -> dict[str, Any] | None:
    try:
        return c.reserve(1_000, 60)
    except NoUtxo:
        return None


def test_spend_adds_change_and_a_replacement_swaps_it(wallet: Bus) -> None:
    with client(wallet) as c:
        lease = c.reserve(40_000, 60)
        change = {**utxo("tx-a", 39_000, None, vout=1)}
        done = c.spend(lease["lease_id"], txid("tx-a"), [change])
        assert (done["txid"], done["replaced_txid"], done["change"]) == (txid(4), None, 1)
        assert status(wallet, 4) == "spent" and status(wallet, "tx-a", 1) == "available"
        # Fee bump: the same input in a new transaction, with less change.
        bumped = c.spend(lease["lease_id"], txid("tx-b"), [utxo("tx-b", 38_000, None, vout=1)])
        assert bumped["replaced_txid"] == txid("tx-a")
        assert query(wallet.db, "SELECT count(*) FROM utxos WHERE txid = ?", (txid("tx-a"),)) \
            == [(0,)]
        assert c.get(txid(4), 0)["spending_txid"] == txid("tx-b")
        assert c.release(lease["lease_id"]) is False  # spent: nothing to give back
        with pytest.raises(BusError) as err:
            c.spend(lease["lease_id"], txid("tx-c"), [utxo("tx-other", 1, None)])
        assert err.value.code == "bad_request"
    stats = wallet.writer_stats()["utxos"]
    assert (stats["spent"], stats["replaced"]) == (1, 1)


def test_sync_keeps_leases_marks_spends_and_sweeps_what_the_wallet_lost(wallet: Bus) -> None:
    with client(wallet) as c:
        lease = c.reserve(40_000, 60)
        # A new block confirms the unconfirmed one; a re-sent row keeps its lease.
        generation = time.time_ns()
        c.upsert([utxo(1, 1_000), utxo(4, 50_000), utxo(5, 3_000, 103), utxo(6, 7_000, 103)],
                 generation=generation)
        c.set_tip(103, txid("tip2"))
        assert c.get(txid(4), 0)["status"] == "reserved"
        assert c.get(txid(5), 0)["confirmations"] == 1
        # Spent elsewhere: marked spent, and the lease on it is void.
        assert c.remove([(txid(4), 0)], spending_txid=txid("other")) == 1
        with pytest.raises(BusError) as err:
            c.renew(lease["lease_id"], 60)
        assert err.value.code == "lease_expired"
        # 2 and 3 were not in the full load: gone from the wallet.
        assert c.sweep(generation) == 2
    assert [status(wallet, n) for n in range(1, 7)] == \
        ["available", "spent", "spent", "spent", "available", "available"]


def test_bad_requests_are_refused_counted_and_harmless(wallet: Bus) -> None:
    bad = [("utxo_reserve", {"min_amount_sat": 1, "lease_seconds": 60}),          # no request id
           ("utxo_reserve", {"request_id": "r", "min_amount_sat": -1, "lease_seconds": 60}),
           ("utxo_reserve", {"request_id": "r", "min_amount_sat": 1, "lease_seconds": 10**9}),
           ("utxo_reserve", {"request_id": "r", "min_amount_sat": 1.5, "lease_seconds": 1}),
           ("utxo_reserve", {"request_id": "r", "min_amount_sat": 1, "lease_seconds": 1,
                             "policy": "random"}),
           ("utxo_upsert", {"utxos": [{"txid": "xyz", "vout": 0, "amount_sat": 1}]}),
           ("utxo_upsert", {"utxos": [{"txid": txid(9), "vout": 0, "amount_sat": 0.5}]}),
           ("utxo_remove", {"outpoints": [[txid(1)]]}),
           ("utxo_spend", {"lease_id": "nope", "spending_txid": txid(1)}),
           ("utxo_frobnicate", {})]
    with client(wallet) as c:
        for cmd, args in bad:
            with pytest.raises(BusError) as err:
                c.call(cmd, args)
            assert err.value.code in ("bad_request", "lease_expired", "unknown_command"), cmd
        assert c.reserve(1_000, 60)["txid"] == txid(1)  # still serving, nothing changed
    stats = wallet.writer_stats()
    assert stats["control"]["bad_requests"] >= 7
    assert query(wallet.db, "SELECT count(*) FROM utxos")[0][0] == 5


def test_requests_survive_a_writer_restart(wallet: Bus) -> None:
    """Lazy Pirate: a reservation sent while the writer is down is answered
    once it is back; the client re-sent it on new sockets meanwhile."""
    assert wallet.writer.stop() == 0
    result: dict[str, Any] = {}
    c = client(wallet, timeout_ms=300, retry_for_s=20)

    def reserve() -> None:
        result["lease"] = c.reserve(1_000, 60, request_id="while-down")

    thread = threading.Thread(target=reserve)
    thread.start()
    wait_for(lambda: c.retries >= 2, message="the client re-sending")
    wallet.start_writer()
    thread.join(20)
    c.close()
    assert result["lease"]["txid"] == txid(1)
    assert query(wallet.db, "SELECT count(*) FROM utxos WHERE status = 1") == [(1,)]


def test_utxo_stats_command(wallet: Bus) -> None:
    wallet.start_reader()
    with client(wallet) as c:
        c.reserve(1_000, 60)
    out = wallet.cli("utxo", "stats", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    stats = json.loads(out.stdout)
    assert stats["table"]["available"] == {"count": 4, "amount_sat": 60_000, "unconfirmed": 1}
    assert stats["table"]["reserved"]["count"] == 1
    assert stats["table"]["tip_height"] == 102
    assert stats["writer"]["reserved"] == 1
    text = wallet.cli("utxo", "stats")
    assert "[table]" in text.stdout and "tip_height: 102" in text.stdout
