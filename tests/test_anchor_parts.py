"""The anchor worker's parts, stepped in-process with an explicit `now`: no
worker process, no bus. bitcoind is the double (tests/bitcoind_double.py,
JSON-RPC over loopback from a thread of this process); the writer is a
double of its `anchor_*`/`utxo_*` commands (WriterDouble, below: the
records as the writer keeps them, the status moves it allows). The worker
as a process, against a real writer and a real Core too, is
tests/test_anchor.py's and tests/test_anchor_node.py's."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from anchor.bitcoind import BitcoinRpc, to_sat
from anchor.requests import Document
from anchor.reservations import NoUtxo, UtxoClient
from anchor.worker import AnchorWorker
from bus import protocol
from bus.client import BusError
from bus.config import BusConfig, load_config
from bus.protocol import ANCHOR_UNCONFIRMED, AnchorStatus, Message
from proofs.merkle import root_from_path
from tests.bitcoind_double import BitcoindDouble

SETTINGS = {"BUS_ANCHOR_INTERVAL_S": "5", "BUS_ANCHOR_MAX_DOCUMENTS": "3",
            "BUS_ANCHOR_CONFIRMATIONS": "2", "BUS_ANCHOR_BUMP_AFTER_BLOCKS": "2",
            "BUS_ANCHOR_FEE_RATE_SAT_VB": "2", "BUS_ANCHOR_LEASE_S": "30"}


def doc(n: int) -> Document:
    return Document(hashlib.sha256(b"document %d" % n).digest(), f"ref-{n}", 100 + n)


class WriterDouble:
    """The writer's side of UtxoClient for the anchor parts: UTXO leases
    from the wallet's outputs, anchor records with the writer's status moves
    (writer/anchors.py), replies in the writer's shapes."""

    def __init__(self, node: BitcoindDouble) -> None:
        self.pool = {(u["txid"], u["vout"]): {"txid": u["txid"], "vout": u["vout"],
                                              "amount_sat": to_sat(u["amount"]),
                                              "address": u["address"],
                                              "script_pubkey": u["scriptPubKey"]}
                     for u in node.listunspent(0)}
        self.leased: dict[str, dict[str, Any]] = {}
        self.anchors: dict[int, dict[str, Any]] = {}
        self.leaves: dict[int, list[list[Any]]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(1)

    # --- UtxoClient's interface -----------------------------------------------------

    def reserve(self, min_amount_sat: int, lease_seconds: float, **_options: Any
                ) -> dict[str, Any]:
        fits = sorted((u for u in self.pool.values() if u["amount_sat"] >= min_amount_sat),
                      key=lambda u: u["amount_sat"])
        if not fits:
            raise NoUtxo("no UTXO of that amount", protocol.NO_UTXO)
        utxo = self.pool.pop((fits[0]["txid"], fits[0]["vout"]))
        lease = {**utxo, "lease_id": f"lease-{next(self._ids)}"}
        self.leased[lease["lease_id"]] = lease
        return dict(lease)

    def release(self, lease_id: str) -> bool:
        lease = self.leased.pop(lease_id)
        self.pool[(lease["txid"], lease["vout"])] = lease
        return True

    def renew(self, lease_id: str, lease_seconds: float) -> dict[str, Any]:
        return {"lease_id": lease_id}

    def remove(self, outpoints: list[tuple[str, int]], spending_txid: str | None = None) -> int:
        return sum(self.pool.pop(tuple(p), None) is not None for p in outpoints)

    def get(self, txid: str, vout: int) -> dict[str, Any]:
        return next(dict(u) for u in self.leased.values()
                    if (u["txid"], u["vout"]) == (txid, vout))

    def call(self, cmd: str, args: dict[str, Any]) -> Any:
        self.calls.append((cmd, args))
        return getattr(self, cmd)(args)

    # --- the anchor_* commands ------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        raise BusError(reason, protocol.BAD_REQUEST)

    def anchor_record(self, args: dict[str, Any]) -> dict[str, Any]:
        lease = self.leased[args["lease_id"]]
        anchor_id = next(self._ids)
        self.anchors[anchor_id] = {
            "anchor_id": anchor_id, "root": args["root"], "size": args["size"],
            "txid": args["txid"], "raw_tx": args["raw_tx"], "fee_sat": args["fee_sat"],
            "vsize": args["vsize"], "lease_id": args["lease_id"], "utxo_txid": lease["txid"],
            "utxo_vout": lease["vout"], "replaced_txids": [], "status": AnchorStatus.SIGNED,
            "broadcast_height": args["tip_height"], "block_hash": None, "block_height": None}
        self.leaves[anchor_id] = args["documents"]
        return {"anchor_id": anchor_id, "txid": args["txid"]}

    def anchor_update(self, args: dict[str, Any]) -> dict[str, Any]:
        anchor = self.anchors[args["anchor_id"]]
        status = args["status"]
        allowed = {AnchorStatus.SUBMITTED: OPEN, ANCHOR_UNCONFIRMED: (AnchorStatus.CONFIRMED,),
                   AnchorStatus.CONFIRMED: (*OPEN, AnchorStatus.CONFIRMED)}[status]
        if anchor["status"] not in allowed:
            self._refuse(f"anchor {anchor['anchor_id']} is {anchor['status']}: it cannot"
                         f" become {status}")
        if status == AnchorStatus.CONFIRMED:
            anchor.update(status=AnchorStatus.CONFIRMED, txid=args["txid"],
                          block_hash=args["block_hash"], block_height=args["block_height"])
        else:
            anchor.update(status=AnchorStatus.SUBMITTED, block_hash=None, block_height=None)
        return {"anchor_id": anchor["anchor_id"], "status": anchor["status"]}

    def anchor_replace(self, args: dict[str, Any]) -> dict[str, Any]:
        anchor = self.anchors[args["anchor_id"]]
        if anchor["status"] not in OPEN or args["fee_sat"] <= anchor["fee_sat"]:
            self._refuse("not a replacement")
        replaced = anchor["txid"]
        anchor.update(txid=args["txid"], raw_tx=args["raw_tx"], fee_sat=args["fee_sat"],
                      vsize=args["vsize"], replaced_txids=anchor["replaced_txids"] + [replaced],
                      status=AnchorStatus.SIGNED, broadcast_height=args["tip_height"])
        return {"anchor_id": anchor["anchor_id"], "txid": args["txid"], "replaced_txid": replaced}

    def anchor_fail(self, args: dict[str, Any]) -> dict[str, Any]:
        anchor = self.anchors[args["anchor_id"]]
        if anchor["status"] != AnchorStatus.SIGNED:
            self._refuse("only a transaction never accepted can fail")
        anchor["status"] = AnchorStatus.FAILED
        del self.leaves[anchor["anchor_id"]]
        return {"anchor_id": anchor["anchor_id"], "status": AnchorStatus.FAILED}

    def anchor_open(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"anchors": [dict(a) for a in self.anchors.values() if a["status"] in OPEN]}

    def anchor_confirmed(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"anchors": [dict(a) for a in self.anchors.values()
                            if a["status"] == AnchorStatus.CONFIRMED
                            and a["block_height"] >= args["min_height"]]}

    def anchor_leaves(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"leaves": self.leaves[args["anchor_id"]]}

    def audit_unanchored(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {"seals": []}

    def anchor_known(self, args: dict[str, Any]) -> dict[str, Any]:
        anchored = {leaf[0] for leaves in self.leaves.values() for leaf in leaves}
        return {"known": [h for h in args["hashes"] if h in anchored]}


OPEN = protocol.OPEN_ANCHOR_STATUSES


class EventLog:
    """A Publisher's interface for AnchorEvents: what was published, decoded."""

    unacked = 0

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        self.events.append((topic, msgpack.unpackb(payload, raw=False)))

    def flush(self, timeout: float | None = None) -> None:
        pass

    def of(self, topic: str) -> list[dict[str, Any]]:
        return [body for t, body in self.events if t == topic]


class Acks:
    """The durable subscriber's interface for RequestIntake: the acks it was given."""

    def __init__(self) -> None:
        self.acked: list[Any] = []

    def ack(self, message: Any) -> None:
        self.acked.append(message)


class SyncDouble:
    """WalletSync's interface for the worker's pass: the wallet tip is the node's."""

    def __init__(self, node: BitcoindDouble) -> None:
        self.node = node
        self.tip_height, self.tip_hash = 0, None
        self.counters: dict[str, int] = {}

    def sync(self) -> bool:
        moved = self.tip_hash != self.node.getbestblockhash()
        self.tip_height, self.tip_hash = self.node.getblockcount(), self.node.getbestblockhash()
        return moved


class Parts:
    """The parts as the worker wires them (AnchorWorker.assemble), on the doubles."""

    def __init__(self, node: BitcoindDouble, **settings: str) -> None:
        self.node = node
        self.config: BusConfig = load_config(env={**SETTINGS, **settings})
        self.worker = AnchorWorker(self.config)
        self.rpc = BitcoinRpc(node.url, node.user, node.password)
        self.writer = WriterDouble(node)
        self.worker.assemble(self.rpc, self.writer, hashblock=None)
        self.worker.sync = SyncDouble(node)
        self.published = self.worker.events.publisher = EventLog()
        self.worker.intake.requests = Acks()
        self.counters = self.worker.counters
        self.intake = self.worker.intake
        self.ledger = self.worker.ledger
        self.transactions = self.worker.transactions
        self.confirmations = self.worker.confirmations
        self.blocks = self.worker.blocks

    @property
    def tip(self) -> int:
        return self.node.getblockcount()

    def anchor(self, docs: list[Document], now: float) -> dict[str, Any]:
        """Record and broadcast one anchor of `docs`, as the worker does."""
        anchor = self.transactions.record(docs, self.tip)
        self.transactions.broadcast(anchor, now)
        return anchor

    def work(self, now: float) -> None:
        """The worker's pass after its wait for requests, at `now`."""
        self.worker._work(lambda: now)

    def close(self) -> None:
        self.rpc.close()


@pytest.fixture
def node() -> Iterator[BitcoindDouble]:
    """The double, in this process (not conftest's `node`: these tests use what
    only the double does: miners leaving a transaction out, a double spend)."""
    double = BitcoindDouble()
    double.fund([100_000, 200_000])
    yield double
    double.close()


@pytest.fixture
def parts(node: BitcoindDouble) -> Iterator[Parts]:
    built = Parts(node)
    yield built
    built.close()


def request(n: int, payload: bytes | None = None) -> Message:
    d = doc(n)
    return Message(protocol.ANCHOR_REQUEST_TOPIC,
                   payload if payload is not None else msgpack.packb({"hash": d.hash,
                                                                     "ref": d.ref}),
                   id=d.message_id)


# --- request intake -------------------------------------------------------------------


def test_a_batch_is_due_after_the_interval_or_when_full(parts: Parts) -> None:
    intake = parts.intake
    assert intake.due_at() is None and not intake.due(1000.0)
    intake.accept(request(1), now=100.0)
    intake.accept(request(1), now=101.0)             # a repeat: counted, not kept
    assert len(intake) == 1 and parts.counters["duplicates"] == 1
    assert intake.due_at() == 105.0                  # BUS_ANCHOR_INTERVAL_S after the first
    assert not intake.due(104.9) and intake.due(105.0)
    intake.accept(request(2), now=102.0)
    intake.accept(request(3), now=102.0)             # BUS_ANCHOR_MAX_DOCUMENTS: 3
    assert intake.full and intake.due(102.0)


def test_a_bad_request_is_refused_with_an_event(parts: Parts) -> None:
    parts.intake.accept(request(1, payload=b"not a request"), now=1.0)
    assert len(parts.intake) == 0 and parts.counters["refused"] == 1
    [error] = parts.published.of(protocol.ANCHOR_ERROR_TOPIC)
    assert error["error"] == protocol.BAD_REQUEST and error["message_id"] == 101


def test_a_done_batch_moves_the_position_past_its_newest_request(parts: Parts) -> None:
    intake = parts.intake
    for n in (1, 2, 3):
        intake.accept(request(n), now=10.0)
    intake.done(intake.batch()[:2], now=20.0)        # two recorded, one left to wait
    assert [d.hash for d in intake.pending] == [doc(3).hash]
    assert intake.requests.acked == [102] and intake.since == 20.0
    intake.done(intake.batch(), now=30.0)
    assert intake.requests.acked[-1].id == 103 and intake.due_at() is None


# --- transactions -----------------------------------------------------------------------


def test_a_batch_is_recorded_before_it_is_broadcast(parts: Parts, node: BitcoindDouble) -> None:
    docs = [doc(1), doc(2)]
    anchor = parts.transactions.record(docs, parts.tip)
    assert parts.writer.anchors[anchor["anchor_id"]]["status"] == AnchorStatus.SIGNED
    assert anchor["txid"] not in node.mempool        # recorded, not yet sent
    parts.transactions.broadcast_signed(now=1.0)
    assert anchor["txid"] in node.mempool
    assert parts.writer.anchors[anchor["anchor_id"]]["status"] == AnchorStatus.SUBMITTED
    [submitted] = parts.published.of(protocol.ANCHOR_SUBMITTED_TOPIC)
    assert submitted["txid"] == anchor["txid"] and submitted["tree_size"] == 2
    for leaf in submitted["documents"]:
        assert root_from_path(leaf["hash"], leaf["leaf_index"], 2, leaf["path"]) == anchor["root"]
    assert parts.counters["broadcasts"] == 1 and parts.transactions.last_broadcast["txid"] \
        == anchor["txid"]


def test_a_refused_first_transaction_fails_and_its_documents_wait_again(
        parts: Parts, node: BitcoindDouble) -> None:
    anchor = parts.transactions.record([doc(1)], parts.tip)
    # Before the broadcast, its coin's payment leaves the chain for good.
    node.invalidateblock(node.gettransaction(anchor["utxo_txid"])["blockhash"])
    node.double_spend(anchor["utxo_txid"])
    parts.transactions.broadcast(anchor, now=50.0)   # -25: inputs missing or spent
    assert parts.writer.anchors[anchor["anchor_id"]]["status"] == AnchorStatus.FAILED
    assert len(parts.ledger) == 0 and parts.counters["failed"] == 1
    assert [d.hash for d in parts.intake.pending] == [doc(1).hash]
    assert parts.intake.since == 50.0
    [error] = parts.published.of(protocol.ANCHOR_ERROR_TOPIC)
    assert error["error"] == "transaction_refused" and error["documents"] == 1


def test_an_unmined_transaction_is_bumped_after_bump_after_blocks(
        parts: Parts, node: BitcoindDouble) -> None:
    node.mine_min_fee_rate = 100                     # miners leave the anchor out
    anchor = parts.anchor([doc(1)], now=0.0)
    first_txid, first_fee = anchor["txid"], anchor["fee_sat"]
    node.mine(1)
    parts.confirmations.step(parts.tip, now=10.0)    # 1 block of BUS_ANCHOR_BUMP_AFTER_BLOCKS 2
    assert parts.counters["bumps"] == 0 and anchor["txid"] == first_txid
    node.mine(1)
    parts.confirmations.step(parts.tip, now=20.0)
    assert parts.counters["bumps"] == 1
    assert anchor["txid"] != first_txid and anchor["replaced_txids"] == [first_txid]
    assert anchor["fee_sat"] > first_fee and anchor["status"] == AnchorStatus.SUBMITTED
    assert anchor["txid"] in node.mempool and first_txid not in node.mempool  # replaced (RBF)
    assert parts.writer.anchors[anchor["anchor_id"]]["txid"] == anchor["txid"]
    [_first, bumped] = parts.published.of(protocol.ANCHOR_SUBMITTED_TOPIC)
    assert bumped["replaces"] == first_txid


def test_an_anchor_is_confirmed_at_n_confirmations(parts: Parts, node: BitcoindDouble) -> None:
    anchor = parts.anchor([doc(1), doc(2)], now=0.0)
    [block] = node.mine(1)
    parts.confirmations.step(parts.tip, now=1.0)     # 1 of BUS_ANCHOR_CONFIRMATIONS 2
    assert parts.counters["confirmed"] == 0 and len(parts.ledger) == 1
    node.mine(1)
    parts.confirmations.step(parts.tip, now=2.0)
    assert parts.counters["confirmed"] == 1 and len(parts.ledger) == 0
    record = parts.writer.anchors[anchor["anchor_id"]]
    assert record["status"] == AnchorStatus.CONFIRMED and record["block_hash"] == block
    [confirmed] = parts.published.of(protocol.ANCHOR_CONFIRMED_TOPIC)
    assert confirmed == {"anchor_id": anchor["anchor_id"], "txid": anchor["txid"],
                         "root": anchor["root"], "tree_size": 2, "block_hash": block,
                         "block_height": record["block_height"], "confirmations": 2}


def test_a_reorg_recheck_finds_the_anchors_block_gone(parts: Parts,
                                                       node: BitcoindDouble) -> None:
    anchor = parts.anchor([doc(1)], now=0.0)
    [block, _] = node.mine(2)
    parts.confirmations.step(parts.tip, now=1.0)
    assert parts.writer.anchors[anchor["anchor_id"]]["block_hash"] == block
    node.invalidateblock(block)                      # the anchor is back in the mempool
    parts.confirmations.recheck_confirmed(parts.tip)
    assert parts.counters["reorged"] == 1
    record = parts.writer.anchors[anchor["anchor_id"]]
    assert record["status"] == AnchorStatus.SUBMITTED and record["block_hash"] is None
    assert parts.ledger.get(anchor["anchor_id"])["status"] == AnchorStatus.SUBMITTED
    assert ("anchor_update", {"anchor_id": anchor["anchor_id"], "status": ANCHOR_UNCONFIRMED}
            ) in parts.writer.calls
    [error] = parts.published.of(protocol.ANCHOR_ERROR_TOPIC)
    assert error["error"] == "reorged" and error["txid"] == anchor["txid"]
    # Tracked again: confirmed anew in the block that holds it now.
    [new_block, _] = node.mine(2)
    parts.confirmations.step(parts.tip, now=2.0)
    record = parts.writer.anchors[anchor["anchor_id"]]
    assert record["status"] == AnchorStatus.CONFIRMED and record["block_hash"] == new_block
    assert len(parts.ledger) == 0 and parts.counters["confirmed"] == 2


def test_a_recorded_anchor_is_found_mined_when_broadcast_again(
        parts: Parts, node: BitcoindDouble) -> None:
    """A restart after the anchor was mined and its change spent: bitcoind
    answers -25 to the rebroadcast; the chain tells it was mined."""
    anchor = parts.anchor([doc(1)], now=0.0)
    node.mine(1)
    change_spend = node.sendtoaddress(node.new_address(), 0.0005)  # spends the anchor's change
    node.mine(1)
    assert change_spend in node.block_txids(node.getbestblockhash())
    anchor["status"] = AnchorStatus.SIGNED           # as the writer's record of a lost reply
    parts.writer.anchors[anchor["anchor_id"]]["status"] = AnchorStatus.SIGNED
    parts.blocks.due = False
    parts.transactions.broadcast(anchor, now=5.0)
    assert parts.blocks.due and parts.counters["failed"] == 0
    assert parts.writer.anchors[anchor["anchor_id"]]["status"] == AnchorStatus.SUBMITTED


# --- the worker's pass, stepped --------------------------------------------------------


def test_the_worker_pass_anchors_a_due_batch_and_confirms_it(parts: Parts,
                                                             node: BitcoindDouble) -> None:
    parts.intake.accept(request(1), now=100.0)
    parts.intake.accept(request(2), now=101.0)
    parts.work(now=104.0)                            # BUS_ANCHOR_INTERVAL_S 5: not yet
    assert parts.worker._ready and parts.counters["anchored"] == 0 and len(node.mempool) == 0
    parts.work(now=105.0)
    assert parts.counters["anchored"] == 1 and parts.counters["broadcasts"] == 1
    [anchor] = parts.writer.anchors.values()
    assert anchor["txid"] in node.mempool and anchor["status"] == AnchorStatus.SUBMITTED
    assert len(parts.intake) == 0 and parts.intake.requests.acked[-1].id == 102
    node.mine(2)
    parts.work(now=106.0)                            # no block seen yet: nothing checked
    assert parts.counters["confirmed"] == 0
    parts.blocks.wake()                              # as hashblock, or the poll, would
    parts.work(now=107.0)
    assert parts.counters["blocks"] == 1 and parts.counters["confirmed"] == 1
    assert anchor["status"] == AnchorStatus.CONFIRMED and len(parts.ledger) == 0


def test_a_batch_anchored_before_is_not_anchored_again(parts: Parts,
                                                       node: BitcoindDouble) -> None:
    """A record whose reply was lost: its documents come back as known, and the
    writer's open anchor (signed) is the one broadcast."""
    recorded = parts.transactions.record([doc(1)], parts.tip)
    parts.ledger.anchors.clear()                     # the reply never came
    parts.intake.accept(request(1), now=0.0)
    parts.work(now=10.0)
    assert parts.counters["anchored"] == 1 and parts.counters["duplicates"] == 1
    assert recorded["txid"] in node.mempool and len(parts.writer.anchors) == 1
    assert parts.intake.requests.acked[-1].id == 101


# --- the writer client's retry ----------------------------------------------------------


class BusyWriter:
    """ControlClient's interface: `unavailable` a number of times, then a reply."""

    def __init__(self, busy: int) -> None:
        self.busy = busy
        self.sent = 0

    def request(self, cmd: str, args: dict[str, Any]) -> Any:
        self.sent += 1
        if self.sent <= self.busy:
            raise BusError("database write failed; retry", protocol.UNAVAILABLE)
        return {"cmd": cmd}

    def close(self) -> None:
        pass


def client_on(writer: BusyWriter, retry_for_s: float, stop_after: int | None = None
              ) -> tuple[UtxoClient, list[float]]:
    """A UtxoClient on `writer` whose clock moves only by its pauses."""
    clock = [0.0]
    pauses: list[float] = []

    def pause(seconds: float) -> bool:
        pauses.append(seconds)
        clock[0] += seconds
        return stop_after is None or len(pauses) < stop_after

    client = UtxoClient("inproc://unused", retry_for_s=retry_for_s, clock=lambda: clock[0],
                        pause=pause)
    client._control.close()
    client._control = writer
    return client, pauses


def test_a_busy_writer_is_asked_again_backing_off_to_a_deadline() -> None:
    client, pauses = client_on(BusyWriter(busy=5), retry_for_s=10.0)
    assert client.call("utxo_tip", {}) == {"cmd": "utxo_tip"}
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8] and client.retries == 5
    client, pauses = client_on(BusyWriter(busy=100), retry_for_s=2.0)
    with pytest.raises(BusError) as refused:
        client.call("utxo_tip", {})
    assert refused.value.code == protocol.UNAVAILABLE
    assert sum(pauses) < 2.0 and pauses == [0.05, 0.1, 0.2, 0.4, 0.8]  # the next would pass it


def test_a_pause_ended_by_a_stop_ends_the_retries() -> None:
    writer = BusyWriter(busy=100)
    client, pauses = client_on(writer, retry_for_s=30.0, stop_after=2)
    with pytest.raises(BusError) as refused:
        client.call("utxo_tip", {})
    assert refused.value.code == protocol.UNAVAILABLE
    assert len(pauses) == 2 and writer.sent == 2
