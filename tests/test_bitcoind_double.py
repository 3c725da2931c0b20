"""The bitcoind double answers like a regtest node for the calls the anchor
worker makes, and refuses what bitcoind refuses. Talked to through the
worker's own RPC client (anchor/bitcoind.py)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
import zmq

from anchor.bitcoind import (BitcoinRpc, RpcAuthRefused, RpcError, RpcUnavailable, parse_hashblock,
                             to_btc, to_sat)
from tests.bitcoind_double import BitcoindDouble


@pytest.fixture
def rpc(node: BitcoindDouble) -> Iterator[BitcoinRpc]:
    client = BitcoinRpc(node.url, node.user, node.password, timeout_s=5)
    yield client
    client.close()


def spend(rpc: BitcoinRpc, utxo: dict, outputs: list[dict], replaceable: bool = True) -> str:
    raw = rpc.call("createrawtransaction", [{"txid": utxo["txid"], "vout": utxo["vout"]}],
                   outputs, 0, replaceable)
    signed = rpc.call("signrawtransactionwithwallet", raw)
    assert signed["complete"]
    return signed["hex"]


def test_wallet_outputs_amounts_and_listunspent_query_options(node, rpc) -> None:
    node.fund([10_000, 20_000, 30_000, 123_456_789], confirmations=2)
    unspent = rpc.call("listunspent", 1, 9_999_999, [], True)
    assert sorted(to_sat(u["amount"]) for u in unspent) == [10_000, 20_000, 30_000, 123_456_789]
    assert all(isinstance(u["amount"], Decimal) and u["confirmations"] == 2 for u in unspent)
    band = rpc.call("listunspent", 0, 9_999_999, [], True,
                    {"minimumAmount": to_btc(15_000), "maximumAmount": to_btc(30_000)})
    assert sorted(to_sat(u["amount"]) for u in band) == [20_000, 30_000]
    assert len(rpc.call("listunspent", 0, 9_999_999, [], True, {"maximumCount": 3})) == 3
    assert rpc.call("listunspent", 3) == []


def test_a_signed_spend_is_accepted_mined_and_notified(node, rpc) -> None:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"hashblock")
    sub.connect(node.zmq_endpoint)
    node.fund([100_000])
    utxo = rpc.call("listunspent")[0]
    change = rpc.call("getrawchangeaddress")
    tx_hex = spend(rpc, utxo, [{"data": "42" * 37}, {change: to_btc(99_000)}])
    txid = rpc.call("sendrawtransaction", tx_hex)
    assert rpc.call("sendrawtransaction", tx_hex) == txid    # again: already in the mempool
    assert rpc.call("gettransaction", txid)["confirmations"] == 0
    [block] = rpc.call("generatetoaddress", 1, rpc.call("getnewaddress"))
    seen = []
    while not seen or seen[-1][0] != block:
        assert sub.poll(5000), seen
        seen.append(parse_hashblock(sub.recv_multipart()))
    assert seen[-1] == (block, 1)  # the funding block was notification 0
    got = rpc.call("gettransaction", txid, False, True)
    assert (got["confirmations"], got["blockhash"]) == (1, block)
    assert got["decoded"]["vin"] == [{"txid": utxo["txid"], "vout": utxo["vout"],
                                      "sequence": 0xFFFFFFFD}]
    with pytest.raises(RpcError) as err:
        rpc.call("sendrawtransaction", tx_hex)
    assert err.value.code == -27  # its change is unspent
    # Once its change is spent, bitcoind no longer sees it as in the chain: its
    # inputs are "missing or spent" (-25), as for a transaction that never was.
    change = next(u for u in rpc.call("listunspent") if u["txid"] == txid)
    rpc.call("sendrawtransaction", spend(rpc, change, [{"data": "02"}]))
    rpc.call("generatetoaddress", 1, rpc.call("getnewaddress"))
    with pytest.raises(RpcError) as err:
        rpc.call("sendrawtransaction", tx_hex)
    assert (err.value.code, err.value.message) == (-25, "bad-txns-inputs-missingorspent")
    sub.close()


def test_what_bitcoind_refuses(node, rpc) -> None:
    node.fund([100_000, 5_000])
    utxos = sorted(rpc.call("listunspent"), key=lambda u: u["amount"])
    big = utxos[1]
    addr = rpc.call("getnewaddress")

    def refused(tx_hex: str) -> RpcError:
        with pytest.raises(RpcError) as err:
            rpc.call("sendrawtransaction", tx_hex)
        return err.value

    assert "in-belowout" in refused(spend(rpc, big, [{addr: to_btc(100_001)}])).message
    unsigned = rpc.call("createrawtransaction", [{"txid": big["txid"], "vout": big["vout"]}],
                        [{addr: to_btc(90_000)}])
    assert "mandatory-script-verify" in refused(unsigned).message
    unknown = rpc.call("createrawtransaction", [{"txid": "ab" * 32, "vout": 0}],
                       [{addr: to_btc(1_000)}])
    assert rpc.call("signrawtransactionwithwallet", unknown)["complete"] is False
    assert refused(unknown).code == -25
    assert refused(spend(rpc, big, [{addr: to_btc(99_990)}])).message == "min relay fee not met"
    assert refused(spend(rpc, big, [{addr: to_btc(100)}])).message == "dust"
    first = rpc.call("sendrawtransaction", spend(rpc, big, [{addr: to_btc(99_000)}]))
    # A conflicting spend: a replacement only if it pays more than the first
    # plus its own size at 1 sat/vB.
    assert refused(spend(rpc, big, [{addr: to_btc(98_990)}])).message == "insufficient fee"
    second = rpc.call("sendrawtransaction", spend(rpc, big, [{addr: to_btc(98_000)}]))
    assert rpc.call("gettransaction", first)["replaced_by_txid"] == second
    node.mine(1)
    assert rpc.call("gettransaction", first)["confirmations"] == -1   # conflicted
    # Spent by a mined transaction: no replacement possible.
    assert "missingorspent" in refused(spend(rpc, big, [{addr: to_btc(90_000)}])).message


def test_listsinceblock_reports_new_outputs_spends_and_a_reorg(node, rpc) -> None:
    node.fund([50_000])
    tip = rpc.call("getbestblockhash")
    funded = node.fund([70_000], confirmations=1)
    since = rpc.call("listsinceblock", tip)
    assert [(t["category"], t["txid"], to_sat(t["amount"])) for t in since["transactions"]] == \
        [("receive", funded[0], 70_000)]
    assert since["lastblock"] == rpc.call("getbestblockhash")
    # Reorg: the block holding the payment is disconnected and replaced.
    rpc.call("invalidateblock", since["lastblock"])
    node.mine(2)
    after = rpc.call("listsinceblock", since["lastblock"])
    assert [t["txid"] for t in after["removed"]] == funded
    assert after["transactions"] == []
    assert sorted(to_sat(u["amount"]) for u in rpc.call("listunspent")) == [50_000]


def test_unreachable_and_bad_credentials(node, rpc) -> None:
    node.stop()
    with pytest.raises(RpcUnavailable, match="did not answer getblockcount"):
        rpc.call("getblockcount")
    node.start()
    assert rpc.call("getblockcount") == 1 - 1  # genesis only
    wrong = BitcoinRpc(node.url, node.user, "wrong", timeout_s=5)
    with pytest.raises(RpcAuthRefused, match="HTTP 401"):
        wrong.call("getblockcount")
    with pytest.raises(RpcError) as err:
        rpc.call("nosuchmethod")
    assert err.value.code == -32601
