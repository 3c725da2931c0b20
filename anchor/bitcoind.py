"""bitcoind, as the anchor worker sees it: JSON-RPC calls, block notifications,
and the few transaction facts the worker computes itself.

Amounts cross the RPC boundary as BTC; they are parsed as Decimal (never a
float) and converted to integer satoshis at once. `RpcUnavailable` means the
node could not be asked (connection refused, timeout, HTTP error without a
JSON-RPC body): the caller keeps its work and retries later. `RpcError` is an
answer: the node refused the call. `RpcAuthRefused`: the node refused the
credentials, which no retry mends.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import urllib.parse
from decimal import Decimal
from pathlib import Path
from typing import Any

import zmq
from embit.transaction import Transaction

from bus.runner import StartupError

COIN = 100_000_000
OP_RETURN = 0x6A

# bitcoind's error codes the worker tells apart (src/rpc/protocol.h).
RPC_INVALID_ADDRESS_OR_KEY = -5      # unknown block / transaction
RPC_INVALID_PARAMETER = -8           # lockunspent: unknown or spent output
RPC_VERIFY_ERROR = -25               # missing or spent inputs, fee above maxfeerate
RPC_VERIFY_REJECTED = -26            # policy: fee too low, dust, conflict...
RPC_VERIFY_ALREADY_IN_CHAIN = -27


# What a kept-alive connection that the server closed raises at its next use.
STALE_CONNECTION = (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)


class RpcUnavailable(Exception):
    """bitcoind did not answer."""


class RpcAuthRefused(StartupError):
    """bitcoind refused the credentials (HTTP 401): a setting to fix, not a
    node to wait for. The worker stops with EX_CONFIG, which its unit does not
    restart."""

    exit_status = 78  # EX_CONFIG (sysexits.h)


class RpcError(Exception):
    def __init__(self, code: int, message: str, method: str) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.code = code
        self.message = message


def to_sat(btc: Decimal | str | int) -> int:
    value = Decimal(str(btc)) * COIN
    if value != value.to_integral_value():
        raise ValueError(f"{btc} BTC is not a whole number of satoshis")
    return int(value)


def to_btc(sat: int) -> str:
    """A satoshi amount as the exact BTC string bitcoind accepts."""
    return f"{Decimal(sat) / COIN:.8f}"


class BitcoinRpc:
    """JSON-RPC 1.0 over HTTP with basic auth: user/password, or bitcoind's
    cookie file (read at every connection: bitcoind rewrites it on restart)."""

    def __init__(self, url: str, user: str = "", password: str = "", cookie_file: str = "",
                 timeout_s: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"bitcoind RPC URL must be http://host:port[/wallet/NAME], got {url}")
        self.host, self.port = parts.hostname, parts.port or 8332
        self.path = parts.path or "/"
        self.user, self.password, self.cookie_file = user, password, cookie_file
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None
        self._ids = 0

    def _auth(self) -> str:
        credentials = f"{self.user}:{self.password}"
        if self.cookie_file:
            try:
                credentials = Path(self.cookie_file).read_text().strip()
            except OSError as exc:
                raise RpcUnavailable(f"cannot read bitcoind cookie {self.cookie_file}: "
                                     f"{exc.strerror}") from None
        return "Basic " + base64.b64encode(credentials.encode()).decode()

    def call(self, method: str, *params: Any) -> Any:
        self._ids += 1
        body = json.dumps({"jsonrpc": "1.0", "id": self._ids, "method": method,
                           "params": list(params)}, default=str)
        for attempt in range(2):
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self.host, self.port,
                                                            timeout=self.timeout_s)
                self._conn.request("POST", self.path, body,
                                   {"Authorization": self._auth(),
                                    "Content-Type": "application/json"})
                response = self._conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                # bitcoind closes a connection idle for -rpcservertimeout (30 s):
                # a kept-alive one is found closed only when used. Once more on
                # a new connection; every call the worker makes may be repeated
                # (sendrawtransaction of the same transaction answers the same).
                if attempt == 0 and reused and isinstance(exc, STALE_CONNECTION):
                    continue
                raise RpcUnavailable(f"bitcoind at {self.host}:{self.port} did not answer "
                                     f"{method}: {exc}") from None
            if response.status != 401:
                break
            self.close()
            if attempt == 1 or not self.cookie_file:  # a cookie may just have been rewritten
                how = f"the cookie in {self.cookie_file}" if self.cookie_file else \
                    "BUS_BITCOIND_RPC_USER and BUS_BITCOIND_RPC_PASSWORD"
                raise RpcAuthRefused(f"bitcoind at {self.host}:{self.port} refused the RPC "
                                     f"credentials (HTTP 401): check {how}")
        try:
            reply = json.loads(data, parse_float=Decimal)
        except ValueError:
            self.close()
            # A full work queue (-rpcworkqueue) is HTTP 503 "Work queue depth
            # exceeded": the body says which, for the operator.
            said = data[:200].decode("utf-8", "replace").strip()
            raise RpcUnavailable(f"bitcoind answered {method} with HTTP {response.status} "
                                 f"and no JSON-RPC body" + (f": {said}" if said else "")
                                 ) from None
        if not isinstance(reply, dict):
            raise RpcUnavailable(f"bitcoind answered {method} with no JSON-RPC object")
        error = reply.get("error")
        if error:
            if not isinstance(error, dict):
                raise RpcUnavailable(f"bitcoind answered {method} with an error of no "
                                     f"JSON-RPC shape: {str(error)[:200]}")
            raise RpcError(error.get("code", 0), error.get("message", ""), method)
        return reply.get("result")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def open_hashblock(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """SUB to bitcoind's `-zmqpubhashblock`: frames [b"hashblock", 32-byte
    hash (as RPC prints it, once hex-encoded), 4-byte little-endian sequence]."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.setsockopt(zmq.SUBSCRIBE, b"hashblock")
    sock.connect(endpoint)
    return sock


