"""A real Bitcoin Core (`bitcoind -regtest`) for the anchor tests, where the
double (tests/bitcoind_double.py) stands in otherwise.

As Bitcoin Core's own functional tests start theirs (test/functional/
test_framework/test_node.py): a private datadir, RPC and ZMQ on free loopback
ports, no P2P listening (-listen=0: regtest would also bind the onion port),
wait for RPC with a deadline (-28 "warming up" is waited through), stop over
RPC, then SIGTERM, then SIGKILL, each with a deadline.

Two wallets: `miner`, which mines (101 blocks at start: one spendable
coinbase, more with every block mined) and pays; and the worker's wallet
(`anchoring`, at `url`), which holds only what a test funds it with, as the
double's wallet does. Node-wide calls work on the wallet URL too.

The attributes and methods the tests use on BitcoindDouble that a real node
can do: `url`, `user`, `password`, `zmq_endpoint`, `fund`, `mine`,
`mine_min_fee_rate` (blocks are made with `generateblock` from the mempool
transactions paying at least that rate), `double_spend` (a funding payment
reorged back to the mempool, replaced), `height`, `mempool`, `new_address`,
`block_txids`, `stop`/`start` (the same datadir and ports), `close`; any
other attribute is an RPC call on the worker's wallet (`node.gettransaction(txid)`),
answering as the worker's client parses (amounts as Decimal).

`BUS_TEST_BITCOIND` names the binary (default: ../shared/bitcoin/bin/bitcoind
from the repository root); `missing()` says in one line why it cannot run here.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from embit import ec, script
from embit.networks import NETWORKS

from anchor.bitcoind import BitcoinRpc, RpcError, RpcUnavailable, to_btc, to_sat

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BITCOIND = REPO_ROOT.parent / "shared" / "bitcoin" / "bin" / "bitcoind"
RPC_IN_WARMUP = -28
PR_SET_PDEATHSIG = 1  # linux/prctl.h
START_DEADLINE = 30.0
STOP_DEADLINE = 15.0
COINBASE_MATURITY = 100
NET = NETWORKS["regtest"]


def bitcoind_path() -> Path:
    return Path(os.environ.get("BUS_TEST_BITCOIND") or DEFAULT_BITCOIND)


def missing(binary: Path | None = None) -> str | None:
    """Why a real bitcoind cannot run here (one line), or None if it can."""
    binary = binary or bitcoind_path()
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return (f"no bitcoind at {binary} (BUS_TEST_BITCOIND names it; see "
                "../shared/bitcoin/README.md)")
    try:
        ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no ldd: starting it will tell
    libraries = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
    if libraries:
        return (f"bitcoind at {binary} lacks libraries {', '.join(libraries)} (Debian: "
                "apt-get install libevent-2.1-7 libevent-extra-2.1-7 libevent-pthreads-2.1-7 "
                "libzmq5 libsqlite3-0)")
    return None


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the test process dies (a killed pytest
    worker leaves no node behind). Linux only; elsewhere nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def rpcauth(user: str, password: str) -> str:
    """-rpcauth's USER:SALT$HMAC-SHA256(SALT, PASSWORD) (share/rpcauth/rpcauth.py)."""
    salt = hashlib.sha256(user.encode()).hexdigest()[:32]
    digest = hmac.new(salt.encode(), password.encode(), hashlib.sha256).hexdigest()
    return f"{user}:{salt}${digest}"


