"""A stand-in for bitcoind in regtest mode, for the calls the anchor worker makes.

The anchor tests run against it and against a real Bitcoin Core
(tests/regtest.py); it is kept for what a real node cannot be made to do on
demand (a call held or slowed, a lost reply, a warm-up, a fee estimate) and
for the benchmarks. It answers in Core's shapes (tests/test_bitcoind_double.py
runs on both: where they differ, the double is wrong): the same JSON-RPC
(HTTP, basic auth, JSON-RPC 1.0 error shapes and codes) and the same ZMQ
`hashblock` notifications, over a small but real chain:

- HTTP/1.1 with keep-alive, an idle connection closed after
  `rpcservertimeout` seconds (bitcoind's -rpcservertimeout), 401 with no
  body for bad credentials, 503 "Work queue depth exceeded" with
  `rpcthreads` calls running and `rpcworkqueue` waiting; -28 while `warmup`
  is set, -18 for wallet calls while the wallet is unloaded;

- a wallet of real secp256k1 keys (P2WPKH, regtest bech32 addresses);
- transactions decoded with embit (a Bitcoin library), signed for real by
  `signrawtransactionwithwallet` and checked by `sendrawtransaction` as
  bitcoind would: unknown or spent inputs, outputs above inputs, fee above
  `maxfeerate` or below the relay minimum, dust (one dust output only at a 0
  fee), under 65 bytes without witness, bad signatures (more than
  one OP_RETURN is standard, as in bitcoind 30); a mined transaction is
  "already in block chain" (-27) only while one of its outputs is unspent,
  else -25 missing-or-spent inputs, as bitcoind answers; a conflicting spend is a replacement (full RBF, as bitcoind
  28+) only if it pays more (BIP 125 rules 3 and 4), else `txn-mempool-conflict`;
- blocks with real headers (their hash is the header's), mined by
  `generatetoaddress` from the mempool (what pays at least
  `mine_min_fee_rate`: how a fee bump gets tested); `invalidateblock`
  disconnects blocks (a reorg): their transactions go back to the mempool
  and the next block mines them again, their coinbases are orphans
  (`double_spend` takes a funding payment away for good);
- `listunspent` with query options (unsorted, as bitcoind's; every output
  "spendable", a watched key's "solvable"; `addresses` applied after
  `maximumCount`, as Core applies them), `listsinceblock` with the
  replaced and conflicted transactions and, in `removed`, every wallet
  transaction of the disconnected blocks, `gettransaction` with `decoded`
  and the conflicts (no "replaced_by_txid": only bumpfee sets it),
  `gettxoutproof`/`verifytxoutproof` with a serialized CMerkleBlock,
  `estimatesmartfee` with only "errors" unless `fee_rate_sat_vb` is set.

Test-only controls are methods and attributes (`fund`, `mine`,
`double_spend`, `stop`, `start`, `hold`/`release` a method, `delays`,
`calls`, `mine_min_fee_rate`, `fee_rate_sat_vb`, `warmup`); everything else
goes over the wire. Amounts are BTC in JSON, as bitcoind's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import zmq
from embit import ec, script
from embit.networks import NETWORKS
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from anchor.bitcoind import vsize

NET = NETWORKS["regtest"]
OUTSIDE_ADDRESS = script.p2wpkh(ec.PrivateKey(hashlib.sha256(b"a miner").digest())
                                .get_public_key()).address(NET)
COIN = 100_000_000
COINBASE_MATURITY = 100        # a coinbase output is spendable at 101 confirmations
SEQUENCE_FINAL = 0xFFFFFFFF
DUST_SAT = 294                 # P2WPKH dust threshold at 3 sat/vB
MIN_RELAY_SAT_VB = 1
INCREMENTAL_SAT_VB = 1
MIN_STANDARD_TX_NONWITNESS_SIZE = 65


WALLET_NAME = "anchoring"
# The calls that need the wallet (-18 while it is not loaded).
WALLET_METHODS = frozenset({
    "getnewaddress", "getrawchangeaddress", "listunspent", "listsinceblock", "gettransaction",
    "signrawtransactionwithwallet", "lockunspent", "listlockunspent", "sendtoaddress",
    "getwalletinfo"})


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def btc(sat: int) -> float:
    return float(Decimal(sat) / COIN)


def money(sat: int) -> str:
    """An amount as Core's FormatMoney prints it: trailing zeros cut, 2 decimals kept."""
    whole, frac = divmod(abs(sat), COIN)
    digits = f"{frac:08d}".rstrip("0").ljust(2, "0")
    return f"{'-' if sat < 0 else ''}{whole}.{digits}"


def sat(amount: Any) -> int:
    value = Decimal(str(amount)) * COIN
    if value != value.to_integral_value() or value < 0:
        raise RpcError(-3, "Invalid amount")
    return int(value)


def stripped_size(tx: Transaction) -> int:
    """The size without witness data."""
    witness = sum(len(i.witness.serialize()) for i in tx.vin) + 2 if tx.is_segwit else 0
    return len(tx.serialize()) - witness


def is_op_return(spk: script.Script) -> bool:
    return spk.data[:1] == b"\x6a"


