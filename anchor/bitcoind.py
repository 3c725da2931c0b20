"""bitcoind, as the anchor worker sees it: JSON-RPC calls, block notifications,
and the few transaction facts the worker computes itself.

An answer too large to hold (the wallet sync's `listunspent` of a block,
`listsinceblock`) is read as a stream (`BitcoinRpc.stream`): the HTTP body is
parsed as it arrives, one element of the result at a time.

Amounts cross the RPC boundary as BTC; they are parsed as Decimal (never a
float) and converted to integer satoshis at once. `RpcUnavailable` means the
node could not be asked (connection refused, timeout, HTTP error without a
JSON-RPC body): the caller keeps its work and retries later. `RpcError` is an
answer: the node refused the call. `RpcAuthRefused`: the node refused the
credentials, which no retry mends.
"""

from __future__ import annotations

import base64
import codecs
import http.client
import json
import math
import urllib.parse
from collections.abc import Callable, Iterator
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
        self._stream_conn: http.client.HTTPConnection | None = None  # stream()'s
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
        response, data = self._request(method, params)
        return self._answer(method, response, data)

    def stream(self, method: str, *params: Any) -> Iterator[tuple[str | None, Any]]:
        """call(), for an answer too large to hold: the request is sent (and
        an error raised) now; the result is then read as it is iterated, one
        element at a time: (None, item) for each item of an array result,
        (key, item) for each item of an array member of an object result and
        (key, value) for its other members. Memory holds one element and a
        read buffer. It has a connection of its own, so calls can be made
        while it is read (one stream at a time); close() it
        (contextlib.closing) if not read to the end."""
        response, data = self._request(method, params, stream=True)
        if data is not None:  # not 200: an error (raised), or a body that is none
            return _elements(self._answer(method, response, data, "_stream_conn"))
        return self._streamed(method, response)

    def _request(self, method: str, params: tuple[Any, ...], stream: bool = False
                 ) -> tuple[http.client.HTTPResponse, bytes | None]:
        """The HTTP exchange of a call: the response, and its body read
        unless `stream` and 200 (then read by the caller)."""
        self._ids += 1
        body = json.dumps({"jsonrpc": "1.0", "id": self._ids, "method": method,
                           "params": list(params)}, default=str)
        slot = "_stream_conn" if stream else "_conn"
        for attempt in range(2):
            conn = getattr(self, slot)
            reused = conn is not None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
                    setattr(self, slot, conn)
                conn.request("POST", self.path, body,
                             {"Authorization": self._auth(), "Content-Type": "application/json"})
                response = conn.getresponse()
                data = None if stream and response.status == 200 else response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(slot)
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
            self._drop(slot)
            if attempt == 1 or not self.cookie_file:  # a cookie may just have been rewritten
                how = f"the cookie in {self.cookie_file}" if self.cookie_file else \
                    "BUS_BITCOIND_RPC_USER and BUS_BITCOIND_RPC_PASSWORD"
                raise RpcAuthRefused(f"bitcoind at {self.host}:{self.port} refused the RPC "
                                     f"credentials (HTTP 401): check {how}")
        return response, data

    def _answer(self, method: str, response: http.client.HTTPResponse, data: bytes,
                slot: str = "_conn") -> Any:
        try:
            reply = json.loads(data, parse_float=Decimal)
        except ValueError:
            self._drop(slot)
            # A full work queue (-rpcworkqueue) is HTTP 503 "Work queue depth
            # exceeded": the body says which, for the operator.
            said = data[:200].decode("utf-8", "replace").strip()
            raise RpcUnavailable(f"bitcoind answered {method} with HTTP {response.status} "
                                 f"and no JSON-RPC body" + (f": {said}" if said else "")
                                 ) from None
        if not isinstance(reply, dict):
            raise RpcUnavailable(f"bitcoind answered {method} with no JSON-RPC object")
        self._raise_error(method, reply.get("error"))
        return reply.get("result")

    @staticmethod
    def _raise_error(method: str, error: Any) -> None:
        if error:
            if not isinstance(error, dict):
                raise RpcUnavailable(f"bitcoind answered {method} with an error of no "
                                     f"JSON-RPC shape: {str(error)[:200]}")
            raise RpcError(error.get("code", 0), error.get("message", ""), method)

    def _streamed(self, method: str, response: http.client.HTTPResponse
                  ) -> Iterator[tuple[str | None, Any]]:
        complete = False
        try:
            text = _JsonStream(lambda size: _read_body(response, size))
            text.take("{")
            scalar: list[Any] = []  # a result that is no array or object: given after `error`
            while text.peek() != "}":
                key = text.value()
                text.take(":")
                if key == "result":
                    yield from _result_elements(text, scalar)
                elif key == "error":
                    self._raise_error(method, text.value())
                else:
                    text.value()  # id
                if text.peek() == ",":
                    text.take(",")
            text.take("}")
            if text.peek() != "":  # also reads the body to its end: the connection is kept
                raise ValueError("more after the JSON-RPC object")
            complete = True
            for value in scalar:
                yield None, value
        except (OSError, http.client.HTTPException) as exc:
            raise RpcUnavailable(f"bitcoind at {self.host}:{self.port} stopped answering "
                                 f"{method}: {exc}") from None
        except ValueError as exc:
            raise RpcUnavailable(f"bitcoind answered {method} with no JSON-RPC object: "
                                 f"{exc}") from None
        finally:
            if not complete:  # the rest of the body is unread: the connection cannot serve again
                self._drop("_stream_conn")

    def _drop(self, slot: str) -> None:
        conn = getattr(self, slot)
        if conn is not None:
            conn.close()
            setattr(self, slot, None)

    def close(self) -> None:
        self._drop("_conn")
        self._drop("_stream_conn")


