"""The wire protocol: every frame the bus encodes or decodes, in one module.

Data message (publisher -> proxy -> subscribers and writer), multipart:
    [topic, payload]            a plain ZeroMQ PUB in any language
    [topic, payload, meta]      meta: a msgpack map (see META_* keys)
Subscription frame (subscriber -> proxy, seen by the writer through capture):
    one frame, first byte 0x01 (subscribe) or 0x00 (unsubscribe), then the prefix.
Control request / reply (REQ -> REP, one frame each, msgpack maps):
    {"id": any, "cmd": str, "args": map}  ->  {"id": same, "ok": true, "result": any}
                                          or  {"id": same, "ok": false,
                                               "error": {"code": str, "reason": str}}

docs/protocol.md is the reference for clients in other languages; change both together.
Every decode failure raises ProtocolError with a short reason code that `stats` counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

# Topics starting with this are the bus's own (acks, watermarks); never stored.
RESERVED_PREFIX = "$"
ACK_TOPIC_PREFIX = "$bus.ack."      # + producer id: {producer, contiguous_seq, max_seq, committed_ns}
COMMIT_TOPIC = "$bus.commit"        # {last_id, rows, committed_ns} after each commit

# Anchoring (anchor worker): requests in, results out; payloads in docs/protocol.md.
ANCHOR_REQUEST_TOPIC = "anchor.request"      # {hash: 32 bytes, ref?: str}
ANCHOR_SUBMITTED_TOPIC = "anchor.submitted"  # txid, root, each document's inclusion proof
ANCHOR_CONFIRMED_TOPIC = "anchor.confirmed"  # after BUS_ANCHOR_CONFIRMATIONS
ANCHOR_ERROR_TOPIC = "anchor.error"          # a request refused, or anchoring held back

# A history page (reader `history` reply) lists each message as an array in this order;
# meta is the msgpack map as published (bytes), or nil.
HISTORY_ROW_FIELDS = ("id", "topic", "payload", "meta", "committed_ns")

# Known meta keys. Unknown keys are kept as received.
META_PRODUCER = "producer"        # str: producer id, stable for one Publisher
META_SEQ = "seq"                  # int >= 1: per-producer sequence, 1, 2, 3...
META_TIME_NS = "time_ns"          # int: publish time, ns since the Unix epoch
META_CONTENT_TYPE = "content_type"  # str: e.g. application/msgpack
META_HEADERS = "headers"          # map str -> str
META_ACK = "ack"                  # bool: producer asks for a commit acknowledgement

MAX_FRAMES = 3                   # [topic, payload, meta]
SUBSCRIBE = 0x01
UNSUBSCRIBE = 0x00

CONTENT_MSGPACK = "application/msgpack"
CONTENT_JSON = "application/json"
CONTENT_TEXT = "text/plain; charset=utf-8"
CONTENT_BYTES = "application/octet-stream"

# Reason codes, as counted in stats and documented in docs/protocol.md.
TOO_FEW_FRAMES = "too_few_frames"
TOO_MANY_FRAMES = "too_many_frames"
EMPTY_TOPIC = "empty_topic"
TOPIC_NOT_UTF8 = "topic_not_utf8"
TOPIC_TOO_LONG = "topic_too_long"
TOPIC_CONTROL_CHAR = "topic_control_char"
MESSAGE_TOO_LARGE = "message_too_large"
META_NOT_MSGPACK = "meta_not_msgpack"
META_NOT_MAP = "meta_not_map"
META_BAD_VALUE = "meta_bad_value"
BAD_REQUEST = "bad_request"
RESERVED_TOPIC = "reserved_topic"    # raised to clients only: the writer skips these silently


class ProtocolError(ValueError):
    """A frame sequence that breaks the protocol; `reason` is a stable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Message:
    """A data message as subscribers see it. Not frozen: a frozen dataclass
    costs ~1 us more per message, a third of a history replay's client CPU."""

    topic: str
    payload: bytes
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None            # the stored row's id; None when received live
    committed_ns: int | None = None  # when the writer committed it (stored rows only)

    @property
    def producer(self) -> str | None:
        return self.meta.get(META_PRODUCER)

    @property
    def seq(self) -> int | None:
        return self.meta.get(META_SEQ)

    @property
    def time_ns(self) -> int | None:
        return self.meta.get(META_TIME_NS)