def parse_hashblock(frames: list[bytes]) -> tuple[str, int] | None:
    """(block hash hex, sequence) of a notification; None if it is not one."""
    if len(frames) != 3 or frames[0] != b"hashblock" or len(frames[1]) != 32 \
            or len(frames[2]) != 4:
        return None
    return frames[1].hex(), int.from_bytes(frames[2], "little")


# --- transactions ----------------------------------------------------------------

def parse_tx(tx_hex: str) -> Transaction:
    try:
        return Transaction.parse(bytes.fromhex(tx_hex))
    except Exception as exc:
        raise ValueError(f"not a Bitcoin transaction: {exc}") from None


def vsize(tx: Transaction) -> int:
    """Virtual size (BIP 141): weight / 4, rounded up."""
    total = len(tx.serialize())
    witness = sum(len(i.witness.serialize()) for i in tx.vin) + 2 if tx.is_segwit else 0
    return math.ceil(((total - witness) * 4 + witness) / 4)


def op_return_outputs(tx: Transaction) -> list[tuple[int, bytes]]:
    """(output index, pushed data) of each OP_RETURN output."""
    found = []
    for n, out in enumerate(tx.vout):
        spk = out.script_pubkey.data
        if spk[:1] == bytes([OP_RETURN]):
            found.append((n, _pushed(spk[1:])))
    return found


def _pushed(rest: bytes) -> bytes:
    """The data of one push opcode (OP_RETURN payloads are one push)."""
    if not rest:
        return b""
    op = rest[0]
    if op <= 75:
        return rest[1:1 + op]
    if op == 0x4C:  # OP_PUSHDATA1
        return rest[2:2 + rest[1]]
    if op == 0x4D:  # OP_PUSHDATA2
        return rest[3:3 + int.from_bytes(rest[1:3], "little")]
    return rest
