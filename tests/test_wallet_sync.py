"""Wallet sync: the writer's utxos table follows bitcoind's wallet (the double's and Core's),
a page at a time: full load, new blocks, spends, a reorg."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from embit import ec, script
from embit.networks import NETWORKS

from anchor.bitcoind import BitcoinRpc, to_btc, to_sat
from anchor.reservations import UtxoClient
from anchor.sync import WalletSync
from tests.bitcoind_double import BitcoindDouble
from tests.conftest import Bus, query


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


def test_full_load_pages_by_amount_and_matches_the_wallet(sync, node) -> None:
    ws, bus = sync
    # 43 outputs, 12 of one amount (more than a page of 5: that band cannot split).
    amounts = [1_000 + 37 * i for i in range(31)] + [5_000] * 12
    node.fund(amounts[:20], confirmations=3)
    node.fund(amounts[20:], confirmations=1)
    ws.sync()
    assert table(bus) == wallet(node, ws.rpc) and len(table(bus)) == 43
    assert ws.counters["full_loads"] == 1 and ws.counters["listunspent_calls"] > 43 // 5
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