STREAM_CHUNK = 1 << 16          # bytes read at a time from a streamed answer
STREAM_MAX_ELEMENT = 16 << 20   # characters one element of it may span


class _JsonStream:
    """A JSON text read in chunks: its structure a character at a time
    (`peek`, `take`), its values whole (`value`, json's own decoder on the
    buffer). What has been decoded is dropped from the buffer."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._decoder = json.JSONDecoder(parse_float=Decimal)
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._buf = ""
        self._pos = 0
        self._eof = False

    def _more(self) -> bool:
        if self._eof:
            return False
        chunk = self._read(STREAM_CHUNK)
        if self._pos:
            self._buf, self._pos = self._buf[self._pos:], 0
        if not chunk:
            self._eof = True
            self._buf += self._utf8.decode(b"", final=True)
            return False
        self._buf += self._utf8.decode(chunk)
        if len(self._buf) > STREAM_MAX_ELEMENT:
            raise ValueError(f"an element of over {STREAM_MAX_ELEMENT:,} characters")
        return True

    def peek(self) -> str:
        """The next character that is not white space; "" at the end."""
        while True:
            while self._pos < len(self._buf) and self._buf[self._pos] in " \t\r\n":
                self._pos += 1
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._more():
                return ""

    def take(self, expected: str) -> None:
        found = self.peek()
        if found != expected:
            raise ValueError(f"{expected!r} expected, {found or 'the end'!r} found")
        self._pos += 1

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if self._more():
                    continue
                raise ValueError(str(exc)) from None
            # A number at the buffer's end may go on in the next chunk.
            if end == len(self._buf) and self._more():
                continue
            self._pos = end
            return value


def _read_body(response: http.client.HTTPResponse, size: int) -> bytes:
    """Up to `size` bytes more of the body; a body that ends before its
    Content-Length is the node gone mid-answer, not the end of the JSON
    (http.client's read() says neither)."""
    chunk = response.read(size)
    if not chunk and response.length:
        raise http.client.IncompleteRead(b"", response.length)
    return chunk


def _result_elements(text: _JsonStream, scalar: list[Any]) -> Iterator[tuple[str | None, Any]]:
    """What BitcoinRpc.stream yields of a JSON-RPC `result`."""
    if text.peek() == "[":
        for item in _array(text):
            yield None, item
    elif text.peek() == "{":
        text.take("{")
        while text.peek() != "}":
            key = text.value()
            text.take(":")
            if text.peek() == "[":
                for item in _array(text):
                    yield key, item
            else:
                yield key, text.value()
            if text.peek() == ",":
                text.take(",")
        text.take("}")
    else:
        scalar.append(text.value())


def _elements(result: Any) -> Iterator[tuple[str | None, Any]]:
    """What BitcoinRpc.stream yields of a result already read whole."""
    if isinstance(result, dict):
        for key, value in result.items():
            if isinstance(value, list):
                yield from ((key, item) for item in value)
            else:
                yield key, value
    elif isinstance(result, list):
        yield from ((None, item) for item in result)
    else:
        yield None, result


def _array(text: _JsonStream) -> Iterator[Any]:
    text.take("[")
    while text.peek() != "]":
        yield text.value()
        if text.peek() == ",":
            text.take(",")
    text.take("]")


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