def is_reserved(topic: str) -> bool:
    return topic.startswith(RESERVED_PREFIX)


def ack_topic(producer: str) -> bytes:
    return (ACK_TOPIC_PREFIX + producer).encode("utf-8")


class MetaEncoder:
    """Encodes the meta maps of one producer.

    The same bytes as msgpack.packb of the map {producer, seq, time_ns,
    content_type?, headers?, ack?} in that order, but the producer entry is
    packed once and the rest with a reused Packer: less than half the CPU of
    packb(dict), which matters on a publisher's hot path. Not thread-safe, like
    the socket it feeds.
    """

    def __init__(self, producer: str) -> None:
        self._pack = msgpack.Packer().pack
        self._producer = self._pack(META_PRODUCER) + self._pack(producer)

    def encode(self, seq: int, *, time_ns: int | None = None, content_type: str | None = None,
               headers: dict[str, str] | None = None, ack: bool = False) -> bytes:
        pack = self._pack
        parts = [b"", self._producer, _PACKED_SEQ, pack(seq), _PACKED_TIME_NS,
                 pack(time.time_ns() if time_ns is None else time_ns)]
        if content_type:
            parts += (_PACKED_CONTENT_TYPE, pack(content_type))
        if headers:
            parts += (_PACKED_HEADERS, pack(headers))
        if ack:
            parts += (_PACKED_ACK, _PACKED_TRUE)
        parts[0] = bytes((0x80 | len(parts) // 2,))  # fixmap header: producer + pairs
        return b"".join(parts)


_PACKED_SEQ, _PACKED_TIME_NS, _PACKED_CONTENT_TYPE, _PACKED_HEADERS, _PACKED_ACK, _PACKED_TRUE = (
    msgpack.packb(v) for v in (META_SEQ, META_TIME_NS, META_CONTENT_TYPE, META_HEADERS,
                               META_ACK, True))


def encode_meta(producer: str, seq: int, **fields: Any) -> bytes:
    """One meta map; see MetaEncoder for the fields."""
    return MetaEncoder(producer).encode(seq, **fields)


def decode_topic(raw: bytes, max_topic_bytes: int) -> str:
    if not raw:
        raise ProtocolError(EMPTY_TOPIC)
    if len(raw) > max_topic_bytes:
        raise ProtocolError(TOPIC_TOO_LONG, f"{len(raw)} > {max_topic_bytes} bytes")
    # 0x00/0x01 would make a topic look like a subscription frame on the capture pipe.
    if raw[0] < 0x20:
        raise ProtocolError(TOPIC_CONTROL_CHAR, f"first byte 0x{raw[0]:02x}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(TOPIC_NOT_UTF8, str(exc)) from None


def encode_topic(topic: str, max_topic_bytes: int) -> bytes:
    """A client's topic as its frame; raises ProtocolError if the writer would
    not store it (too long, control character, reserved `$` prefix)."""
    raw = topic.encode("utf-8")
    decode_topic(raw, max_topic_bytes)
    if is_reserved(topic):
        raise ProtocolError(RESERVED_TOPIC, f"topics starting with {RESERVED_PREFIX!r} "
                                            "belong to the bus")
    return raw


def decode_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(META_NOT_MSGPACK, type(exc).__name__) from None
    if not isinstance(meta, dict):
        raise ProtocolError(META_NOT_MAP, type(meta).__name__)
    producer = meta.get(META_PRODUCER)
    seq = meta.get(META_SEQ)
    time_ns = meta.get(META_TIME_NS)
    if producer is not None and not (isinstance(producer, str) and 0 < len(producer) <= 128):
        raise ProtocolError(META_BAD_VALUE, "producer must be a string of 1-128 chars")
    if seq is not None and not (type(seq) is int and seq >= 1):
        raise ProtocolError(META_BAD_VALUE, "seq must be an integer >= 1")
    if time_ns is not None and type(time_ns) is not int:
        raise ProtocolError(META_BAD_VALUE, "time_ns must be an integer")
    return meta


def decode_message(frames: list[bytes], max_topic_bytes: int, max_message_bytes: int
                   ) -> tuple[str, bytes, bytes | None, dict[str, Any]]:
    """Validate a data message; returns (topic, payload, raw meta or None, meta)."""
    n = len(frames)
    if n < 2:
        raise ProtocolError(TOO_FEW_FRAMES, "a data message needs [topic, payload]")
    if n > MAX_FRAMES:
        raise ProtocolError(TOO_MANY_FRAMES, f"{n} frames")
    size = len(frames[0]) + len(frames[1]) + (len(frames[2]) if n == 3 else 0)
    if size > max_message_bytes:
        raise ProtocolError(MESSAGE_TOO_LARGE, f"{size} > {max_message_bytes} bytes")
    topic = decode_topic(frames[0], max_topic_bytes)
    if n == 2:
        return topic, frames[1], None, {}
    return topic, frames[1], frames[2], decode_meta(frames[2])


def parse_message(frames: list[bytes], max_topic_bytes: int = 1 << 16,
                  max_message_bytes: int = 1 << 31) -> Message:
    topic, payload, _, meta = decode_message(frames, max_topic_bytes, max_message_bytes)
    return Message(topic, payload, meta)


def message_from_row(row: list[Any] | tuple[Any, ...]) -> Message:
    """A history row (see HISTORY_ROW_FIELDS) as a Message. Stored meta was
    validated by the writer, so it is only unpacked here."""
    row_id, topic, payload, meta_raw, committed_ns = row
    meta = {} if meta_raw is None else msgpack.unpackb(meta_raw, raw=False,
                                                       strict_map_key=False)
    return Message(topic, payload, meta, row_id, committed_ns)


def is_subscription_frame(frames: list[bytes]) -> bool:
    return len(frames) == 1 and len(frames[0]) >= 1 and frames[0][0] in (SUBSCRIBE, UNSUBSCRIBE)


def subscription_frame(prefix: bytes, subscribe: bool = True) -> bytes:
    return bytes([SUBSCRIBE if subscribe else UNSUBSCRIBE]) + prefix


# --- control requests and replies -------------------------------------------

def encode_request(request_id: Any, cmd: str, args: dict[str, Any] | None = None) -> bytes:
    return msgpack.packb({"id": request_id, "cmd": cmd, "args": args or {}})


def decode_request(raw: bytes) -> tuple[Any, str, dict[str, Any]]:
    """Returns (id, cmd, args). The id is recovered when possible, for the error reply."""
    try:
        req = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(BAD_REQUEST, f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(req, dict):
        raise ProtocolError(BAD_REQUEST, "request must be a msgpack map")
    cmd, args = req.get("cmd"), req.get("args", {})
    if not isinstance(cmd, str):
        raise RequestError(req.get("id"), BAD_REQUEST, "missing 'cmd' string")
    if not isinstance(args, dict):
        raise RequestError(req.get("id"), BAD_REQUEST, "'args' must be a map")
    return req.get("id"), cmd, args


class RequestError(ProtocolError):
    """A request that decoded far enough to carry an id to echo."""

    def __init__(self, request_id: Any, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.request_id = request_id


def encode_reply_ok(request_id: Any, result: Any) -> bytes:
    return msgpack.packb({"id": request_id, "ok": True, "result": result})


def encode_reply_error(request_id: Any, code: str, reason: str) -> bytes:
    return msgpack.packb({"id": request_id, "ok": False,
                          "error": {"code": code, "reason": reason}})


def decode_reply(raw: bytes) -> dict[str, Any]:
    try:
        reply = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(BAD_REQUEST, f"reply is not msgpack ({type(exc).__name__})") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ProtocolError(BAD_REQUEST, "reply must be a map with 'ok'")
    return reply
