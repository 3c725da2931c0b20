"""What the gateway and its WebSocket clients say to each other
(docs/protocol.md, "WebSocket gateway"): requests, replies and batches of
messages, as JSON in text frames or msgpack in binary frames.

A connection speaks the kind of its first frame: the gateway answers and
delivers in text frames (JSON) to a client that began with a text frame, in
binary frames (msgpack) to one that began with a binary frame. In JSON a
payload that is not UTF-8 is base64 ("encoding": "base64"); msgpack carries
it as bytes. A message is encoded once for every connection it goes to.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack

from bus.protocol import Message

# Delivery frames carry up to this much of a stream's messages (a message
# larger than it goes alone): enough to batch small messages, little beside
# the smallest BUS_GATEWAY_SEND_BUFFER_BYTES (64 KiB).
FRAME_TARGET_BYTES = 16 << 10
# The most maps and arrays a request may hold (a publish's headers: 64 pairs).
MAX_REQUEST_CONTAINERS = 256

_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_packer = msgpack.Packer()
_BATCH_HEAD = _packer.pack("type") + _packer.pack("messages") + _packer.pack("stream")
_MESSAGES_KEY = _packer.pack("messages")


class BadFrame(ValueError):
    """A frame that is not a request of this protocol; `request_id` is its
    id when that much could be read (the reply carries it)."""

    def __init__(self, reason: str, request_id: Any = None) -> None:
        super().__init__(reason)
        self.request_id = request_id


def message_fields(msg: Message) -> dict[str, Any]:
    """A message as a client sees it: its topic and payload, its stored id
    and commit time (stored messages), its producer, seq and publish time
    (messages of a producer session), content type and headers."""
    fields: dict[str, Any] = {"topic": msg.topic, "payload": msg.payload}
    if msg.id is not None:
        fields["id"] = msg.id
        fields["committed_ns"] = msg.committed_ns
    meta = msg.meta
    for key in ("producer", "seq", "time_ns", "content_type", "headers"):
        if key in meta:
            fields[key] = meta[key]
    return fields


def json_item(msg: Message) -> str:
    fields = message_fields(msg)
    try:
        fields["payload"] = msg.payload.decode("utf-8")
    except UnicodeDecodeError:
        fields["payload"] = base64.b64encode(msg.payload).decode("ascii")
        fields["encoding"] = "base64"
    return _json.encode(fields)


def packed_item(msg: Message) -> bytes:
    return msgpack.packb(message_fields(msg))


class Encoded:
    """One message and its two encodings, each made when first asked for.
    A message that cannot be encoded (a meta value the writer never stores,
    from a publisher that went round it) is None: skipped and counted, and
    the messages after it go on."""

    __slots__ = ("msg", "_json", "_packed")
    unencodable = 0  # in all, for the gateway's stats

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self._json: str | None | bool = None
        self._packed: bytes | None | bool = None

    def item(self, binary: bool) -> str | bytes | None:
        cached = self._packed if binary else self._json
        if cached is None:
            try:
                cached = packed_item(self.msg) if binary else json_item(self.msg)
            except (TypeError, ValueError, OverflowError):
                Encoded.unencodable += 1
                cached = False
            if binary:
                self._packed = cached
            else:
                self._json = cached
        return cached or None


def batch(binary: bool, stream: int, items: list[str | bytes]) -> str | bytes:
    """One delivery frame: {"type": "messages", "stream": S, "messages": [...]}."""
    if binary:
        packer = msgpack.Packer()
        return b"\x83" + _BATCH_HEAD + packer.pack(stream) + _MESSAGES_KEY + \
            packer.pack_array_header(len(items)) + b"".join(items)  # type: ignore[arg-type]
    return f'{{"type":"messages","stream":{stream},"messages":[{",".join(items)}]}}'  # type: ignore[arg-type]


def encode(binary: bool, frame: dict[str, Any]) -> str | bytes:
    if binary:
        return msgpack.packb(frame)
    return _json.encode(_jsonable(frame))


def _jsonable(value: Any) -> Any:
    """bytes (a proof's hashes, a stored meta value) as base64 text in JSON."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def reply(binary: bool, request_id: Any, result: Any = None,
          error: tuple[str, str] | None = None) -> str | bytes:
    """A request's answer: {"type": "reply", "id", "ok": true, "result"} or
    {"type": "reply", "id", "ok": false, "error": {"code", "reason"}}."""
    frame: dict[str, Any] = {"type": "reply", "id": request_id, "ok": error is None}
    if error is None:
        frame["result"] = result
    else:
        frame["error"] = {"code": error[0], "reason": error[1]}
    return encode(binary, frame)


def notice(binary: bool, kind: str, **fields: Any) -> str | bytes:
    """A frame the gateway sends unasked ({"type": kind, ...}): a stream's end."""
    return encode(binary, {"type": kind, **fields})


def _check_values(value: Any, budget: list[int]) -> None:
    """At most MAX_REQUEST_CONTAINERS maps and arrays; map keys strings;
    strings encodable as UTF-8 (JSON lets a lone surrogate through, "\ud800",
    which no reply, log or stored topic could carry)."""
    if isinstance(value, str):
        if not _encodable(value):
            raise BadFrame("a string with a lone surrogate (not UTF-8)")
    elif isinstance(value, (dict, list)):
        budget[0] -= 1
        if budget[0] < 0:
            raise BadFrame(f"more than {MAX_REQUEST_CONTAINERS} maps and arrays")
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    raise BadFrame("map keys must be strings")
                _check_values(key, budget)
        for item in value.values() if isinstance(value, dict) else value:
            _check_values(item, budget)


def parse_request(data: str | bytes) -> dict[str, Any]:
    """A request frame: a map with "op" (a string), "id" (optional: echoed in
    the reply) and the op's arguments. BadFrame otherwise."""
    try:
        if isinstance(data, str):
            request = json.loads(data)
        else:
            request = msgpack.unpackb(data, raw=False, strict_map_key=False,
                                      max_array_len=4096, max_map_len=4096)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            RecursionError) as exc:
        raise BadFrame(f"not {'JSON' if isinstance(data, str) else 'msgpack'}: "
                       f"{str(exc)[:200]}") from None
    if not isinstance(request, dict):
        raise BadFrame("a request is a map")
    request_id = request.get("id")
    if not (request_id is None or isinstance(request_id, str) and len(request_id) <= 128
            and _encodable(request_id) or type(request_id) is int
            and -2**63 <= request_id < 2**64):
        raise BadFrame("'id' must be a string of at most 128 characters or an integer")
    try:
        _check_values(request, [MAX_REQUEST_CONTAINERS])
    except BadFrame as exc:
        raise BadFrame(str(exc), request_id) from None
    if not isinstance(request.get("op"), str):
        raise BadFrame("a request names its 'op' (a string)", request_id)
    return request


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
