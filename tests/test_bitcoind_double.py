"""The bitcoind double answers like a regtest node for the calls the anchor
worker makes, and refuses what bitcoind refuses. Talked to through the
worker's own RPC client (anchor/bitcoind.py). Each test runs against a real
regtest Bitcoin Core too (the node fixture): where they differ, the double is
wrong."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import zmq

from anchor.bitcoind import (BitcoinRpc, RpcAuthRefused, RpcError, RpcUnavailable, parse_hashblock,
                             to_btc, to_sat)
from tests.bitcoind_double import BitcoindDouble, parse_merkle_block


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
    # Numbered one by one (from 0 at the node's start: the funding block's is one less).
    assert [n for _, n in seen] == list(range(seen[0][1], seen[0][1] + len(seen)))
    got = rpc.call("gettransaction", txid, False, True)
    assert (got["confirmations"], got["blockhash"]) == (1, block)
    assert [(i["txid"], i["vout"], i["sequence"]) for i in got["decoded"]["vin"]] == \
        [(utxo["txid"], utxo["vout"], 0xFFFFFFFD)]
    with pytest.raises(RpcError) as err:
        rpc.call("sendrawtransaction", tx_hex)
    assert err.value.code == -27  # its change is unspent
    # Once its change is spent, bitcoind no longer sees it as in the chain: its
    # inputs are "missing or spent" (-25), as for a transaction that never was.
    change = next(u for u in rpc.call("listunspent") if u["txid"] == txid)
    rpc.call("sendrawtransaction", spend(rpc, change, [{rpc.call("getnewaddress"):
                                                        to_btc(to_sat(change["amount"]) - 500)}]))
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
    assert refused(spend(rpc, big, [{addr: to_btc(99_990)}])).message.startswith(
        "min relay fee not met, 10 < ")  # the fee paid, and the one needed
    # One dust output is ephemeral dust (policy/ephemeral_policy.cpp): only at a 0 fee.
    assert refused(spend(rpc, big, [{addr: to_btc(100)}])).message == \
        "dust, tx with dust output must be 0-fee"
    two_dust = [{addr: to_btc(100)}, {rpc.call("getnewaddress"): to_btc(100)}]
    assert refused(spend(rpc, big, two_dust)).message == "dust"
    assert refused(spend(rpc, big, [{"data": "02"}])).message == "tx-size-small"
    first = rpc.call("sendrawtransaction", spend(rpc, big, [{addr: to_btc(99_000)}]))
    # A conflicting spend: a replacement only if it pays more than the first
    # plus its own size at 1 sat/vB.
    assert refused(spend(rpc, big, [{addr: to_btc(98_990)}])).message.startswith(
        "insufficient fee, rejecting replacement ")
    second = rpc.call("sendrawtransaction", spend(rpc, big, [{addr: to_btc(98_000)}]))
    # Replaced with sendrawtransaction: no "replaced_by_txid" (bumpfee's), conflicts.
    replaced = rpc.call("gettransaction", first)
    assert "replaced_by_txid" not in replaced and replaced["confirmations"] == 0
    assert (replaced["walletconflicts"], replaced["mempoolconflicts"]) == ([second], [second])
    assert replaced["trusted"] is False
    node.mine(1)
    assert rpc.call("gettransaction", first)["confirmations"] == -1   # conflicted
    # Spent by a mined transaction: the wallet cannot sign it, nor can it replace.
    raw = rpc.call("createrawtransaction", [{"txid": big["txid"], "vout": big["vout"]}],
                   [{addr: to_btc(90_000)}])
    signed = rpc.call("signrawtransactionwithwallet", raw)
    assert signed["complete"] is False
    assert signed["errors"][0]["error"] == "Input not found or already spent"
    assert "missingorspent" in refused(signed["hex"]).message


def test_listsinceblock_reports_new_outputs_spends_and_a_reorg(node, rpc) -> None:
    node.fund([50_000])
    tip = rpc.call("getbestblockhash")
    funded = node.fund([70_000], confirmations=1)
    since = rpc.call("listsinceblock", tip)
    assert [(t["category"], t["txid"], to_sat(t["amount"])) for t in since["transactions"]] == \
        [("receive", funded[0], 70_000)]
    assert since["lastblock"] == rpc.call("getbestblockhash")
    # Reorg: the block holding the payment is disconnected; the payment is
    # back in the mempool and mined again.
    rpc.call("invalidateblock", since["lastblock"])
    node.mine(1)
    after = rpc.call("listsinceblock", since["lastblock"])
    assert [(t["txid"], t["confirmations"]) for t in after["removed"]] == [(funded[0], 1)]
    assert [t["txid"] for t in after["transactions"]] == funded
    # Again, and double-spent this time: gone for good, listed as conflicted.
    again = rpc.call("getbestblockhash")
    rpc.call("invalidateblock", again)
    node.double_spend(funded[0])
    node.mine(2)
    gone = rpc.call("listsinceblock", again)
    assert [(t["txid"], t["confirmations"]) for t in gone["removed"]] == [(funded[0], -2)]
    assert gone["transactions"] == [], "a conflicted payment is listed in removed only"
    assert rpc.call("gettransaction", funded[0])["details"] == []
    assert sorted(to_sat(u["amount"]) for u in rpc.call("listunspent")) == [50_000]


def test_unreachable_and_bad_credentials(node, rpc) -> None:
    height = rpc.call("getblockcount")
    node.stop()
    with pytest.raises(RpcUnavailable, match="did not answer getblockcount"):
        rpc.call("getblockcount")
    node.start()
    assert rpc.call("getblockcount") == height
    wrong = BitcoinRpc(node.url, node.user, "wrong", timeout_s=5)
    with pytest.raises(RpcAuthRefused, match="HTTP 401"):
        wrong.call("getblockcount")
    with pytest.raises(RpcError) as err:
        rpc.call("nosuchmethod")
    assert err.value.code == -32601


def test_gettxoutproof_is_a_merkle_block_that_verifytxoutproof_reads(node, rpc) -> None:
    """A serialized CMerkleBlock (the double's was opaque JSON): the block's
    header, whose hash is the block's, and a partial Merkle tree that leads
    to the header's Merkle root through the transaction."""
    txids = node.fund([100_000, 200_000, 300_000], per_tx=1)
    block = rpc.call("gettransaction", txids[1])["blockhash"]
    assert len(node.block_txids(block)) == 4                  # the coinbase first
    proof = rpc.call("gettxoutproof", [txids[1]], block)
    block_hash, root, n_tx, matched = parse_merkle_block(bytes.fromhex(proof))
    assert (block_hash, root[::-1].hex(), n_tx, matched) == \
        (block, rpc.call("getblockheader", block)["merkleroot"], 4, [txids[1]])
    assert rpc.call("gettxoutproof", [txids[1]]) == proof     # found by its unspent outputs
    assert rpc.call("verifytxoutproof", proof) == [txids[1]]
    tampered = bytearray(bytes.fromhex(proof))
    tampered[85] ^= 1                                         # in the tree's first hash
    assert rpc.call("verifytxoutproof", tampered.hex()) == []
    with pytest.raises(RpcError) as err:
        rpc.call("verifytxoutproof", proof[:100])
    assert err.value.code == -1
    rpc.call("invalidateblock", block)
    with pytest.raises(RpcError) as err:
        rpc.call("verifytxoutproof", proof)
    assert (err.value.code, err.value.message) == (-5, "Block not found in chain")


def test_a_young_chain_has_no_fee_estimate(node, rpc) -> None:
    assert rpc.call("estimatesmartfee", 6) == {
        "errors": ["Insufficient data or no feerate found"], "blocks": 0}


def test_an_unloaded_wallet_is_minus_18_for_wallet_calls_only(node, rpc) -> None:
    rpc.call("unloadwallet", "anchoring")
    with pytest.raises(RpcError) as err:
        rpc.call("listunspent")
    assert (err.value.code, err.value.message) == (
        -18, "Requested wallet does not exist or is not loaded")
    assert rpc.call("getblockcount") >= 0
    rpc.call("loadwallet", "anchoring")
    assert rpc.call("listunspent") == []


@pytest.mark.node_options(rpcthreads=1, rpcworkqueue=1)
def test_a_full_work_queue_is_http_503_without_json(node, rpc) -> None:
    """-rpcthreads calls running and -rpcworkqueue waiting: the next call is
    refused with HTTP 503 and a plain-text body. Three callers of a call that
    takes a second and a half, for one thread and one place in the queue:
    one at least is refused, and tries again."""
    done: list[Any] = []
    refused: list[str] = []

    def wait_for_a_block() -> None:
        client = BitcoinRpc(node.url, node.user, node.password, timeout_s=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                done.append(client.call("waitfornewblock", 1500))
                break
            except RpcUnavailable as exc:
                refused.append(str(exc))
                time.sleep(0.05)
        client.close()

    callers = [threading.Thread(target=wait_for_a_block) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(20)
    assert len(done) == 3 and refused
    assert "HTTP 503 and no JSON-RPC body: Work queue depth exceeded" in refused[0]
