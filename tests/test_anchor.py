"""The anchor worker, as a real `bus-cli anchor` process on a real bus, against
a real regtest Bitcoin Core (tests/regtest.py) and the bitcoind double
(tests/bitcoind_double.py): the `node` fixture is each in turn. Marked
double_only: what only the double can be made to do on demand."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from anchor.bitcoind import op_return_outputs, parse_tx, vsize
from proofs.merkle import root_from_path
from proofs.document import op_return_payload
from bus.client import Publisher, Subscriber
from tests.bitcoind_double import BitcoindDouble
from tests.conftest import Bus, Proc, query, wait_for

FAST = {"BUS_ANCHOR_INTERVAL_S": 0.5, "BUS_ANCHOR_CONFIRMATIONS": 2,
        "BUS_ANCHOR_BUMP_AFTER_BLOCKS": 2, "BUS_ANCHOR_FEE_RATE_SAT_VB": 2,
        "BUS_ANCHOR_BLOCK_POLL_S": 1, "BUS_ANCHOR_RETRY_MAX_S": 1, "BUS_ANCHOR_LEASE_S": 2,
        "BUS_REQUEST_TIMEOUT_MS": 1000}


def doc(n: int | str) -> bytes:
    return hashlib.sha256(f"document {n}".encode()).digest()


def bus_for(make_bus: Any, node: BitcoindDouble, **settings: Any) -> Bus:
    """A running bus whose settings point the anchor worker at the double."""
    bus = make_bus(**{"BUS_BITCOIND_RPC_URL": node.url, "BUS_BITCOIND_RPC_USER": node.user,
                      "BUS_BITCOIND_RPC_PASSWORD": node.password,
                      "BUS_BITCOIND_ZMQ_HASHBLOCK": node.zmq_endpoint, **FAST, **settings})
    return bus.start()


@pytest.fixture
def anchoring(make_bus: Any, node: BitcoindDouble) -> Bus:
    return bus_for(make_bus, node)


def start_worker(bus: Bus) -> Proc:
    worker = bus.run("anchor")
    wait_for(lambda: any(e.get("event") == "anchor_ready" for e in worker.log_events())
             or worker.popen.poll() is not None, message="the worker ready")
    assert worker.popen.poll() is None, worker.stderr.collect()[-10:]
    return worker


def request(bus: Bus, *hashes: bytes, payloads: tuple[bytes, ...] = ()) -> None:
    with Publisher(bus.config()) as pub:
        for h in hashes:
            pub.publish("anchor.request", msgpack.packb({"hash": h, "ref": h.hex()[:8]}))
        for payload in payloads:
            pub.publish("anchor.request", payload)
        pub.flush(10)


class Events:
    """anchor.* events, received live."""

    def __init__(self, bus: Bus) -> None:
        self.sub = Subscriber(["anchor.submitted", "anchor.confirmed", "anchor.error"],
                              bus.config())
        self.seen: list[tuple[str, dict]] = []

    def collect(self) -> list[tuple[str, dict]]:
        while (msg := self.sub.receive(0.05)) is not None:
            self.seen.append((msg.topic, msgpack.unpackb(msg.payload, raw=False)))
        return self.seen

    def of(self, topic: str) -> list[dict]:
        return [body for t, body in self.collect() if t == topic]

    def wait(self, topic: str, predicate: Any = bool, message: str = "") -> list[dict]:
        return wait_for(lambda: [b for b in self.of(topic) if predicate(b)],
                        message=message or topic)

    def close(self) -> None:
        self.sub.close()


@pytest.fixture
def events(anchoring: Bus) -> Iterator[Events]:
    """anchor.* events of the bus, subscribed before the test starts a worker."""
    subscription = Events(anchoring)
    yield subscription
    subscription.close()


def submitted_docs(events: Events) -> dict[bytes, dict]:
    return {d["hash"]: {**d, "root": e["root"], "txid": e["txid"], "size": e["tree_size"]}
            for e in events.of("anchor.submitted") for d in e["documents"]}


def anchor_rows(bus: Bus) -> list[tuple]:
    return query(bus.db, "SELECT id, txid, status, size FROM anchors ORDER BY id")


def test_requests_are_anchored_proved_confirmed_and_verified(anchoring, node, events,
                                                             tmp_path) -> None:
    node.fund([200_000, 300_000, 400_000])
    start_worker(anchoring)
    hashes = [doc(i) for i in range(25)]
    request(anchoring, *hashes, hashes[3], payloads=(b"not a hash",))
    submitted = wait_for(lambda: len(submitted_docs(events)) == 25 and submitted_docs(events),
                         message="25 documents in anchor.submitted")
    [txid] = {d["txid"] for d in submitted.values()}
    # Every proof in the events leads to the root in the transaction's OP_RETURN.
    tx = parse_tx(node.gettransaction(txid)["hex"])
    [(vout, data)] = op_return_outputs(tx)
    for h, d in submitted.items():
        root = root_from_path(h, d["leaf_index"], d["size"], d["path"])
        assert op_return_payload(root, d["size"]) == data
    assert events.of("anchor.error")[0]["error"] == "bad_request"
    # One UTXO spent (the smallest that is enough), its change back in the pool.
    assert query(anchoring.db, "SELECT amount_sat, status FROM utxos WHERE spent_txid = ?",
                 (txid,)) == [(200_000, 2)]
    [(change, status)] = query(anchoring.db, "SELECT amount_sat, status FROM utxos WHERE txid = ?",
                               (txid,))
    assert status == 0 and change == tx.vout[1].value
    assert 2 * vsize(tx) <= 200_000 - change <= 2 * vsize(tx) + 2  # 2 sat/vB
    node.mine(2)
    confirmed = events.wait("anchor.confirmed")
    assert confirmed[0]["txid"] == txid and confirmed[0]["confirmations"] == 2
    assert anchor_rows(anchoring) == [(1, txid, "confirmed", 25)]
    # The proof from the CLI checks out offline, with the transaction; a tampered one fails.
    out = anchoring.cli("anchor", "proof", hashes[7].hex())
    assert out.returncode == 0, out.stderr
    proof = json.loads(out.stdout)
    assert (proof["status"], proof["txid"], proof["block_height"]) == ("confirmed", txid,
                                                                       node.height - 1)
    path = tmp_path / "proof.json"
    path.write_text(out.stdout)
    ok = anchoring.cli("anchor", "verify", str(path), "--tx-hex", tx.serialize().hex())
    assert ok.returncode == 0, ok
    assert f"OK: transaction {txid} carries that data in its one OP_RETURN" in ok.stdout
    assert "NOT CHECKED: that the transaction is in a block" in ok.stdout
    proof["leaf_index"] += 1
    path.write_text(json.dumps(proof))
    bad = anchoring.cli("anchor", "verify", str(path), "--tx-hex", tx.serialize().hex())
    assert bad.returncode == 1 and "INVALID: the audit path leads to" in bad.stderr
    missing = anchoring.cli("anchor", "proof", doc("never").hex())
    assert missing.returncode == 1 and "is not anchored" in missing.stderr


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def utxo_status(bus: Bus) -> list[tuple]:
    return query(bus.db, "SELECT amount_sat, status FROM utxos ORDER BY amount_sat")


@pytest.mark.double_only("holds the worker's signrawtransactionwithwallet call in flight")
def test_a_crashed_workers_lease_expires_and_its_requests_are_anchored_once(anchoring, node,
                                                                          events) -> None:
    node.fund([200_000])
    node.hold("signrawtransactionwithwallet")
    worker = start_worker(anchoring)
    request(anchoring, *[doc(i) for i in range(10)])
    wait_for(lambda: node.held["signrawtransactionwithwallet"], message="the worker signing")
    assert utxo_status(anchoring) == [(200_000, 1)]      # leased
    worker.send_signal(signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL
    node.release("signrawtransactionwithwallet")
    # BUS_ANCHOR_LEASE_S=2: the UTXO comes back by itself.
    wait_for(lambda: utxo_status(anchoring) == [(200_000, 0)], message="the lease to expire")
    assert anchoring.writer_stats()["utxos"]["expired"] == 1
    start_worker(anchoring)
    submitted = wait_for(lambda: len(submitted_docs(events)) == 10 and submitted_docs(events),
                         message="the 10 requests anchored after the restart")
    assert {d["hash"] for d in submitted.values()} == {doc(i) for i in range(10)}
    assert [(size, status) for _, _, status, size in anchor_rows(anchoring)] == \
        [(10, "submitted")]
    assert query(anchoring.db, "SELECT count(*) FROM utxos WHERE status = 2") == [(1,)]


@pytest.mark.double_only("holds sendrawtransaction in flight, then drops the call unanswered")
def test_a_worker_killed_after_recording_broadcasts_on_restart(anchoring, node, events) -> None:
    node.fund([200_000])
    node.hold("sendrawtransaction")
    worker = start_worker(anchoring)
    request(anchoring, doc("a"), doc("b"))
    wait_for(lambda: node.held["sendrawtransaction"], message="the worker broadcasting")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    [(_, txid, status, _)] = anchor_rows(anchoring)
    assert status == "signed"
    node.mempool.clear()  # the node never saw it (the held call is dropped)
    node.release("sendrawtransaction")
    start_worker(anchoring)
    wait_for(lambda: node.mempool == [txid], message="the recorded transaction broadcast")
    assert events.wait("anchor.submitted")[0]["txid"] == txid
    assert [row[1:3] for row in anchor_rows(anchoring)] == [(txid, "submitted")]


def test_bitcoind_unreachable_keeps_the_requests_until_it_is_back(anchoring, node, events) -> None:
    node.fund([200_000])
    worker = start_worker(anchoring)
    healthy = anchoring.request("BUS_ANCHOR_CONTROL_ENDPOINT", "stats")
    assert healthy["bitcoind"]["reachable"] is True and healthy["wallet_sync"]["lag_blocks"] == 0
    node.stop()
    request(anchoring, doc(1), doc(2), doc(3))
    # It tried: reserved a UTXO, could not build, gave the lease back. The next
    # try must be a new reservation, not a replay of the released one.
    wait_for(lambda: anchoring.writer_stats()["utxos"]["released"] >= 1,
             message="a try while bitcoind is down")
    # The lease goes back before the worker logs why (its reader thread
    # collects the line after that): waited for, not read at once.
    wait_for(lambda: any(e.get("event") == "anchor_held_back"
                         and "did not answer" in e.get("error", "")
                         for e in worker.log_events()),
             message="the worker to say bitcoind did not answer")
    assert anchor_rows(anchoring) == []
    # `stats` says why, from the worker's own control endpoint.
    held = anchoring.request("BUS_ANCHOR_CONTROL_ENDPOINT", "stats")
    assert held["bitcoind"]["reachable"] is False and "did not answer" in held["bitcoind"]["error"]
    assert held["queue"]["documents"] == 3 and held["open_anchors"] == 0
    # Waiting with overdue requests is waiting, not spinning: CPU over a 2 s window.
    cpu, wall = cpu_seconds(worker.pid), time.monotonic()
    time.sleep(2)
    used = cpu_seconds(worker.pid) - cpu
    assert used < 0.5 * (time.monotonic() - wall), (used, worker.log_events()[-5:])
    node.start()
    submitted = wait_for(lambda: len(submitted_docs(events)) == 3, message="3 documents anchored")
    assert submitted and worker.popen.poll() is None
    back = anchoring.request("BUS_ANCHOR_CONTROL_ENDPOINT", "stats")
    [txid] = {d["txid"] for d in submitted_docs(events).values()}
    assert back["last_broadcast"]["txid"] == txid
    assert back["queue"]["documents"] == 0 and back["open_anchors"] == 1
    stats = anchoring.writer_stats()["utxos"]
    assert stats["errors"] == 0, (stats, worker.log_events()[-8:])  # no stale lease was used


def test_no_spendable_utxo_is_an_error_event_and_the_requests_wait(anchoring, node, events) -> None:
    start_worker(anchoring)
    request(anchoring, doc("x"))
    error = events.wait("anchor.error")[0]
    assert error["error"] == "no_utxo" and "no available UTXO" in error["reason"]
    assert anchoring.writer_stats()["utxos"]["no_utxo"] >= 1
    node.fund([100_000])  # a block: the worker syncs and tries again
    wait_for(lambda: doc("x") in submitted_docs(events), message="anchored once funded")


def test_a_transaction_not_mined_in_time_is_fee_bumped_never_anchored_twice(anchoring, node,
                                                                           events) -> None:
    node.fund([200_000])
    node.mine_min_fee_rate = 2.5   # the first transaction pays 2 sat/vB: left in the mempool
    start_worker(anchoring)
    request(anchoring, doc("slow"))
    first = events.wait("anchor.submitted")[0]["txid"]
    node.mine(2)                   # BUS_ANCHOR_BUMP_AFTER_BLOCKS=2
    bumped = events.wait("anchor.submitted", lambda e: e["replaces"] == first)[0]
    assert node.mempool == [bumped["txid"]]   # the replacement evicted the first
    assert bumped["fee_sat"] > 1.5 * 2 * 150
    node.mine(2)
    confirmed = events.wait("anchor.confirmed")[0]
    assert confirmed["txid"] == bumped["txid"]
    assert query(anchoring.db, "SELECT txid, status, replaced_txids FROM anchors") == \
        [(bumped["txid"], "confirmed", msgpack.packb([first]))]
    assert query(anchoring.db, "SELECT spent_txid FROM utxos WHERE amount_sat = 200000") == \
        [(bumped["txid"],)]
    assert query(anchoring.db, "SELECT count(*) FROM utxos WHERE txid = ?", (first,)) == [(0,)]


def test_submit_waits_for_the_proof_of_a_file(make_bus, node, tmp_path) -> None:
    """Also: with no fee rate set, the rate is bitcoind's estimatesmartfee, which
    on a chain without fee data (regtest) answers only "errors": the fallback
    rate is paid."""
    anchoring = bus_for(make_bus, node, BUS_ANCHOR_FEE_RATE_SAT_VB=0,
                        BUS_ANCHOR_FALLBACK_FEE_RATE_SAT_VB=3)
    assert "feerate" not in node.estimatesmartfee(6)
    node.fund([200_000])
    start_worker(anchoring)
    document = tmp_path / "contract.txt"
    document.write_bytes(b"the parties agree" * 1000)
    out = anchoring.cli("anchor", "submit", str(document), "--ref", "contract-7", "--wait",
                        "--timeout", "15")
    assert out.returncode == 0, out.stderr
    proof = json.loads(out.stdout)
    digest = hashlib.sha256(document.read_bytes()).hexdigest()
    assert (proof["document"], proof["ref"], proof["status"]) == (digest, "contract-7",
                                                                  "submitted")
    assert node.mempool == [proof["txid"]]
    tx = parse_tx(node.gettransaction(proof["txid"])["hex"])
    fee = 200_000 - tx.vout[1].value
    assert 3 * vsize(tx) <= fee <= 3 * vsize(tx) + 3
    bad = anchoring.cli("anchor", "submit", "--hash", "abc")
    assert bad.returncode == 2 and "64 hex characters" in bad.stderr


@pytest.mark.double_only("a regtest Core has no fee estimate to give: it needs blocks of "
                         "fee-paying transactions from the network")
def test_the_fee_rate_is_bitcoinds_estimate_when_it_has_one(make_bus, node) -> None:
    anchoring = bus_for(make_bus, node, BUS_ANCHOR_FEE_RATE_SAT_VB=0,
                        BUS_ANCHOR_FALLBACK_FEE_RATE_SAT_VB=3)
    node.fee_rate_sat_vb = 4
    node.fund([200_000])
    start_worker(anchoring)
    out = anchoring.cli("anchor", "submit", "--hash", doc("estimated").hex(), "--wait",
                        "--timeout", "15")
    assert out.returncode == 0, out.stderr
    tx = parse_tx(node.gettransaction(json.loads(out.stdout)["txid"])["hex"])
    fee = 200_000 - tx.vout[1].value
    assert 4 * vsize(tx) <= fee <= 4 * vsize(tx) + 4 and node.calls["estimatesmartfee"] >= 1


def test_verify_says_invalid_for_any_file_and_submit_wait_says_the_worker_is_down(
        make_bus, node, tmp_path) -> None:
    """`anchor verify` on a binary file or a JSON list printed a traceback;
    `anchor submit --wait` with no worker running waited silently."""
    anchoring = bus_for(make_bus, node)
    for name, content in (("binary", bytes(range(256))), ("list", b"[1]"),
                          ("null-path", b'{"format": "bus-anchor-proof/1", "path": null}')):
        path = tmp_path / name
        path.write_bytes(content)
        out = anchoring.cli("anchor", "verify", str(path))
        assert out.returncode == 1 and out.stderr.startswith("INVALID: "), (name, out.stderr)
        assert "Traceback" not in out.stderr
    waited = anchoring.cli("anchor", "submit", "--hash", "ab" * 32, "--wait", "--timeout", "2")
    assert waited.returncode == 1
    assert "waiting for the anchor worker at" in waited.stderr, waited.stderr
    assert "is bus-anchor running?" in waited.stderr and "not answering: anchor" in waited.stderr