def dsha256(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def merkle_root(txids: list[str]) -> bytes:
    """The block's Merkle root (internal byte order) of its txids (hex, as RPC
    prints them: reversed)."""
    level = [bytes.fromhex(t)[::-1] for t in txids]
    if not level:
        return bytes(32)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [dsha256(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def _compact_size(n: int) -> bytes:
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    return b"\xfe" + n.to_bytes(4, "little")


def _read_compact_size(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    if first < 0xFD:
        return first, pos + 1
    size = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
    if pos + 1 + size > len(data):
        raise ValueError("end of data")
    return int.from_bytes(data[pos + 1:pos + 1 + size], "little"), pos + 1 + size


def _tree_width(n_tx: int, height: int) -> int:
    return (n_tx + (1 << height) - 1) >> height


def merkle_block(header: bytes, txids: list[str], matched: set[str]) -> bytes:
    """A serialized CMerkleBlock (src/merkleblock.cpp): the block header, the
    number of transactions, the hashes and flag bits of the partial Merkle
    tree (CPartialMerkleTree::TraverseAndBuild), flags packed LSB first."""
    leaves = [bytes.fromhex(t)[::-1] for t in txids]
    matches = [t in matched for t in txids]
    bits: list[bool] = []
    hashes: list[bytes] = []

    def node_hash(height: int, pos: int) -> bytes:
        if height == 0:
            return leaves[pos]
        left = node_hash(height - 1, pos * 2)
        right = node_hash(height - 1, pos * 2 + 1) \
            if pos * 2 + 1 < _tree_width(len(leaves), height - 1) else left
        return dsha256(left + right)

    def build(height: int, pos: int) -> None:
        parent_of_match = any(matches[pos << height:(pos + 1) << height])
        bits.append(parent_of_match)
        if height == 0 or not parent_of_match:
            hashes.append(node_hash(height, pos))
            return
        build(height - 1, pos * 2)
        if pos * 2 + 1 < _tree_width(len(leaves), height - 1):
            build(height - 1, pos * 2 + 1)

    height = 0
    while _tree_width(len(leaves), height) > 1:
        height += 1
    build(height, 0)
    flags = bytearray((len(bits) + 7) // 8)
    for i, bit in enumerate(bits):
        flags[i // 8] |= bit << (i % 8)
    return (header + len(leaves).to_bytes(4, "little") + _compact_size(len(hashes))
            + b"".join(hashes) + _compact_size(len(flags)) + bytes(flags))


def parse_merkle_block(data: bytes) -> tuple[str, bytes, int, list[str]]:
    """(block hash, Merkle root the partial tree leads to, number of
    transactions, matched txids) of a serialized CMerkleBlock, as
    CPartialMerkleTree::ExtractMatches; ValueError if it is malformed."""
    if len(data) < 84:
        raise ValueError("end of data")
    header, n_tx = data[:80], int.from_bytes(data[80:84], "little")
    n_hashes, pos = _read_compact_size(data, 84)
    hashes = [data[pos + 32 * i:pos + 32 * (i + 1)] for i in range(n_hashes)]
    pos += 32 * n_hashes
    if pos > len(data):
        raise ValueError("end of data")
    n_flags, pos = _read_compact_size(data, pos)
    flags = data[pos:pos + n_flags]
    if len(flags) != n_flags or n_tx == 0 or n_hashes > n_tx:
        raise ValueError("bad partial Merkle tree")
    bits = [bool(flags[i // 8] >> (i % 8) & 1) for i in range(8 * n_flags)]
    used = {"bits": 0, "hashes": 0}
    matched: list[str] = []

    def extract(height: int, pos: int) -> bytes:
        if used["bits"] >= len(bits):
            raise ValueError("bad partial Merkle tree: out of flags")
        bit = bits[used["bits"]]
        used["bits"] += 1
        if height == 0 or not bit:
            if used["hashes"] >= len(hashes):
                raise ValueError("bad partial Merkle tree: out of hashes")
            found = hashes[used["hashes"]]
            used["hashes"] += 1
            if height == 0 and bit:
                matched.append(found[::-1].hex())
            return found
        left = extract(height - 1, pos * 2)
        right = left
        if pos * 2 + 1 < _tree_width(n_tx, height - 1):
            right = extract(height - 1, pos * 2 + 1)
            if right == left:  # CVE-2012-2459: a duplicated branch is no proof
                raise ValueError("bad partial Merkle tree: duplicated branch")
        return dsha256(left + right)

    height = 0
    while _tree_width(n_tx, height) > 1:
        height += 1
    root = extract(height, 0)
    if (used["bits"] + 7) // 8 != n_flags or used["hashes"] != n_hashes:
        raise ValueError("bad partial Merkle tree: unused hashes or flags")
    return dsha256(header)[::-1].hex(), root, n_tx, matched


@dataclass
class Block:
    hash: str
    height: int
    time: int
    prev: str | None
    txids: list[str] = field(default_factory=list)
    header: bytes = b""


@dataclass
class TxEntry:
    tx: Transaction
    txid: str
    time: int
    funding: bool = False            # created by fund() or a coinbase: no inputs to return to
    coinbase: bool = False           # spendable (and listed) at 101 confirmations only
    block: str | None = None         # hash of the active-chain block holding it
    replaced_by: str | None = None


class BitcoindDouble:
    def __init__(self, user: str = "anchor", password: str = "secret",
                 rpcservertimeout: float = 30.0, rpcthreads: int = 16,
                 rpcworkqueue: int = 64) -> None:
        self.user, self.password = user, password
        # bitcoind's HTTP server keeps connections alive (HTTP/1.1) and closes
        # one idle for -rpcservertimeout seconds (default 30): a client that
        # keeps its connection finds it closed at its next call.
        self.rpcservertimeout = rpcservertimeout
        self.idle_closed = 0
        self._connections: set[socket.socket] = set()
        self.lock = threading.RLock()
        self.keys: dict[bytes, ec.PrivateKey] = {}   # script_pubkey -> key
        self.watch_only: set[bytes] = set()          # script_pubkeys without their key
        self.locked: set[tuple[str, int]] = set()    # lockunspent
        self.txs: dict[str, TxEntry] = {}            # every tx ever accepted
        self.mempool: list[str] = []                 # txids, parents first
        self.spender: dict[tuple[str, int], str] = {}  # outpoint -> txid (chain or mempool)
        self.blocks: list[Block] = []                # the active chain
        self.orphans: dict[str, Block] = {}          # disconnected blocks by hash
        self.index: dict[str, Block] = {}            # every block by hash
        self.spends: dict[tuple[str, int], set[str]] = {}  # outpoint -> every tx spending it
        # What estimatesmartfee answers; None: no estimate, as on a young chain
        # (regtest, a new node): "errors" only, and the worker's fallback runs.
        self.fee_rate_sat_vb: float | None = None
        # Core's refusals on demand: -28 while this warm-up status is set (a
        # node starting: "Loading wallet…"), -18 for wallet calls while the
        # wallet is unloaded (unloadwallet, or a restart without it), HTTP 503
        # for a call that finds -rpcthreads calls running and -rpcworkqueue
        # more waiting (hold a call, or waitfornewblock, to fill them).
        self.warmup: str | None = None
        self.wallet_loaded = True
        self.rpc_slots = rpcthreads + rpcworkqueue
        self.in_flight = 0
        self.new_block = threading.Condition(self.lock)
        self.mine_min_fee_rate = 0.0      # miners leave cheaper transactions in the mempool
        self.calls: Counter[str] = Counter()
        self.gates: dict[str, threading.Event] = {}  # method -> held until set
        self.delays: dict[str, float] = {}           # method -> seconds each call takes
        self.held: Counter[str] = Counter()          # calls that reached a gate
        self._key_counter = 0
        self._nonce = 0
        self._zmq_seq = 0
        self._ctx = zmq.Context.instance()
        self.zmq_pub = self._ctx.socket(zmq.PUB)
        self.zmq_pub.setsockopt(zmq.LINGER, 0)
        port = self.zmq_pub.bind_to_random_port("tcp://127.0.0.1")
        self.zmq_endpoint = f"tcp://127.0.0.1:{port}"
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self._append_block([])  # genesis
        self.start()

    # --- test controls ----------------------------------------------------------

    @property
    def url(self) -> str:
        """The wallet's URL, as the worker is configured for Core's named wallet."""
        return f"http://127.0.0.1:{self.port}/wallet/{WALLET_NAME}"

    def start(self) -> None:
        """Serve JSON-RPC (again, on the same port after stop())."""
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = double.rpcservertimeout

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                double._serve(self)

            def setup(self) -> None:
                super().setup()
                double._connections.add(self.connection)

            def finish(self) -> None:
                double._connections.discard(self.connection)
                super().finish()

            def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
                if format.startswith("Request timed out"):  # handle_one_request's words
                    double.idle_closed += 1

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop answering: connections are refused, as with bitcoind down."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for conn in list(self._connections):  # kept-alive ones too, as a stopped node's
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.stop()
        self.zmq_pub.close()

    def hold(self, method: str) -> None:
        """Calls of `method` wait (up to 60 s) until release(method): a slow or
        hung node, or a moment to kill the caller in."""
        self.gates[method] = threading.Event()

    def release(self, method: str) -> None:
        self.gates.pop(method).set()

    def new_address(self) -> str:
        with self.lock:
            self._key_counter += 1
            key = ec.PrivateKey(hashlib.sha256(b"double-key-%d" % self._key_counter).digest())
            spk = script.p2wpkh(key.get_public_key())
            self.keys[spk.data] = key
            return spk.address(NET)

    def fund(self, amounts_sat: list[int], confirmations: int = 1, per_tx: int = 1000,
             watch_only: bool = False) -> list[str]:
        """Pay the wallet one output per amount (funding transactions, like
        coinbases; mined whatever mine_min_fee_rate), then mine `confirmations`
        blocks. Returns the funding txids. watch_only: to addresses the wallet
        watches without their keys (listed, not spendable, not solvable)."""
        txids = []
        with self.lock:
            for start in range(0, len(amounts_sat), per_tx):
                outs = [TransactionOutput(amount, script.Script.from_address(
                    self._watch_address() if watch_only else self.new_address()))
                        for amount in amounts_sat[start:start + per_tx]]
                marker = hashlib.sha256(b"fund-%d-%d" % (len(self.txs), start)).digest()
                tx = Transaction(vin=[TransactionInput(marker, 0xFFFFFFFF)], vout=outs)
                entry = TxEntry(tx, tx.txid().hex(), int(time.time()), funding=True)
                self.txs[entry.txid] = entry
                self.mempool.append(entry.txid)
                txids.append(entry.txid)
        if confirmations:
            self.mine(confirmations)
        return txids

    def mine(self, n: int = 1) -> list[str]:
        """Blocks whose coinbase pays a miner outside the wallet."""
        return self.generatetoaddress(n, OUTSIDE_ADDRESS)

    def _watch_address(self) -> str:
        self._key_counter += 1
        key = ec.PrivateKey(hashlib.sha256(b"watched-key-%d" % self._key_counter).digest())
        spk = script.p2wpkh(key.get_public_key())
        self.watch_only.add(spk.data)
        return spk.address(NET)

    # --- HTTP -------------------------------------------------------------------

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if handler.headers.get("Authorization") != expected:
            # As httprpc.cpp: a pause against brute force, a challenge, no body.
            time.sleep(0.25)
            handler.send_response(401)
            handler.send_header("WWW-Authenticate", 'Basic realm="jsonrpc"')
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        with self.lock:
            full = self.in_flight >= self.rpc_slots
            if not full:
                self.in_flight += 1
        if full:
            # As httpserver.cpp when the work queue is at -rpcworkqueue: no JSON.
            self.calls["(work queue full)"] += 1
            data = b"Work queue depth exceeded"
            handler.send_response(503)
            handler.send_header("Content-Type", "text/html; charset=ISO-8859-1")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        try:
            self._serve_call(handler, body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _serve_call(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        request_id = None
        try:
            request = json.loads(body)
            request_id = request.get("id")
            method, params = request["method"], request.get("params") or []
            fn = getattr(self, method, None) if not method.startswith("_") else None
            if fn is None or method in ("start", "stop", "close", "fund", "mine", "new_address",
                                        "hold", "release", "lock", "height", "double_spend",
                                        "block_txids"):
                raise RpcError(-32601, "Method not found")
            self.calls[method] += 1
            if self.warmup is not None:
                raise RpcError(-28, self.warmup)
            if method in WALLET_METHODS and not self.wallet_loaded:
                raise RpcError(-18, "Requested wallet does not exist or is not loaded")
            time.sleep(self.delays.get(method, 0.0))
            gate = self.gates.get(method)
            if gate is not None:
                self.held[method] += 1
                gate.wait(60)
            with self.lock:
                result = fn(*params) if isinstance(params, list) else fn(**params)
            status, reply = 200, {"result": result, "error": None, "id": request_id}
        except RpcError as exc:
            status = 404 if exc.code == -32601 else 500
            reply = {"result": None, "error": {"code": exc.code, "message": str(exc)},
                     "id": request_id}
        except (TypeError, ValueError, KeyError) as exc:
            status, reply = 500, {"result": None, "error": {"code": -1, "message": str(exc)},
                                  "id": request_id}
        data = json.dumps(reply).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    # --- chain state --------------------------------------------------------------

    @property
    def height(self) -> int:
        return len(self.blocks) - 1

    def _append_block(self, txids: list[str]) -> Block:
        """A block with a real header (version, previous hash, Merkle root of
        its txids, time, regtest bits, nonce) whose hash is the header's."""
        prev = self.blocks[-1].hash if self.blocks else None
        self._nonce += 1  # no proof of work: a block's hash is unique all the same
        now = int(time.time())
        header = (0x20000000).to_bytes(4, "little") + bytes.fromhex(prev or "00" * 32)[::-1] \
            + merkle_root(txids) + now.to_bytes(4, "little") + bytes.fromhex("ffff7f20") \
            + self._nonce.to_bytes(4, "little")
        block = Block(dsha256(header)[::-1].hex(), len(self.blocks), now, prev, txids, header)
        self.index[block.hash] = block
        self.blocks.append(block)
        for txid in txids:
            self.txs[txid].block = block.hash
        return block

    def _confirmations(self, entry: TxEntry) -> int:
        if entry.block is not None:
            return self.height - self._block(entry.block).height + 1
        for vin in entry.tx.vin:  # conflicted with a confirmed transaction
            other = self.spender.get((vin.txid.hex(), vin.vout))
            if other and other != entry.txid and self.txs[other].block is not None:
                return -self._confirmations(self.txs[other])
        return 0

    def _block(self, block_hash: str) -> Block:
        block = self.index.get(block_hash)
        if block is None:
            raise RpcError(-5, "Block not found")
        return block

    def block_txids(self, block_hash: str) -> list[str]:
        """The block's transactions, coinbase first (as getblock's "tx")."""
        return list(self._block(block_hash).txids)

    def _live(self, txid: str) -> bool:
        entry = self.txs.get(txid)
        return entry is not None and (entry.block is not None or txid in self.mempool)

    def _output(self, txid: str, vout: int) -> TransactionOutput | None:
        if not self._live(txid) or vout >= len(self.txs[txid].tx.vout):
            return None
        return self.txs[txid].tx.vout[vout]

    def _wallet_outputs(self, entry: TxEntry) -> list[tuple[int, TransactionOutput]]:
        return [(n, out) for n, out in enumerate(entry.tx.vout)
                if out.script_pubkey.data in self.keys or out.script_pubkey.data in self.watch_only]

    def _immature(self, entry: TxEntry) -> bool:
        return entry.coinbase and self._confirmations(entry) <= COINBASE_MATURITY

    def _safe(self, entry: TxEntry) -> bool:
        """CachedTxIsTrusted: confirmed, or unconfirmed and spending only the
        wallet's own coins, and neither replacing nor replaced."""
        if self._confirmations(entry) > 0:
            return True
        replaces = any(self.txs[other].replaced_by == entry.txid for other in self.txs)
        return (self._wallet_inputs(entry) and entry.replaced_by is None and not replaces)

    def _wallet_inputs(self, entry: TxEntry) -> bool:
        if entry.funding:
            return False
        return any((out := self._output(i.txid.hex(), i.vout)) is not None
                   and out.script_pubkey.data in self.keys for i in entry.tx.vin)

    def _evict(self, txid: str) -> None:
        """Remove a mempool transaction and everything that spends it."""
        if txid not in self.mempool:
            return
        self.mempool.remove(txid)
        entry = self.txs[txid]
        for vin in entry.tx.vin:
            if self.spender.get((vin.txid.hex(), vin.vout)) == txid:
                del self.spender[(vin.txid.hex(), vin.vout)]
        for n in range(len(entry.tx.vout)):
            child = self.spender.get((txid, n))
            if child:
                self._evict(child)

    # --- blockchain RPCs ------------------------------------------------------------

    def getrawmempool(self, verbose: bool = False) -> Any:
        if not verbose:
            return list(self.mempool)
        return {txid: self.getmempoolentry(txid) for txid in self.mempool}

    def getmempoolentry(self, txid: str) -> dict[str, Any]:
        if txid not in self.mempool:
            raise RpcError(-5, "Transaction not in mempool")
        entry = self.txs[txid]
        fee = 0 if entry.funding else self._fee(entry.tx)
        parents = sorted({i.txid.hex() for i in entry.tx.vin} & set(self.mempool))
        return {"vsize": vsize(entry.tx), "time": entry.time, "height": self.height,
                "fees": {"base": btc(fee), "modified": btc(fee)}, "depends": parents,
                "ancestorcount": 1 + len(parents),
                "bip125-replaceable": "yes" if any(i.sequence < 0xFFFFFFFE
                                                   for i in entry.tx.vin) else "no"}

    def waitfornewblock(self, timeout: int = 0) -> dict[str, Any]:
        """Wait (up to `timeout` ms; 0: no limit) for a new block; this call
        holds the lock only while it checks (a Condition releases it)."""
        start = self.blocks[-1].hash
        deadline = time.monotonic() + timeout / 1000 if timeout else None
        while self.blocks[-1].hash == start:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self.new_block.wait(left)
        return {"hash": self.blocks[-1].hash, "height": self.height}

    def getblockchaininfo(self) -> dict[str, Any]:
        return {"chain": "regtest", "blocks": self.height, "headers": self.height,
                "bestblockhash": self.blocks[-1].hash}

    def getblockcount(self) -> int:
        return self.height

    def getbestblockhash(self) -> str:
        return self.blocks[-1].hash

    def getblockhash(self, height: int) -> str:
        if not 0 <= height <= self.height:
            raise RpcError(-8, "Block height out of range")
        return self.blocks[height].hash

    def getblockheader(self, block_hash: str, verbose: bool = True) -> dict[str, Any]:
        block = self._block(block_hash)
        active = block_hash not in self.orphans
        header = {"hash": block.hash, "height": block.height, "time": block.time,
                  "merkleroot": block.header[36:68][::-1].hex(),
                  "confirmations": self.height - block.height + 1 if active else -1}
        if block.prev is not None:  # as Core: none for the genesis block
            header["previousblockhash"] = block.prev
        return header

    def generatetoaddress(self, nblocks: int, address: str, maxtries: int = 1000) -> list[str]:
        hashes = []
        with self.lock:
            for _ in range(nblocks):
                taken = [t for t in self.mempool if self.txs[t].funding or
                         self._fee(self.txs[t].tx) >= self.mine_min_fee_rate
                         * vsize(self.txs[t].tx)]
                self.mempool = [t for t in self.mempool if t not in taken]
                block = self._append_block([self._coinbase(address), *taken])
                hashes.append(block.hash)
                self._zmq_seq += 1
                self.zmq_pub.send_multipart([b"hashblock", bytes.fromhex(block.hash),
                                             (self._zmq_seq - 1).to_bytes(4, "little")])
            self.new_block.notify_all()
        return hashes

    def _coinbase(self, address: str) -> str:
        """The next block's coinbase: the subsidy (regtest: 50 BTC, halved
        every 150 blocks) to `address`; spendable at 101 confirmations."""
        height = self.height + 1
        subsidy = (50 * COIN) >> (height // 150)
        unique = height.to_bytes(4, "little") + len(self.txs).to_bytes(4, "little")
        tx = Transaction(vin=[TransactionInput(b"\x00" * 32, 0xFFFFFFFF,
                                               script_sig=script.Script(unique))],
                         vout=[TransactionOutput(subsidy, script.Script.from_address(address))])
        entry = TxEntry(tx, tx.txid().hex(), int(time.time()), funding=True, coinbase=True)
        self.txs[entry.txid] = entry
        return entry.txid

    def invalidateblock(self, block_hash: str) -> None:
        """Disconnect this block and its descendants: a reorg once new blocks
        are mined. As Core: their transactions go back to the mempool (the next
        block mines them again, unless a test double-spends a payment first);
        their coinbases are orphans, and what spends one leaves the mempool."""
        block = self._block(block_hash)
        if block_hash in self.orphans:
            return  # invalid already
        if block.height == 0:
            raise RpcError(-8, "Invalid parameter: cannot invalidate the genesis block")
        disconnected = self.blocks[block.height:]
        del self.blocks[block.height:]
        back: list[str] = []
        coinbases: list[str] = []
        for old in disconnected:
            self.orphans[old.hash] = old
            for txid in old.txids:
                self.txs[txid].block = None
                (coinbases if self.txs[txid].coinbase else back).append(txid)
        self.mempool[:0] = back
        for txid in coinbases:
            for n in range(len(self.txs[txid].tx.vout)):
                child = self.spender.get((txid, n))
                if child is not None:
                    self._evict(child)

    def double_spend(self, txid: str) -> str:
        """Test control: a payment from outside (fund()) that is back in the
        mempool after invalidateblock is replaced by another spend of its
        inputs, to someone else: mined instead, it leaves the chain for good
        (conflicted), as a real double spend. Returns the new txid."""
        entry = self.txs[txid]
        if not entry.funding or entry.coinbase or entry.block is not None:
            raise ValueError("only an unconfirmed fund() payment can be double-spent here")
        tx = Transaction(vin=[TransactionInput(i.txid, i.vout) for i in entry.tx.vin],
                         vout=[TransactionOutput(sum(o.value for o in entry.tx.vout) - 1000,
                                                 script.Script.from_address(OUTSIDE_ADDRESS))])
        other = TxEntry(tx, tx.txid().hex(), int(time.time()), funding=True)
        self.txs[other.txid] = other
        self._evict(txid)
        self.mempool.append(other.txid)
        for vin in tx.vin:
            point = (vin.txid.hex(), vin.vout)
            self.spender[point] = other.txid
            self.spends.setdefault(point, set()).update({txid, other.txid})
        return other.txid

    # --- wallet RPCs ------------------------------------------------------------------

    def getnewaddress(self, label: str = "", address_type: str = "bech32") -> str:
        return self.new_address()

    def getrawchangeaddress(self, address_type: str = "bech32") -> str:
        return self.new_address()

    def estimatesmartfee(self, conf_target: int, estimate_mode: str = "conservative"
                         ) -> dict[str, Any]:
        if self.fee_rate_sat_vb is None:  # as Core with no fee data (regtest, a young chain)
            return {"errors": ["Insufficient data or no feerate found"], "blocks": 0}
        return {"feerate": btc(int(self.fee_rate_sat_vb * 1000)), "blocks": conf_target}

    def loadwallet(self, filename: str, load_on_startup: Any = None) -> dict[str, Any]:
        if filename != WALLET_NAME:
            raise RpcError(-18, f"Wallet file verification failed. Failed to load database "
                                f"path '{filename}'. Path does not exist.")
        if self.wallet_loaded:
            raise RpcError(-35, f"Wallet \"{filename}\" is already loaded.")
        self.wallet_loaded = True
        return {"name": filename}

    def unloadwallet(self, wallet_name: str = WALLET_NAME, load_on_startup: Any = None
                     ) -> dict[str, Any]:
        if wallet_name != WALLET_NAME or not self.wallet_loaded:
            raise RpcError(-18, "Requested wallet does not exist or is not loaded")
        self.wallet_loaded = False
        return {}

    def listunspent(self, minconf: int = 1, maxconf: int = 9_999_999,
                    addresses: list[str] | None = None, include_unsafe: bool = True,
                    query_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        options = query_options or {}
        low = sat(options.get("minimumAmount", 0))
        high = sat(options["maximumAmount"]) if "maximumAmount" in options else None
        count = options.get("maximumCount")
        wanted = set()
        for address in addresses or []:
            try:
                script.Script.from_address(address)
            except Exception:
                raise RpcError(-5, f"Invalid Bitcoin address: {address}") from None
            if address in wanted:
                raise RpcError(-8, f"Invalid parameter, duplicated address: {address}")
            wanted.add(address)
        selected = []
        # bitcoind's order is its map's, not by amount: callers must not rely on one.
        # As AvailableCoins: no immature coinbase (unless asked), no locked coin
        # (lockunspent), no unsafe one unless include_unsafe.
        for txid in sorted(self.txs):
            entry = self.txs[txid]
            if not self._live(txid) or (self._immature(entry) and
                                        not options.get("include_immature_coinbase")):
                continue
            confirmations = self._confirmations(entry)
            safe = self._safe(entry)
            if not minconf <= confirmations <= maxconf or not (safe or include_unsafe):
                continue
            for n, out in self._wallet_outputs(entry):
                if (txid, n) in self.spender or (txid, n) in self.locked or out.value < low or \
                        (high is not None and out.value > high):
                    continue
                # As Core since the legacy wallet's removal: "spendable" is
                # always true, and a watched P2WPKH (its public key known) is
                # solvable; the wallet still cannot sign for it.
                selected.append({"txid": txid, "vout": n,
                                 "address": out.script_pubkey.address(NET),
                                 "scriptPubKey": out.script_pubkey.data.hex(),
                                 "amount": btc(out.value), "confirmations": confirmations,
                                 "spendable": True, "solvable": True, "safe": safe})
                if count and len(selected) >= count:
                    break
            else:
                continue
            break
        # As Core: the addresses filter the outputs maximumCount let through
        # (a page of them by address is not a page).
        return [o for o in selected if not wanted or o["address"] in wanted]

    def _tx_fields(self, entry: TxEntry) -> dict[str, Any]:
        """What Core's WalletTxToJSON says of a wallet transaction: its block,
        or whether it is trusted; the wallet's transactions spending the same
        inputs (walletconflicts) and, when it is not in the mempool, the
        mempool's (mempoolconflicts). A replacement sent with
        sendrawtransaction is not "replaced_by_txid" (only bumpfee says that)."""
        confirmations = self._confirmations(entry)
        fields: dict[str, Any] = {"confirmations": confirmations}
        if entry.block is not None:
            block = self._block(entry.block)
            fields.update(blockhash=block.hash, blockheight=block.height, blocktime=block.time)
        else:
            fields["trusted"] = bool(confirmations == 0 and self._safe(entry))
        rivals = {other for vin in entry.tx.vin
                  for other in self.spends.get((vin.txid.hex(), vin.vout), ())} - {entry.txid}
        signals = any(vin.sequence < 0xFFFFFFFE for vin in entry.tx.vin)
        fields.update(
            txid=entry.txid,
            walletconflicts=sorted(r for r in rivals if self._wallet_tx(self.txs[r])),
            mempoolconflicts=[] if entry.txid in self.mempool else
            sorted(r for r in rivals if r in self.mempool),
            time=entry.time, timereceived=entry.time,
            **{"bip125-replaceable": "no" if confirmations > 0 else "yes" if signals else
               "no" if entry.txid in self.mempool else "unknown"})
        return fields

    def _wallet_tx(self, entry: TxEntry) -> bool:
        return bool(self._wallet_inputs(entry) or self._wallet_outputs(entry))

    def _wallet_entries(self, entry: TxEntry, min_depth: int = 0) -> list[dict[str, Any]]:
        """listsinceblock/listtransactions lines: a receive per wallet output of a
        transaction that did not spend wallet coins, else one send (change hidden).
        As ListTransactions: receives only at least `min_depth` deep (not
        conflicted ones, but in `removed`), sends at any depth."""
        common = self._tx_fields(entry)
        if self._wallet_inputs(entry):
            lines = []
            for n, out in enumerate(entry.tx.vout):
                if out.script_pubkey.data in self.keys:
                    continue
                address = None if is_op_return(out.script_pubkey) else \
                    out.script_pubkey.address(NET)
                lines.append({**common, "category": "send", "vout": n, "address": address,
                              "amount": -btc(out.value)})
            return lines
        category = "receive"
        if entry.coinbase:  # as bitcoind: orphan, immature, then generate
            category = "orphan" if entry.block is None else \
                "immature" if self._immature(entry) else "generate"
        if common["confirmations"] < min_depth:
            return []
        return [{**common, "category": category, "vout": n,
                 "address": out.script_pubkey.address(NET), "amount": btc(out.value)}
                for n, out in self._wallet_outputs(entry)]

    def listsinceblock(self, blockhash: str | None = None, target_confirmations: int = 1,
                       include_watchonly: bool = False, include_removed: bool = True
                       ) -> dict[str, Any]:
        """As wallet/rpc/transactions.cpp: every wallet transaction less deep
        than the blocks since `blockhash` (confirmed since, unconfirmed, and
        replaced, abandoned or conflicted ones: their depth is 0 or negative),
        and in `removed` every wallet transaction of the blocks between
        `blockhash` and the fork point, as they are now (mined again or not)."""
        depth, removed = -1, []
        if blockhash:
            walk = self._block(blockhash)
            while walk.hash in self.orphans:  # back to the fork point
                if include_removed:
                    for txid in walk.txids:
                        if self._wallet_tx(self.txs[txid]):
                            removed.extend(self._wallet_entries(self.txs[txid], -100_000_000))
                walk = self._block(walk.prev)
            depth = self.height + 1 - walk.height
        transactions = []
        for entry in self._chain_order():
            if self._wallet_tx(entry) and (depth == -1 or
                                           abs(self._confirmations(entry)) < depth):
                transactions.extend(self._wallet_entries(entry))
        last = self.blocks[max(0, self.height - target_confirmations + 1)]
        return {"transactions": transactions, "removed": removed, "lastblock": last.hash}

    def _chain_order(self) -> list[TxEntry]:
        """Every transaction: the active chain's, the mempool's, then the rest."""
        ordered = [txid for block in self.blocks for txid in block.txids] + list(self.mempool)
        seen = set(ordered)
        return [self.txs[t] for t in ordered] + [e for t, e in self.txs.items() if t not in seen]

    def gettransaction(self, txid: str, include_watchonly: bool = False,
                       verbose: bool = False) -> dict[str, Any]:
        entry = self.txs.get(txid)
        if entry is None or not (self._wallet_inputs(entry) or self._wallet_outputs(entry)):
            raise RpcError(-5, "Invalid or non-wallet transaction id")
        result: dict[str, Any] = {**self._tx_fields(entry), "hex": entry.tx.serialize().hex(),
                                  "details": self._wallet_entries(entry)}
        if verbose:
            result["decoded"] = self.decoderawtransaction(result["hex"])
        return result

    def gettxout(self, txid: str, n: int, include_mempool: bool = True) -> dict[str, Any] | None:
        out = self._output(txid, n)
        entry = self.txs.get(txid)
        if out is None or (txid, n) in self.spender or \
                (entry.block is None and not include_mempool):
            return None
        return {"bestblock": self.blocks[-1].hash, "confirmations": self._confirmations(entry),
                "value": btc(out.value), "scriptPubKey": {"hex": out.script_pubkey.data.hex()}}

    def getrawtransaction(self, txid: str, verbose: Any = False,
                          blockhash: str | None = None) -> Any:
        """As a node without -txindex: a mempool transaction, or one in the
        block named."""
        entry = self.txs.get(txid)
        if blockhash is not None:
            block = self._block(blockhash)
            if txid not in block.txids:
                raise RpcError(-5, "No such transaction found in the provided block. Use "
                                   "gettransaction for wallet transactions.")
        elif entry is None or txid not in self.mempool:
            raise RpcError(-5, "No such mempool transaction. Use -txindex or provide a block "
                               "hash to enable blockchain transaction queries. Use "
                               "gettransaction for wallet transactions.")
        raw = entry.tx.serialize().hex()
        return self.decoderawtransaction(raw) | {"hex": raw} if verbose else raw

    def gettxoutproof(self, txids: list[str], blockhash: str | None = None) -> str:
        """A serialized CMerkleBlock proving that the block holds the
        transactions. Without a block hash, as a node without -txindex: the
        block of a transaction with an unspent output only."""
        if blockhash is None:
            entry = self.txs.get(txids[0]) if txids else None
            if entry is None or entry.block is None or all(
                    is_op_return(out.script_pubkey) or self._spent_in_chain(entry.txid, n)
                    for n, out in enumerate(entry.tx.vout)):
                raise RpcError(-5, "Transaction not yet in block")
            blockhash = entry.block
        block = self._block(blockhash)
        if not all(txid in block.txids for txid in txids):
            raise RpcError(-5, "Not all transactions found in specified or retrieved block")
        return merkle_block(block.header, block.txids, set(txids)).hex()

    def verifytxoutproof(self, proof: str) -> list[str]:
        """The transactions the proof commits to, as rpc/txoutproof.cpp: none
        if its tree does not lead to its header's Merkle root or does not
        count the block's transactions; -5 if its block is not in the best
        chain; -1 if it does not decode."""
        try:
            blockhash, root, n_tx, matched = parse_merkle_block(bytes.fromhex(proof))
        except ValueError:
            raise RpcError(-1, "DataStream::read(): end of data: iostream error") from None
        block = next((b for b in self.blocks if b.hash == blockhash), None)
        if root != bytes.fromhex(proof)[36:68]:
            return []
        if block is None:
            raise RpcError(-5, "Block not found in chain")
        return matched if n_tx == len(block.txids) else []

    def decoderawtransaction(self, hexstring: str) -> dict[str, Any]:
        tx = self._parse(hexstring)
        return {"txid": tx.txid().hex(), "vsize": vsize(tx),
                "vin": [{"txid": i.txid.hex(), "vout": i.vout, "sequence": i.sequence}
                        for i in tx.vin],
                "vout": [{"value": btc(o.value), "n": n,
                          "scriptPubKey": {"hex": o.script_pubkey.data.hex(),
                                           **({} if is_op_return(o.script_pubkey) else
                                              {"address": o.script_pubkey.address(NET)})}}
                         for n, o in enumerate(tx.vout)]}

    @staticmethod
    def _parse(hexstring: str) -> Transaction:
        try:
            return Transaction.parse(bytes.fromhex(hexstring))
        except Exception:
            raise RpcError(-22, "TX decode failed") from None

    # --- building, signing, sending ----------------------------------------------------

    def createrawtransaction(self, inputs: list[dict[str, Any]], outputs: Any,
                             locktime: int = 0, replaceable: bool = False) -> str:
        vin = []
        for item in inputs:
            sequence = item.get("sequence", 0xFFFFFFFD if replaceable else 0xFFFFFFFE)
            vin.append(TransactionInput(bytes.fromhex(item["txid"]), item["vout"],
                                        sequence=sequence))
        pairs = outputs if isinstance(outputs, list) else [outputs]
        vout, seen_data, seen_addresses = [], False, set()
        for pair in pairs:
            for key, value in pair.items():
                if key != "data" and key in seen_addresses:
                    raise RpcError(-8, f"Invalid parameter, duplicated address: {key}")
                seen_addresses.add(key)
                if key == "data":
                    if seen_data:
                        raise RpcError(-8, "Invalid parameter, duplicate key: data")
                    seen_data = True
                    data = bytes.fromhex(value)
                    vout.append(TransactionOutput(0, script.Script(b"\x6a" + bytes([len(data)])
                                                                   + data)))
                else:
                    try:
                        spk = script.Script.from_address(key)
                    except Exception:
                        raise RpcError(-5, f"Invalid Bitcoin address: {key}") from None
                    vout.append(TransactionOutput(sat(value), spk))
        return Transaction(version=2, vin=vin, vout=vout, locktime=locktime).serialize().hex()

    def signrawtransactionwithwallet(self, hexstring: str, prevtxs: Any = None,
                                     sighashtype: str = "ALL") -> dict[str, Any]:
        tx = self._parse(hexstring)
        errors = []
        for n, vin in enumerate(tx.vin):
            out = self._output(vin.txid.hex(), vin.vout)
            if self._spent_in_chain(vin.txid.hex(), vin.vout):
                out = None  # as Core's FindCoins: the chain's UTXO set and the mempool's outputs
            key = self.keys.get(out.script_pubkey.data) if out is not None else None
            if key is None:
                errors.append({"txid": vin.txid.hex(), "vout": vin.vout,
                               "error": "Input not found or already spent" if out is None else
                               "Unable to sign input, invalid stack size (possibly missing key)"})
                continue
            pub = key.get_public_key()
            digest = tx.sighash_segwit(n, script.p2pkh(pub), out.value)
            vin.witness = script.Witness([key.sign(digest).serialize() + b"\x01", pub.sec()])
        result: dict[str, Any] = {"hex": tx.serialize().hex(), "complete": not errors}
        if errors:
            result["errors"] = errors
        return result

    def sendrawtransaction(self, hexstring: str, maxfeerate: Any = 0.10) -> str:
        tx = self._parse(hexstring)
        txid = tx.txid().hex()
        if txid in self.txs and self._live(txid):
            if self.txs[txid].block is None:
                return txid  # in the mempool: the same answer
            # BroadcastTransaction (src/node/transaction.cpp) says "already in
            # chain" only while one of its outputs is in the chain's UTXO set;
            # an OP_RETURN never is, and a spent change is not: then the
            # mempool check fails on its inputs, spent by the transaction itself.
            if any(not is_op_return(out.script_pubkey) and not self._spent_in_chain(txid, n)
                   for n, out in enumerate(tx.vout)):
                raise RpcError(-27, "Transaction already in block chain")
            raise RpcError(-25, "bad-txns-inputs-missingorspent")
        # IsStandardTx: at most one dust output (MAX_DUST_OUTPUTS_PER_TX, for
        # ephemeral dust), and no transaction under 65 bytes without witness.
        dust = [o for o in tx.vout if not is_op_return(o.script_pubkey) and o.value < DUST_SAT]
        if len(dust) > 1:
            raise RpcError(-26, "dust")
        if stripped_size(tx) < MIN_STANDARD_TX_NONWITNESS_SIZE:
            raise RpcError(-26, "tx-size-small")
        total_in, conflicts = 0, set()
        for n, vin in enumerate(tx.vin):
            point = (vin.txid.hex(), vin.vout)
            out = self._output(*point)
            if out is None:
                raise RpcError(-25, "bad-txns-inputs-missingorspent")
            if self._immature(self.txs[point[0]]):
                raise RpcError(-26, "bad-txns-premature-spend-of-coinbase")
            other = self.spender.get(point)
            if other is not None:
                if self.txs[other].block is not None:
                    raise RpcError(-25, "bad-txns-inputs-missingorspent")
                conflicts.add(other)
            self._check_signature(tx, n, out)
            total_in += out.value
        total_out = sum(o.value for o in tx.vout)
        if total_out > total_in:
            raise RpcError(-26, "bad-txns-in-belowout")
        fee, size = total_in - total_out, vsize(tx)
        if dust and fee:  # PreCheckEphemeralTx: its one dust output is for a 0-fee parent only
            raise RpcError(-26, "dust, tx with dust output must be 0-fee")
        if fee < MIN_RELAY_SAT_VB * size:  # as validation.cpp: the fee, and the one needed
            raise RpcError(-26, f"min relay fee not met, {fee} < {MIN_RELAY_SAT_VB * size}")
        if maxfeerate and fee > sat(maxfeerate) * size / 1000:
            raise RpcError(-25, "Fee exceeds maximum configured by user (e.g. -maxtxfee, "
                                "maxfeerate)")
        if conflicts:
            replaced_fee = sum(self._fee(self.txs[c].tx) for c in conflicts)
            if fee < replaced_fee + INCREMENTAL_SAT_VB * size:  # policy/rbf.cpp's words
                raise RpcError(-26, f"insufficient fee, rejecting replacement {txid}, not enough "
                                    f"additional fees to relay; {money(fee - replaced_fee)} < "
                                    f"{money(INCREMENTAL_SAT_VB * size)}")
            for other in conflicts:
                self.txs[other].replaced_by = txid
                self._evict(other)
        self.txs[txid] = TxEntry(tx, txid, int(time.time()))
        self.mempool.append(txid)
        for vin in tx.vin:
            self.spender[(vin.txid.hex(), vin.vout)] = txid
            self.spends.setdefault((vin.txid.hex(), vin.vout), set()).add(txid)
            self.locked.discard((vin.txid.hex(), vin.vout))  # AddToSpends unlocks a spent coin
        return txid

    def lockunspent(self, unlock: bool, transactions: list[dict[str, Any]] | None = None,
                    persistent: bool = False) -> bool:
        """As wallet/rpc/coins.cpp: every outpoint checked before any changes."""
        if unlock and not transactions:
            self.locked.clear()
            return True
        points = []
        for item in transactions or []:
            txid, vout = item.get("txid"), item.get("vout")
            entry = self.txs.get(txid)
            if entry is None or not (self._wallet_outputs(entry) or self._wallet_inputs(entry)):
                raise RpcError(-8, "Invalid parameter, unknown transaction")
            if not isinstance(vout, int) or not 0 <= vout < len(entry.tx.vout):
                raise RpcError(-8, "Invalid parameter, vout index out of bounds")
            if (txid, vout) in self.spender:
                raise RpcError(-8, "Invalid parameter, expected unspent output")
            if unlock and (txid, vout) not in self.locked:
                raise RpcError(-8, "Invalid parameter, expected locked output")
            if not unlock and (txid, vout) in self.locked and not persistent:
                raise RpcError(-8, "Invalid parameter, output already locked")
            points.append((txid, vout))
        for point in points:
            (self.locked.discard if unlock else self.locked.add)(point)
        return True

    def listlockunspent(self) -> list[dict[str, Any]]:
        return [{"txid": txid, "vout": vout} for txid, vout in sorted(self.locked)]

    def sendtoaddress(self, address: str, amount: Any) -> str:
        """Another spend from the same wallet (an operator's payment): coin
        selection over confirmed, spendable, unlocked coins, the smallest that
        is enough, change back to the wallet, 2 sat/vB."""
        value = sat(amount)
        fee = 2 * 150
        coins = sorted((u for u in self.listunspent(1, include_unsafe=False)
                        if u["spendable"] and sat(u["amount"]) >= value + fee),
                       key=lambda u: sat(u["amount"]))
        if not coins:
            raise RpcError(-6, "Insufficient funds")
        coin = coins[0]
        outputs = [{address: btc(value)}]
        change = sat(coin["amount"]) - value - fee
        if change >= DUST_SAT:
            outputs.append({self.new_address(): btc(change)})
        raw = self.createrawtransaction([{"txid": coin["txid"], "vout": coin["vout"]}], outputs,
                                        0, True)
        return self.sendrawtransaction(self.signrawtransactionwithwallet(raw)["hex"])

    # --- listtransactions, as src/wallet/rpc/transactions.cpp pages it -----------------

    def listtransactions(self, label: str | None = None, count: int = 10, skip: int = 0,
                         include_watchonly: bool = False) -> list[dict[str, Any]]:
        """The `count` most recent wallet entries after the `skip` most recent,
        returned oldest first: Core walks its transactions newest first in the
        order the wallet learned them (wtxOrdered), appends each one's
        entries, stops once it has count + skip, and returns that slice
        reversed. No labels here: only "*" (or none) is served."""
        if label is not None and label != "*":
            raise RpcError(-8, 'Label argument must be a valid label name or "*".')
        if count < 0:
            raise RpcError(-8, "Negative count")
        if skip < 0:
            raise RpcError(-8, "Negative from")
        newest_first: list[dict[str, Any]] = []
        for txid in reversed(list(self.txs)):
            newest_first.extend(self._wallet_entries(self.txs[txid]))
            if len(newest_first) >= count + skip:
                break
        skip = min(skip, len(newest_first))
        count = min(count, len(newest_first) - skip)
        return list(reversed(newest_first[skip:skip + count]))

    def _spent_in_chain(self, txid: str, n: int) -> bool:
        spender = self.spender.get((txid, n))
        return spender is not None and self.txs[spender].block is not None

    def _fee(self, tx: Transaction) -> int:
        total_in = sum(self.txs[i.txid.hex()].tx.vout[i.vout].value for i in tx.vin)
        return total_in - sum(o.value for o in tx.vout)

    def _check_signature(self, tx: Transaction, n: int, out: TransactionOutput) -> None:
        fail = RpcError(-26, "mandatory-script-verify-flag-failed (Signature must be zero for "
                             "failed CHECK(MULTI)SIG operation)")
        items = tx.vin[n].witness.items if tx.vin[n].witness else []
        if len(items) != 2:
            raise fail
        try:
            pub = ec.PublicKey.parse(items[1])
            if script.p2wpkh(pub).data != out.script_pubkey.data:
                raise fail
            digest = tx.sighash_segwit(n, script.p2pkh(pub), out.value)
            if not pub.verify(ec.Signature.parse(items[0][:-1]), digest):
                raise fail
        except RpcError:
            raise
        except Exception:
            raise fail from None
