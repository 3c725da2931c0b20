"""Wallet sync: the writer's utxos table follows bitcoind's wallet (the double's and Core's),
a page at a time whatever the amounts: full load, new blocks, spends, a reorg."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from embit import ec, script
from embit.networks import NETWORKS

from anchor import bitcoind
from anchor.bitcoind import BitcoinRpc, RpcError, RpcUnavailable, to_btc, to_sat
from anchor.reservations import UtxoClient
from anchor.sync import WalletSync
from tests.bitcoind_double import BitcoindDouble
from tests.conftest import Bus, query, wait_for


@pytest.fixture
def sync(make_bus: Any, node: BitcoindDouble) -> Iterator[tuple[WalletSync, Bus]]:
    bus = make_bus()
    bus.start_writer()
    rpc = BitcoinRpc(node.url, node.user, node.password, timeout_s=5)
    utxos = UtxoClient(bus["BUS_CONTROL_ENDPOINT"], retry_for_s=5)
    yield WalletSync(rpc, utxos, page=5), bus
    utxos.close()
    rpc.close()


def table(bus: Bus) -> set[tuple]:
    """(txid, vout, amount, confirmations-derived height) of available rows."""
    return set(query(bus.db, "SELECT txid, vout, amount_sat, block_height FROM utxos"
                             " WHERE status = 0"))


def wallet(node: BitcoindDouble, rpc: BitcoinRpc) -> set[tuple]:
    tip = node.height
    return {(u["txid"], u["vout"], to_sat(u["amount"]),
             tip - u["confirmations"] + 1 if u["confirmations"] else None)
            for u in rpc.call("listunspent", 0)}


def outside_address() -> str:
    key = ec.PrivateKey(hashlib.sha256(b"someone else").digest())
    return script.p2wpkh(key.get_public_key()).address(NETWORKS["regtest"])


def test_full_load_pages_and_matches_the_wallet(sync, node) -> None:
    ws, bus = sync
    # 43 outputs in two blocks (more than a page of 5 each: read as streams),
    # 12 of one amount.
    amounts = [1_000 + 37 * i for i in range(31)] + [5_000] * 12
    node.fund(amounts[:20], confirmations=3)
    node.fund(amounts[20:], confirmations=1)
    ws.sync()
    assert table(bus) == wallet(node, ws.rpc) and len(table(bus)) == 43
    assert ws.counters["full_loads"] == 1 and ws.counters["streamed"] >= 2
    assert ws.counters["largest_page"] == 5
    # Heights come from confirmations: the first 20 are 3 blocks below the tip.
    assert query(bus.db, "SELECT count(*) FROM utxos WHERE block_height = ?",
                 (node.height - 3,)) == [(20,)]


def test_new_blocks_spends_and_a_reorg_follow_incrementally(sync, node) -> None:
    ws, bus = sync
    node.fund([100_000, 200_000, 300_000], confirmations=2)
    ws.sync()
    # An outside spend from the wallet, with change back to it, and a new payment.
    spent = next(u for u in ws.rpc.call("listunspent") if to_sat(u["amount"]) == 200_000)
    raw = ws.rpc.call("createrawtransaction", [{"txid": spent["txid"], "vout": spent["vout"]}],
                      [{outside_address(): to_btc(50_000)},
                       {ws.rpc.call("getrawchangeaddress"): to_btc(149_000)}])
    spend_txid = ws.rpc.call("sendrawtransaction",
                             ws.rpc.call("signrawtransactionwithwallet", raw)["hex"])
    [paid] = node.fund([70_000], confirmations=1)
    assert ws.sync() is True
    assert table(bus) == wallet(node, ws.rpc)
    assert query(bus.db, "SELECT status, spent_txid FROM utxos WHERE txid = ? AND vout = ?",
                 (spent["txid"], spent["vout"])) == [(2, spend_txid)]
    assert (spend_txid, 1, 149_000, node.height) in table(bus)  # the change, found too
    assert ws.sync() is False  # nothing new
    # Reorg: the block with the 70,000 payment is replaced by two with a
    # double spend of it instead.
    paid_block = ws.rpc.call("gettransaction", paid)["blockhash"]
    ws.rpc.call("invalidateblock", paid_block)
    node.double_spend(paid)
    node.mine(2)
    ws.sync()
    assert ws.counters["reorgs"] == 1
    assert query(bus.db, "SELECT status FROM utxos WHERE txid = ?", (paid,)) == [(2,)]
    assert table(bus) == wallet(node, ws.rpc)  # heights of re-mined outputs follow too
    assert ws.utxos.tip() == (node.height, node.getbestblockhash())


def _pay(rpc: BitcoinRpc, coins: list[dict], to_outside: int, fee: int) -> str:
    """A payment from the wallet (an operator's, not the worker's): `coins`
    spent, `to_outside` sat to someone else, the rest back as change."""
    total = sum(to_sat(c["amount"]) for c in coins)
    raw = rpc.call("createrawtransaction", [{"txid": c["txid"], "vout": c["vout"]} for c in coins],
                   [{outside_address(): to_btc(to_outside)},
                    {rpc.call("getrawchangeaddress"): to_btc(total - to_outside - fee)}], 0, True)
    return rpc.call("sendrawtransaction", rpc.call("signrawtransactionwithwallet", raw)["hex"])


def test_a_replaced_payment_leaves_the_inputs_it_no_longer_spends_in_the_pool(sync, node) -> None:
    """listsinceblock lists replaced and conflicted transactions too (Core
    does; the double did not): the sync took every "send" for a spend of its
    inputs, and an input the replacement does not spend left the pool for good."""
    ws, bus = sync
    node.fund([100_000, 200_000, 300_000])
    ws.sync()
    coins = {to_sat(u["amount"]): u for u in ws.rpc.call("listunspent")}
    first = _pay(ws.rpc, [coins[100_000], coins[200_000]], 250_000, 1_000)
    # Replaced by a payment of 100,000 and 300,000 (a higher fee): 200,000 is unspent again.
    second = _pay(ws.rpc, [coins[100_000], coins[300_000]], 350_000, 5_000)
    assert node.mempool == [second]
    node.mine(1)
    assert ws.sync() is True
    status = {amount: row for amount, *row in query(
        bus.db, "SELECT amount_sat, status, spent_txid FROM utxos WHERE txid = ?",
        (coins[100_000]["txid"],))}
    assert status == {100_000: [2, second], 200_000: [0, None], 300_000: [2, second]}, first
    assert table(bus) == wallet(node, ws.rpc)


def test_a_payment_mined_again_after_a_reorg_stays_in_the_pool_at_its_new_height(
        sync, node) -> None:
    """A reorg's disconnected transactions go back to the mempool and are mined
    again (Core's; the double dropped payments): listsinceblock lists them in
    `removed` all the same, and the sync must not drop them."""
    ws, bus = sync
    node.fund([40_000], confirmations=2)
    [paid] = node.fund([70_000], confirmations=1)
    ws.sync()
    ws.rpc.call("invalidateblock", ws.rpc.call("gettransaction", paid)["blockhash"])
    node.mine(3)                              # the first of them mines it again
    since = ws.rpc.call("listsinceblock", ws.tip_hash)
    assert [t["txid"] for t in since["removed"]] == [paid]
    assert ws.sync() is True and ws.counters["reorgs"] == 1
    assert query(bus.db, "SELECT status, block_height FROM utxos WHERE txid = ?",
                 (paid,)) == [(0, node.height - 2)]
    assert table(bus) == wallet(node, ws.rpc)


def test_a_payment_replaced_after_a_sync_gives_back_the_inputs_it_no_longer_spends(
        sync, node) -> None:
    """A sync that saw the payment pending marked its inputs spent; replaced
    by one that spends 200,000 no more, that output stayed out of the pool."""
    ws, bus = sync
    node.fund([100_000, 200_000, 300_000])
    ws.sync()
    coins = {to_sat(u["amount"]): u for u in ws.rpc.call("listunspent")}
    _pay(ws.rpc, [coins[100_000], coins[200_000]], 250_000, 1_000)
    node.mine_min_fee_rate = 1_000            # a block without it: the sync sees it pending
    node.mine(1)
    ws.sync()
    node.mine_min_fee_rate = 0
    _pay(ws.rpc, [coins[100_000], coins[300_000]], 350_000, 5_000)
    node.mine(1)
    ws.sync()
    status = dict(query(bus.db, "SELECT amount_sat, status FROM utxos WHERE txid = ?",
                        (coins[100_000]["txid"],)))
    assert status == {100_000: 2, 200_000: 0, 300_000: 2}
    assert table(bus) == wallet(node, ws.rpc) and ws.counters["restored"] == 1


# The sync in a process of its own (the double answers from the test's), as
# the worker runs it, reporting after each sync the most memory it held
# (tracemalloc: what Python allocated, the sync's alone, not the RSS of a
# shared machine) above what it held before that sync.
SYNC_CHILD = """
import json, sys, tracemalloc
from anchor.bitcoind import BitcoinRpc
from anchor.reservations import UtxoClient
from anchor.sync import WalletSync
args = json.loads(sys.argv[1])
rpc = BitcoinRpc(args["url"], args["user"], args["password"], timeout_s=30)
ws = WalletSync(rpc, UtxoClient(args["endpoint"], retry_for_s=5), page=args["page"])
tracemalloc.start()
for _ in sys.stdin:
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    ws.sync()
    print("synced", json.dumps({"held": tracemalloc.get_traced_memory()[1] - before,
                                "counters": ws.counters}), flush=True)
"""


def test_equal_amounts_are_synced_a_page_at_a_time(make_bus, node) -> None:
    """A wallet pre-split into equal outputs (what an anchoring service makes)
    fell in one amount band that could not be split: the sync held all of it
    at once, about 2.5 KB an output (60,000 took the worker over its 128 MiB
    limit), and an incremental sync held every output of the new blocks. Now
    at most a page of outputs, whatever their amounts, heights or number."""
    bus = make_bus()
    bus.start_writer()
    page = 25
    node.fund([10_000] * 2_000, confirmations=1)     # one block of 2,000 equal outputs
    node.fund([20_000] * 300 + [30_000 + i for i in range(300)], confirmations=2)
    child = subprocess.Popen(
        [sys.executable, "-c", SYNC_CHILD, json.dumps(
            {"url": node.url, "user": node.user, "password": node.password, "page": page,
             "endpoint": bus["BUS_CONTROL_ENDPOINT"]})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent)

    def sync_once() -> dict[str, Any]:
        child.stdin.write("sync\n")
        child.stdin.flush()
        # The child's own RPC and writer timeouts bound each line; its log
        # lines come first.
        for line in child.stdout:
            if line.startswith("synced "):
                return json.loads(line.split(" ", 1)[1])
        raise AssertionError(f"the sync process exited with {child.wait(10)}")

    try:
        rpc = BitcoinRpc(node.url, node.user, node.password, timeout_s=30)
        loaded = sync_once()
        assert table(bus) == wallet(node, rpc) and len(table(bus)) == 2_600
        # Measured 0.4-0.6 MB: a page of 25 outputs, the stream's 64 KiB
        # reads, the clients' own; 2,000 outputs held at once were 3-5 MB.
        assert loaded["held"] < 1_000_000, loaded
        assert loaded["counters"]["full_loads"] == 1
        assert 0 < loaded["counters"].get("largest_page", 2_000) <= page, loaded
        node.fund([10_000] * 1_000, confirmations=1)  # 1,000 more, equal, in one block
        synced = sync_once()
        assert synced["counters"]["incremental"] == 1
        assert table(bus) == wallet(node, rpc) and len(table(bus)) == 3_600
        assert synced["held"] < 1_000_000, synced
        assert synced["counters"]["largest_page"] <= page
        rpc.close()
    finally:
        child.stdin.close()
        child.wait(30)


def test_a_streamed_answer_is_the_answer_read_whole(sync, node, monkeypatch) -> None:
    """BitcoinRpc.stream, which the sync reads a block of equal outputs and
    listsinceblock with, gives what call() gives, element by element,
    wherever the reads cut the text (here every 7 bytes); an error is raised
    at once; a stream left unread costs its connection, not the client."""
    ws, _ = sync
    node.fund([1_000 + i for i in range(30)], confirmations=1)
    node.fund([2_000] * 5, confirmations=0)
    # Core's wallet learns of a mempool transaction after sendmany returns.
    wait_for(lambda: len(ws.rpc.call("listunspent", 0)) == 35, message="the wallet's 35 outputs")
    monkeypatch.setattr(bitcoind, "STREAM_CHUNK", 7)
    whole = ws.rpc.call("listunspent", 0)
    assert [item for _, item in ws.rpc.stream("listunspent", 0)] == whole and len(whole) == 35
    since = ws.rpc.call("listsinceblock", "", 1, False, True)
    rebuilt: dict[str, Any] = {}
    for key, item in ws.rpc.stream("listsinceblock", "", 1, False, True):
        if isinstance(since[key], list):
            rebuilt.setdefault(key, []).append(item)
        else:
            rebuilt[key] = item
    assert rebuilt == {k: v for k, v in since.items() if v != []} and rebuilt["transactions"]
    assert list(ws.rpc.stream("getblockcount")) == [(None, node.height)]
    with pytest.raises(RpcError) as err:
        ws.rpc.stream("listsinceblock", "00" * 32)
    assert err.value.code == bitcoind.RPC_INVALID_ADDRESS_OR_KEY
    unread = ws.rpc.stream("listunspent", 0)
    next(unread)
    unread.close()
    assert [item for _, item in ws.rpc.stream("listunspent", 0)] == whole
    assert ws.rpc.call("listunspent", 0) == whole


def test_listunspent_filters_addresses_after_maximum_count_so_they_page_nothing(
        sync, node) -> None:
    """Why the sync does not page by address sets (the wallet's descriptors'):
    Core takes `maximumCount` outputs first and only then keeps those paid to
    the addresses given, so a page by address is not a page, and without
    `maximumCount` Core selects every output the other filters let through.
    The double does the same."""
    ws, _ = sync
    node.fund([10_000 + i for i in range(8)], confirmations=1, per_tx=1)
    outputs = ws.rpc.call("listunspent")
    found = [ws.rpc.call("listunspent", 0, 9_999_999, [o["address"]], True, {"maximumCount": 1})
             for o in outputs]
    assert sum(f == [] for f in found) == len(outputs) - 1
    assert [ws.rpc.call("listunspent", 0, 9_999_999, [o["address"]]) for o in outputs] == \
        [[o] for o in outputs]
    with pytest.raises(RpcError) as err:
        ws.rpc.call("listunspent", 0, 9_999_999, [outputs[0]["address"]] * 2)
    assert err.value.code == -8


def test_a_streamed_answer_cut_short_or_not_json_is_the_node_unavailable() -> None:
    """What a stream read as it arrives meets that a whole answer would not:
    a body cut short (the node gone mid-answer), or one that turns out not to
    be JSON after elements were given. Both are RpcUnavailable naming the
    call (the sync keeps its work and retries); the next stream is answered."""
    bodies = [(b'{"result":[{"txid":"aa","vout":0},{"txid":"bb","vo', 400),
              (b'{"result":[{"vout":0},{"vout":1},,{"vout":2}],"error":null,"id":1}', None),
              (b'{"result":[{"vout":0},{"vout":1}],"error":null,"id":1}\n', None)]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            body, length = bodies.pop(0)
            self.send_response(200)
            self.send_header("Content-Length", str(length or len(body)))
            self.end_headers()
            self.wfile.write(body)
            if length:
                self.close_connection = True

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rpc = BitcoinRpc(f"http://127.0.0.1:{server.server_address[1]}", "u", "p", timeout_s=5)
    try:
        got: list[Any] = []
        with pytest.raises(RpcUnavailable, match="stopped answering listunspent"):
            got.extend(item for _, item in rpc.stream("listunspent"))
        assert got == [{"txid": "aa", "vout": 0}]
        got.clear()
        with pytest.raises(RpcUnavailable, match="answered listunspent with no JSON-RPC object"):
            got.extend(item for _, item in rpc.stream("listunspent"))
        assert got == [{"vout": 0}, {"vout": 1}]
        assert [item for _, item in rpc.stream("listunspent")] == [{"vout": 0}, {"vout": 1}]
    finally:
        rpc.close()
        server.shutdown()
        server.server_close()
