"""Anchoring against the unkind parts of a real bitcoind (issue 14): kept-alive
connections the node closes, refused credentials, lost writer replies, spent
outputs of a mined anchor, reorgs, a wallet shared with other spends. Each
test failed on the code before its fix. Each runs against a real regtest
Bitcoin Core and the bitcoind double, except those marked double_only (a call
held in flight or slowed down: what only the double does on demand)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from anchor.bitcoind import BitcoinRpc, RpcAuthRefused, RpcUnavailable, to_sat
from tests.bitcoind_double import OUTSIDE_ADDRESS, BitcoindDouble
from tests.conftest import BUS_CLI, Bus, Proc, query, wait_for
from tests.test_anchor import (anchor_rows, anchoring, bus_for, doc, events,  # noqa: F401
                               request, start_worker)
from tests.test_wallet_sync import sync, table  # noqa: F401


def test_a_connection_the_node_closed_while_idle_is_opened_again_once() -> None:
    """bitcoind closes a connection idle for -rpcservertimeout; the client
    kept it and failed about every other 30 s poll with a broken pipe.
    On the double only: it counts the connections it closed, and closes them
    after 0.2 s (Core's -rpcservertimeout is whole seconds)."""
    node = BitcoindDouble(rpcservertimeout=0.2)
    try:
        rpc = BitcoinRpc(node.url, node.user, node.password)
        for _ in range(3):
            assert rpc.call("getblockcount") == 0
            closed = node.idle_closed
            wait_for(lambda: node.idle_closed > closed, message="the node closing the idle one")
        assert rpc.call("getblockcount") == 0
        assert node.calls["getblockcount"] == 4
        rpc.close()
    finally:
        node.close()


def test_refused_credentials_are_one_clear_error_and_the_worker_stops_for_good(
        make_bus, node) -> None:
    """A 401 was "bitcoind unavailable", retried forever."""
    with pytest.raises(RpcAuthRefused, match=r"refused the RPC credentials \(HTTP 401\): check "
                                             "BUS_BITCOIND_RPC_USER"):
        BitcoinRpc(node.url, node.user, "wrong").call("getblockcount")
    bus = bus_for(make_bus, node, BUS_BITCOIND_RPC_PASSWORD="wrong")
    worker = bus.run("anchor")
    assert worker.popen.wait(30) == 78  # EX_CONFIG: its unit does not restart it
    errors = [e for e in worker.log_events() if e.get("level") == "error"]
    assert [e["event"] for e in errors] == ["cannot_start"]
    assert "refused the RPC credentials (HTTP 401)" in errors[0]["error"]


class LossyControl:
    """A relay in front of the writer's control endpoint (ROUTER -> DEALER, as
    zmq.proxy) that loses the replies to one command for a while: the writer
    has committed, the worker never hears it, and its retries for
    3 x BUS_REQUEST_TIMEOUT_MS run out."""

    def __init__(self, writer_endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.back = self.ctx.socket(zmq.DEALER)
        self.back.connect(writer_endpoint)
        self.losing: dict[str, float] = {}   # command -> lose its replies until (monotonic)
        self.lost: Counter[str] = Counter()
        self._asked: dict[bytes, str] = {}   # REQ identity -> command in flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def lose(self, cmd: str, seconds: float) -> None:
        self.losing[cmd] = time.monotonic() + seconds

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(50):
                frames = sock.recv_multipart()
                if sock is self.front:
                    self._asked[frames[0]] = msgpack.unpackb(frames[-1], raw=False)["cmd"]
                    self.back.send_multipart(frames)
                    continue
                cmd = self._asked.pop(frames[0], "")
                if time.monotonic() < self.losing.get(cmd, 0.0):
                    self.lost[cmd] += 1
                    continue
                self.front.send_multipart(frames)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.front.close(linger=0)
        self.back.close(linger=0)
        self.ctx.term()


@pytest.fixture
def lossy(anchoring: Bus) -> Iterator[LossyControl]:
    relay = LossyControl(anchoring["BUS_CONTROL_ENDPOINT"])
    yield relay
    relay.close()


def start_worker_through(bus: Bus, relay: LossyControl) -> Proc:
    """The anchor worker, asking the writer through the relay."""
    worker = bus.spawn([BUS_CLI, "anchor"], env={"BUS_CONTROL_ENDPOINT": relay.endpoint})
    wait_for(lambda: any(e.get("event") == "anchor_ready" for e in worker.log_events())
             or worker.popen.poll() is not None, message="the worker ready")
    assert worker.popen.poll() is None, worker.stderr.collect()[-10:]
    return worker


def test_a_lost_record_reply_still_broadcasts_the_recorded_anchor(anchoring, node, events,
                                                                   lossy) -> None:
    """The retry found the documents anchored and dropped them as duplicates:
    the recorded anchor stayed signed and never went out until a restart."""
    node.fund([200_000])
    worker = start_worker_through(anchoring, lossy)
    lossy.lose("anchor_record", 4.0)  # past the worker's 3 s of retries
    request(anchoring, doc("lost-1"), doc("lost-2"))
    wait_for(lambda: lossy.lost["anchor_record"], message="a record reply lost")
    [(anchor_id, txid, _, size)] = wait_for(lambda: anchor_rows(anchoring))
    wait_for(lambda: txid in node.mempool, timeout=20, message="the recorded transaction sent")
    assert size == 2 and events.wait("anchor.submitted")[0]["txid"] == txid
    assert wait_for(lambda: anchor_rows(anchoring)[0][2] == "submitted" and anchor_rows(anchoring))
    assert node.calls["sendrawtransaction"] == 1 and worker.popen.poll() is None


def test_a_lost_fee_bump_reply_never_sends_a_transaction_other_than_the_recorded_one(
        anchoring, node, events, lossy) -> None:
    """The next bump took the txid from the stored reply and raw_tx from a new
    build: the database named a transaction never sent, the one sent was mined
    unknown to the bus, and the anchor never confirmed."""
    node.fund([200_000])
    node.mine_min_fee_rate = 2.5    # the first transaction (2 sat/vB) stays in the mempool
    start_worker_through(anchoring, lossy)
    request(anchoring, doc("bump"))
    first = events.wait("anchor.submitted")[0]["txid"]
    lossy.lose("anchor_replace", 4.0)
    node.mine(2)                    # BUS_ANCHOR_BUMP_AFTER_BLOCKS=2: a bump, its reply lost
    wait_for(lambda: lossy.lost["anchor_replace"], message="a bump reply lost")
    node.mine(1)                    # the bump is tried again after the worker gave up
    wait_for(lambda: first not in node.mempool and node.mempool, timeout=20,
             message="a replacement in the mempool")
    [(recorded, status)] = query(anchoring.db, "SELECT txid, status FROM anchors")
    assert node.mempool == [recorded], "the mempool holds the recorded transaction, no other"
    node.mine_min_fee_rate = 0
    node.mine(2)
    confirmed = events.wait("anchor.confirmed")[0]
    assert confirmed["txid"] == recorded
    assert query(anchoring.db, "SELECT txid, status FROM anchors") == [(recorded, "confirmed")]


@pytest.mark.double_only("holds sendrawtransaction in flight while the worker is killed")
def test_a_mined_anchor_whose_change_is_spent_is_not_failed_on_rebroadcast(
        anchoring, node, events) -> None:
    """After a crash between sendrawtransaction and its record, the restart
    sends again; once the change is spent bitcoind answers -25 (the OP_RETURN
    is never in the UTXO set), and the anchor was failed, its documents
    anchored again: paid twice."""
    node.fund([200_000])
    node.hold("sendrawtransaction")
    worker = start_worker(anchoring)
    request(anchoring, doc("once-a"), doc("once-b"))
    wait_for(lambda: node.held["sendrawtransaction"], message="the worker broadcasting")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    node.release("sendrawtransaction")          # the node takes it; the worker never knew
    [(_, txid, status, _)] = anchor_rows(anchoring)
    wait_for(lambda: txid in node.mempool, message="the transaction in the mempool")
    assert status == "signed"
    node.mine(1)
    # The wallet spends the anchor's change (an operator's payment, or the next anchor).
    with node.lock:
        [change] = [u for u in node.listunspent() if u["txid"] == txid]
        raw = node.createrawtransaction([{"txid": txid, "vout": change["vout"]}],
                                        [{node.new_address(): change["amount"] - 0.00001}])
        node.sendrawtransaction(node.signrawtransactionwithwallet(raw)["hex"])
    node.mine(1)
    again = start_worker(anchoring)
    try:
        confirmed = events.wait("anchor.confirmed")[0]
    except BaseException:
        print("\n".join(json.dumps(e) for e in again.log_events()[-25:]))
        raise
    assert confirmed["txid"] == txid
    assert [row[1:3] for row in anchor_rows(anchoring)] == [(txid, "confirmed")]
    assert not events.of("anchor.error"), "no anchor failed, nothing anchored twice"


def test_a_stored_tip_the_node_does_not_know_is_a_full_load_again(sync, node) -> None:
    """listsinceblock answers -5 "Block not found" before the fork search ran:
    the sync stopped for good (a wiped regtest datadir, a deep reorg)."""
    ws, bus = sync
    node.fund([10_000, 20_000])
    ws.sync()
    assert len(table(bus)) == 2
    ws.utxos.set_tip(ws.tip_height, "ab" * 32)  # as if the node's chain were another
    ws.tip_hash = "ab" * 32
    node.fund([30_000])
    assert ws.sync() is True
    assert ws.counters["tip_unknown"] == 1 and ws.tip_hash == node.getbestblockhash()
    assert {row[2] for row in table(bus)} == {10_000, 20_000, 30_000}
    assert ws.sync() is False  # and incremental from there on
    node.mine(1)
    assert ws.sync() is True and ws.counters["full_loads"] == 2


def test_outputs_the_wallet_would_not_spend_never_enter_the_pool(sync, node) -> None:
    """safe was ignored: an unconfirmed payment from outside was reserved."""
    ws, bus = sync
    node.fund([300_000])
    node.fund([400_000], confirmations=0)     # unconfirmed, from outside: not safe
    ws.sync()
    assert {row[2] for row in table(bus)} == {300_000}
    node.mine(1)                              # confirmed: safe now, and loaded
    ws.sync()
    assert {row[2] for row in table(bus)} == {300_000, 400_000}


def test_an_output_the_wallet_cannot_sign_for_is_tried_once_and_leaves_the_pool(
        anchoring, node, events) -> None:
    """Core lists every output of a descriptor wallet "spendable", and one of a
    watched key "solvable", keys or not (the double said false to both, and
    the sync's filter kept such outputs out): it enters the pool. Reserved, it
    cannot be signed for: it must leave the pool, and the anchor be made
    from another output, not be tried again and again."""
    node.fund([150_000], watch_only=True)     # the smallest that is enough: picked first
    node.fund([300_000])
    listed = {to_sat(u["amount"]): (u["spendable"], u["solvable"])
              for u in node.listunspent()}
    assert listed == {150_000: (True, True), 300_000: (True, True)}
    start_worker(anchoring)
    request(anchoring, doc("signable"))
    [submitted] = events.wait("anchor.submitted")
    assert query(anchoring.db, "SELECT amount_sat FROM utxos WHERE spent_txid = ?",
                 (submitted["txid"],)) == [(300_000,)]
    [failed] = events.wait("anchor.error", lambda e: e["error"] == "build_failed")
    assert "cannot sign for UTXO" in failed["reason"]
    assert query(anchoring.db, "SELECT status FROM utxos WHERE amount_sat = 150000") == [(2,)]
    node.fund([160_000])                      # a block: the worker syncs again
    request(anchoring, doc("signable again"))
    wait_for(lambda: len(events.of("anchor.submitted")) == 2, message="a second anchor")
    assert len(events.of("anchor.error")) == 1, "the unsignable output was not tried again"


def test_a_coinbase_output_joins_the_pool_when_it_matures(sync, node) -> None:
    """The incremental sync asked only for outputs as deep as the blocks since
    the last sync; a coinbase is listed from 101 confirmations on: never seen."""
    ws, bus = sync
    node.fund([10_000])
    ws.sync()
    [coinbase_block] = node.generatetoaddress(1, node.getnewaddress())
    coinbase = node.block_txids(coinbase_block)[0]
    for _ in range(33):                       # 99 more blocks, synced every 3
        node.mine(3)
        ws.sync()
    assert coinbase not in {row[0] for row in table(bus)}, "immature at 100 confirmations"
    node.mine(1)
    ws.sync()
    assert (coinbase, 0, 50 * 100_000_000) in {row[:3] for row in table(bus)}


@pytest.mark.double_only("holds the worker's signrawtransactionwithwallet mid-build")
def test_a_leased_utxo_is_locked_in_the_wallet_against_its_other_spends(
        anchoring, node, events) -> None:
    """The wallet knew nothing of leases: an operator's payment from the same
    wallet could take the UTXO an anchor was being built on."""
    node.fund([100_000, 1_000_000])
    node.hold("signrawtransactionwithwallet")     # the worker mid-build, on 100,000
    start_worker(anchoring)
    request(anchoring, doc("locked"))
    wait_for(lambda: node.held["signrawtransactionwithwallet"], message="the worker building")
    [(leased_txid, leased_vout)] = query(anchoring.db, "SELECT txid, vout FROM utxos"
                                                       " WHERE status = 1")
    assert node.listlockunspent() == [{"txid": leased_txid, "vout": leased_vout}]
    with node.lock:                               # the operator pays someone 50,000
        payment = node.sendtoaddress(OUTSIDE_ADDRESS, 0.0005)
    assert [(i.txid.hex(), i.vout) for i in node.txs[payment].tx.vin] != \
        [(leased_txid, leased_vout)], "the payment took another coin"
    node.release("signrawtransactionwithwallet")
    anchored = events.wait("anchor.submitted")[0]["txid"]
    assert set(node.mempool) == {payment, anchored}, "neither replaced the other"
    assert node.listlockunspent() == [], "spending the UTXO unlocked it"


@pytest.mark.double_only("makes each of the worker's build calls take 0.8 s")
def test_a_lease_is_renewed_while_a_slow_node_builds_the_transaction(anchoring, node,
                                                                    events) -> None:
    """The lease (BUS_ANCHOR_LEASE_S=2 here) ran out during a slow build, since
    nothing called utxo_renew: the record was refused, again and again."""
    node.fund([200_000])
    for method in ("getrawchangeaddress", "createrawtransaction", "signrawtransactionwithwallet"):
        node.delays[method] = 0.8                 # 2.4 s a build: longer than the lease
    worker = start_worker(anchoring)
    request(anchoring, doc("slow build"))
    anchored = events.wait("anchor.submitted", message="anchored despite the slow node")
    assert anchored[0]["txid"] in node.mempool
    assert anchoring.request("BUS_ANCHOR_CONTROL_ENDPOINT", "stats")["counters"]["renewals"] >= 1
    assert anchoring.writer_stats()["utxos"]["renewed"] >= 1 and worker.popen.poll() is None


def test_a_reorg_deeper_than_the_confirmations_is_followed_after_confirmation(
        anchoring, node, events) -> None:
    """Confirmed anchors were never asked again: after a reorg deeper than
    BUS_ANCHOR_CONFIRMATIONS their block hash and height (and their proofs)
    named a block that had left the chain."""
    node.fund([200_000])
    start_worker(anchoring)
    request(anchoring, doc("reorged"))
    events.wait("anchor.submitted")
    node.mine(2)
    old_block = events.wait("anchor.confirmed")[0]["block_hash"]
    node.mine_min_fee_rate = 1_000            # the new chain leaves it in the mempool a while
    node.invalidateblock(old_block)           # both of its confirmations gone
    node.mine(3)
    assert wait_for(lambda: query(anchoring.db, "SELECT status, block_hash FROM anchors") ==
                    [("submitted", None)], message="the anchor unconfirmed")
    assert events.wait("anchor.error", lambda e: e["error"] == "reorged")
    node.mine_min_fee_rate = 0
    node.mine(2)
    [(txid, status, block_hash)] = wait_for(lambda: [
        row for row in query(anchoring.db, "SELECT txid, status, block_hash FROM anchors")
        if row[1] == "confirmed"], message="confirmed again")
    assert block_hash != old_block and txid in node.block_txids(block_hash)
    proof = json.loads(anchoring.cli("anchor", "proof", doc("reorged").hex()).stdout)
    assert (proof["status"], proof["block_hash"]) == ("confirmed", block_hash)


def test_verify_with_a_node_checks_the_block_and_says_what_it_did_not_check(
        anchoring, node, events, tmp_path) -> None:
    """`anchor verify` printed "OK: proof and transaction" without checking that
    the transaction was in any block."""
    node.fund([200_000])
    start_worker(anchoring)
    request(anchoring, doc("in a block"))
    events.wait("anchor.submitted")
    node.mine(2)
    block = events.wait("anchor.confirmed")[0]["block_hash"]
    path = tmp_path / "proof.json"
    path.write_text(anchoring.cli("anchor", "proof", doc("in a block").hex()).stdout)
    offline = anchoring.cli("anchor", "verify", str(path))
    assert offline.returncode == 0, offline.stderr
    assert "OK: the OP_RETURN data commits to that root and to a tree of 1 leaves" in offline.stdout
    assert "NOT CHECKED: that the proof's transaction carries that data" in offline.stdout
    assert "NOT CHECKED: that the transaction is in a block of the best chain" in offline.stdout
    online = anchoring.cli("anchor", "verify", str(path), "--node")
    assert online.returncode == 0, online.stderr
    assert f"OK: bitcoind holds it in block {block} at height" in online.stdout
    assert "carries that data in its one OP_RETURN" in online.stdout
    assert "NOT CHECKED" not in online.stdout
    # The block leaves the best chain: the same proof no longer holds there.
    node.mine_min_fee_rate = 1_000
    node.invalidateblock(block)
    node.mine(3)
    gone = anchoring.cli("anchor", "verify", str(path), "--node")
    assert gone.returncode == 1 and "is not in bitcoind's best chain" in gone.stderr, gone
    assert "Traceback" not in gone.stderr
    node.stop()
    down = anchoring.cli("anchor", "verify", str(path), "--node")
    assert down.returncode == 1 and "cannot check with the node" in down.stderr


def test_an_unloaded_wallet_holds_the_requests_until_it_is_loaded_again(anchoring, node,
                                                                       events) -> None:
    """Every wallet call answers -18 while bitcoind's wallet is not loaded
    (unloadwallet, a restart without it): the requests wait, the lease is
    given back, and they are anchored once it is loaded again."""
    node.fund([200_000])
    worker = start_worker(anchoring)
    node.unloadwallet("anchoring")
    request(anchoring, doc("unloaded"))
    wait_for(lambda: any(e.get("event") == "anchor_held_back" and "(code -18)" in e.get("error", "")
                         for e in worker.log_events()), message="the worker refused with -18")
    assert anchor_rows(anchoring) == []
    wait_for(lambda: query(anchoring.db, "SELECT status FROM utxos") == [(0,)],
             message="the lease given back")
    node.loadwallet("anchoring")
    [submitted] = events.wait("anchor.submitted", message="anchored once the wallet is back")
    assert submitted["txid"] in node.mempool and worker.popen.poll() is None
    assert anchoring.writer_stats()["utxos"]["errors"] == 0


@pytest.mark.double_only("Core is warming up (-28) only for a moment at its start")
def test_a_node_warming_up_holds_the_worker_until_it_answers(anchoring, node, events) -> None:
    """Every call answers -28 while bitcoind starts (a restart of the node):
    the worker waits, and anchors once it answers."""
    node.fund([200_000])
    worker = start_worker(anchoring)
    node.warmup = "Loading wallet…"
    request(anchoring, doc("warming up"))
    wait_for(lambda: any(e.get("event") == "anchor_held_back" and "(code -28)" in e.get("error", "")
                         for e in worker.log_events()), message="the worker refused with -28")
    assert worker.popen.poll() is None and anchor_rows(anchoring) == []
    node.warmup = None
    events.wait("anchor.submitted", message="anchored once the node is up")


@pytest.mark.node_options(rpcthreads=1, rpcworkqueue=1)
def test_a_full_rpc_work_queue_is_waited_out(anchoring, node, events) -> None:
    """HTTP 503 (no JSON-RPC body) while -rpcthreads calls run and
    -rpcworkqueue wait: the worker waits and anchors once there is room."""
    node.fund([200_000])
    worker = start_worker(anchoring)

    def wait_for_a_block() -> None:  # takes the one thread, or the one place in the queue
        client = BitcoinRpc(node.url, node.user, node.password, timeout_s=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                client.call("waitfornewblock", 2500)
                break
            except RpcUnavailable:
                time.sleep(0.05)
        client.close()

    callers = [threading.Thread(target=wait_for_a_block) for _ in range(2)]
    for caller in callers:
        caller.start()
    wait_for(lambda: any(e.get("event") == "anchor_held_back" and "Work queue depth exceeded"
                         in e.get("error", "") for e in worker.log_events()),
             message="the worker refused with HTTP 503")
    request(anchoring, doc("queued"))
    for caller in callers:
        caller.join(20)
    [submitted] = events.wait("anchor.submitted", message="anchored once there is room")
    assert submitted["txid"] in node.mempool and worker.popen.poll() is None
