"""The anchor worker, as a real `bus-cli anchor` process on a real bus, with the
bitcoind double standing in for bitcoind (JSON-RPC and ZMQ hashblock)."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from anchor.bitcoind import op_return_outputs, parse_tx, vsize
from anchor.merkle import root_from_path
from anchor.proof import op_return_payload
from bus.client import Publisher, Subscriber
from tests.bitcoind_double import BitcoindDouble
from tests.conftest import Bus, Proc, query, wait_for

FAST = {"BUS_ANCHOR_INTERVAL_S": 0.5, "BUS_ANCHOR_CONFIRMATIONS": 2,
        "BUS_ANCHOR_BUMP_AFTER_BLOCKS": 2, "BUS_ANCHOR_FEE_RATE_SAT_VB": 2,
        "BUS_ANCHOR_BLOCK_POLL_S": 1, "BUS_ANCHOR_RETRY_MAX_S": 1, "BUS_ANCHOR_LEASE_S": 2,
        "BUS_REQUEST_TIMEOUT_MS": 1000}


def doc(n: int | str) -> bytes:
    return hashlib.sha256(f"document {n}".encode()).digest()


@pytest.fixture
def node() -> Iterator[BitcoindDouble]:
    double = BitcoindDouble()
    yield double
    double.close()


@pytest.fixture
def anchoring(make_bus: Any, node: BitcoindDouble) -> Bus:
    """A running bus whose settings point the anchor worker at the double."""
    bus = make_bus(BUS_BITCOIND_RPC_URL=node.url, BUS_BITCOIND_RPC_USER=node.user,
                   BUS_BITCOIND_RPC_PASSWORD=node.password,
                   BUS_BITCOIND_ZMQ_HASHBLOCK=node.zmq_endpoint, **FAST)
    return bus.start()


def start_worker(bus: Bus) -> Proc:
    worker = bus.run("anchor")
    wait_for(lambda: any(e.get("event") == "wallet_loaded" for e in worker.log_events())
             or worker.popen.poll() is not None, message="the wallet loaded")
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


def submitted_docs(events: Events) -> dict[bytes, dict]:
    return {d["hash"]: {**d, "root": e["root"], "txid": e["txid"], "size": e["tree_size"]}
            for e in events.of("anchor.submitted") for d in e["documents"]}


def anchor_rows(bus: Bus) -> list[tuple]:
    return query(bus.db, "SELECT id, txid, status, size FROM anchors ORDER BY id")


def test_requests_are_anchored_proved_confirmed_and_verified(anchoring: Bus, node, tmp_path) -> None:
    node.fund([200_000, 300_000, 400_000])
    events = Events(anchoring)
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
        assert op_return_payload(root_from_path(h, d["leaf_index"], d["size"], d["path"])) == data
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
    assert ok.returncode == 0 and ok.stdout.startswith("OK: proof and transaction"), ok
    proof["leaf_index"] += 1
    path.write_text(json.dumps(proof))
    bad = anchoring.cli("anchor", "verify", str(path), "--tx-hex", tx.serialize().hex())
    assert bad.returncode == 1 and "INVALID: the audit path leads to" in bad.stderr
    missing = anchoring.cli("anchor", "proof", doc("never").hex())
    assert missing.returncode == 1 and "is not anchored" in missing.stderr
    events.close()