class RegtestNode:
    """One bitcoind -regtest process on `datadir`; started by the constructor."""

    user = "anchor"          # the worker's credentials (-rpcuser/-rpcpassword)
    password = "secret"
    harness_user = "harness"  # the tests' own calls (-rpcauth): not in `calls`
    harness_password = "harness-secret"

    def __init__(self, datadir: Path, free_port: Callable[[], int], *,
                 binary: Path | None = None, wallet: str = "anchoring",
                 extra_args: tuple[str, ...] = (), fund_miner: bool = True) -> None:
        self.binary = binary or bitcoind_path()
        self.datadir = Path(datadir)
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.wallet = wallet
        self.rpc_port = free_port()
        self.zmq_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.extra_args = tuple(extra_args)
        self.mine_min_fee_rate = 0.0   # sat/vB: mine() leaves cheaper transactions in the mempool
        self.lock = threading.RLock()  # for tests written against the double's lock: no-op here
        self.process: subprocess.Popen | None = None
        base = f"http://127.0.0.1:{self.rpc_port}"
        harness = (self.harness_user, self.harness_password)
        self.rpc = BitcoinRpc(self.url, *harness, timeout_s=60)
        self.node_rpc = BitcoinRpc(base, *harness, timeout_s=60)
        self.miner = BitcoinRpc(f"{base}/wallet/miner", *harness, timeout_s=60)
        self._wallets: list[str] = []
        self.start()
        try:
            for name in ("miner", self.wallet):
                # Loaded again by a restart (load_on_startup); a small keypool: fast to create.
                self.node_rpc.call("createwallet", name, False, False, "", False, True, True)
                self._wallets.append(name)
            if fund_miner:
                self.mine(COINBASE_MATURITY + 1)
        except BaseException:
            self.close()
            raise

    # --- what the tests use, as on the double ---------------------------------------

    @property
    def url(self) -> str:
        """The worker's wallet (BUS_BITCOIND_RPC_URL)."""
        return f"http://127.0.0.1:{self.rpc_port}/wallet/{self.wallet}"

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *params: self.rpc.call(method, *params)

    @property
    def calls(self) -> Counter[str]:
        """The RPC calls made with the worker's credentials, by method (from
        -debug=rpc's log lines, written unbuffered), as the double counts them."""
        counted: Counter[str] = Counter()
        marker = f" user={self.user}"
        try:
            text = (self.datadir / "regtest" / "debug.log").read_text(errors="replace")
        except OSError:
            return counted
        for line in text.splitlines():
            if "ThreadRPCServer method=" in line and line.endswith(marker):
                counted[line.split("method=", 1)[1].split(" ", 1)[0]] += 1
        return counted

    @property
    def height(self) -> int:
        return self.rpc.call("getblockcount")

    @property
    def mempool(self) -> list[str]:
        return self.rpc.call("getrawmempool")

    def block_txids(self, block_hash: str) -> list[str]:
        return self.rpc.call("getblock", block_hash)["tx"]

    def new_address(self) -> str:
        return self.rpc.call("getnewaddress")

    def miner_address(self) -> str:
        """A new address of the miner's wallet at each call: after an
        invalidateblock, a block of the same height, transactions, address and
        second as the invalidated one would be that block again, which bitcoind
        refuses ("block not accepted")."""
        return self.miner.call("getnewaddress")

    def fund(self, amounts_sat: list[int], confirmations: int = 1, per_tx: int = 1000,
             watch_only: bool = False) -> list[str]:
        """Pay the worker's wallet one output per amount, from the miner's
        wallet, then mine `confirmations` blocks. Returns the paying txids.
        watch_only: to an address the wallet watches and cannot sign for (a
        2-of-2 multisig of which it holds one key: a wallet with private keys
        imports no descriptor without one); listed spendable and solvable, as
        Core lists it."""
        txids = []
        for start in range(0, len(amounts_sat), per_tx):
            outputs = {}
            for amount in amounts_sat[start:start + per_tx]:
                address = self._half_key_address() if watch_only else self.new_address()
                outputs[address] = to_btc(amount)
            txids.append(self.miner.call("sendmany", "", outputs))
        if confirmations:
            self.mine(confirmations)
        return txids

    def mine(self, n: int = 1) -> list[str]:
        """n blocks to the miner's wallet, each with the mempool's transactions
        that pay at least mine_min_fee_rate (parents first)."""
        address = self.miner_address()
        if not self.mine_min_fee_rate:
            return self.rpc.call("generatetoaddress", n, address)
        hashes = []
        for _ in range(n):
            entries = self.rpc.call("getrawmempool", True)
            paying = {txid for txid, e in entries.items()
                      if Decimal(e["fees"]["modified"]) * 100_000_000
                      >= Decimal(str(self.mine_min_fee_rate)) * e["vsize"]}
            # A child goes with its parents only.
            taken = [txid for txid in sorted(paying, key=lambda t: entries[t]["ancestorcount"])
                     if all(parent in paying for parent in entries[txid]["depends"])]
            hashes.append(self.rpc.call("generateblock", address, taken)["hash"])
        return hashes

    def double_spend(self, txid: str) -> str:
        """A payment from the miner (fund()) that is back in the mempool after
        invalidateblock is replaced by another spend of its inputs, to the
        miner (a higher fee: full RBF): mined instead, the payment leaves the
        chain for good (conflicted). Returns the new txid."""
        decoded = self.miner.call("gettransaction", txid, False, True)["decoded"]
        inputs = [{"txid": v["txid"], "vout": v["vout"]} for v in decoded["vin"]]
        total_in = sum(to_sat(self.miner.call("gettransaction", v["txid"], False, True)
                              ["decoded"]["vout"][v["vout"]]["value"]) for v in decoded["vin"])
        fee = total_in - sum(to_sat(out["value"]) for out in decoded["vout"])
        raw = self.miner.call("createrawtransaction", inputs,
                              [{self.miner_address(): to_btc(total_in - fee - 10_000)}])
        signed = self.miner.call("signrawtransactionwithwallet", raw)
        return self.miner.call("sendrawtransaction", signed["hex"])

    def _half_key_address(self) -> str:
        secret = hashlib.sha256(b"half-%d-%d" % (os.getpid(), time.time_ns())).digest()
        ours = ec.PrivateKey(secret).wif(NET)
        theirs = ec.PrivateKey(hashlib.sha256(secret).digest()).get_public_key().sec().hex()
        desc = self.rpc.call("getdescriptorinfo", f"wsh(multi(2,{ours},{theirs}))")
        checksummed = f"wsh(multi(2,{ours},{theirs}))#{desc['checksum']}"
        [result] = self.rpc.call("importdescriptors", [{"desc": checksummed, "timestamp": "now"}])
        if not result.get("success"):
            raise RuntimeError(f"importdescriptors: {result}")
        return self.rpc.call("deriveaddresses", checksummed)[0]

    # --- life cycle -------------------------------------------------------------------

    def args(self) -> list[str]:
        port = self.rpc_port
        return [str(self.binary), "-regtest", f"-datadir={self.datadir}", "-server",
                "-listen=0", "-dnsseed=0", "-fixedseeds=0", "-printtoconsole=0",
                f"-rpcport={port}", "-rpcbind=127.0.0.1", "-rpcallowip=127.0.0.1",
                f"-rpcuser={self.user}", f"-rpcpassword={self.password}",
                f"-rpcauth={rpcauth(self.harness_user, self.harness_password)}", "-debug=rpc",
                f"-zmqpubhashblock={self.zmq_endpoint}", "-fallbackfee=0.0002",
                "-keypool=20", "-shrinkdebugfile=0", *self.extra_args]

    def start(self) -> None:
        """Start bitcoind and wait (with a deadline) until RPC answers."""
        self.process = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, preexec_fn=_stop_with_parent)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self.process.poll() is not None:
                error = self.process.stderr.read().strip() if self.process.stderr else ""
                raise RuntimeError(f"bitcoind exited with {self.process.returncode} at start: "
                                   f"{error or self.log_tail()}")
            try:
                self.node_rpc.call("getblockchaininfo")
                break
            except RpcUnavailable:
                pass
            except RpcError as exc:
                if exc.code != RPC_IN_WARMUP:
                    raise
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"bitcoind RPC not up within {START_DEADLINE}s: "
                                   f"{self.log_tail()}")
            time.sleep(0.02)
        # At a restart, the wallets (load_on_startup) are loaded after RPC is up.
        while not set(self._wallets) <= set(self.node_rpc.call("listwallets")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"bitcoind did not load {self._wallets}: {self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """RPC stop, then SIGTERM, then SIGKILL, each with a deadline."""
        for client in (self.rpc, self.node_rpc, self.miner):
            client.close()
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.node_rpc.call("stop")
        except (RpcUnavailable, RpcError):
            pass
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                self.process.send_signal(sig)
            try:
                self.process.wait(STOP_DEADLINE)
                break
            except subprocess.TimeoutExpired:
                continue
        self.node_rpc.close()
        if self.process.stderr:
            self.process.stderr.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_DEADLINE)

    def close(self) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        log = self.datadir / "regtest" / "debug.log"
        try:
            return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no debug.log)"

    def remove(self) -> None:
        """The datadir, once stopped (a few MB)."""
        shutil.rmtree(self.datadir, ignore_errors=True)
