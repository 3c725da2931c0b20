"""The wire protocol: every frame the bus encodes or decodes, in one module.

Data message (publisher -> proxy -> subscribers and writer), multipart:
    [topic, payload]            a plain ZeroMQ PUB in any language
    [topic, payload, meta]      meta: a msgpack map (see META_* keys)
Subscription frame (a SUB to the socket it connects to): one frame, first byte
    0x01 (subscribe) or 0x00 (unsubscribe), then the prefix. The proxy's own
    subscriptions (PROXY_SUBSCRIPTIONS) decide which topics it takes in.
Control request / reply (REQ -> ROUTER, one frame each after the envelope, msgpack maps):
    {"id": any, "cmd": str, "args": map}  ->  {"id": same, "ok": true, "result": any}
                                          or  {"id": same, "ok": false,
                                               "error": {"code": str, "reason": str}}

docs/protocol.md is the reference for clients in other languages; change both together.
Every decode failure raises ProtocolError with a short reason code that `stats` counts.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

# Topics starting with this are the bus's own (acks, watermarks): only the writer
# sends them, on its notify endpoint; the proxy never takes them in, nothing stores them.
RESERVED_PREFIX = "$"
ACK_TOPIC_PREFIX = "$bus.ack."      # + producer id: {producer, epoch, contiguous_seq, max_seq,
                                    #   refused, committed_ns}
NACK_TOPIC_PREFIX = "$bus.nack."    # + producer id: {producer, epoch, seq, code, reason}
COMMIT_TOPIC = "$bus.commit"        # {last_id, rows, committed_ns} after each commit

# Anchoring (anchor worker): requests in, results out; payloads in docs/protocol.md.
ANCHOR_REQUEST_TOPIC = "anchor.request"      # {hash: 32 bytes, ref?: str}
# An anchoring request's `ref`, stored with the document: at most this many characters.
MAX_ANCHOR_REF_CHARS = 256
ANCHOR_SUBMITTED_TOPIC = "anchor.submitted"  # txid, root, each document's inclusion proof
ANCHOR_CONFIRMED_TOPIC = "anchor.confirmed"  # after BUS_ANCHOR_CONFIRMATIONS
ANCHOR_ERROR_TOPIC = "anchor.error"          # a request refused, or anchoring held back


class AnchorStatus(StrEnum):
    """An anchor's state: stored in `anchors.status` and sent as is (anchor_*
    replies, proofs), so the values never change. The anchor worker moves an
    anchor along; the writer's `anchor_update` checks the move."""
    SIGNED = "signed"          # recorded with its signed transaction, not yet broadcast
    SUBMITTED = "submitted"    # broadcast (again `submitted` after a reorg took its block)
    CONFIRMED = "confirmed"    # BUS_ANCHOR_CONFIRMATIONS deep in a block
    FAILED = "failed"          # bitcoind refused its first transaction for good


OPEN_ANCHOR_STATUSES = (AnchorStatus.SIGNED, AnchorStatus.SUBMITTED)  # not yet confirmed
# `anchor_update`'s status asking a confirmed anchor back to `submitted`: a
# reorg took its block away (a move, not a state an anchor is in).
ANCHOR_UNCONFIRMED = "unconfirmed"

# A history page (reader `history` reply) lists each message as an array in this order;
# meta is the msgpack map as published (bytes), or nil.
HISTORY_ROW_FIELDS = ("id", "topic", "payload", "meta", "committed_ns")

# Known meta keys. Unknown keys are kept as received.
META_PRODUCER = "producer"        # str: producer id, stable for one Publisher
META_SEQ = "seq"                  # int >= 1: per-producer sequence, 1, 2, 3...
META_EPOCH = "epoch"              # int >= 1: the producer session (producer_open)
META_TIME_NS = "time_ns"          # int: publish time, ns since the Unix epoch
META_CONTENT_TYPE = "content_type"  # str: e.g. application/msgpack
META_HEADERS = "headers"          # map str -> str
META_ACK = "ack"                  # bool: producer asks for a commit acknowledgement
META_MAC = "mac"                  # bin 16, last: the message's authentication code, see SessionMac

MAX_FRAMES = 3                   # [topic, payload, meta]
SUBSCRIBE = 0x01
UNSUBSCRIBE = 0x00
# Integers the database stores are signed 64-bit.
MAX_INT64 = (1 << 63) - 1
MIN_INT64 = -(1 << 63)
MAX_PRODUCER_CHARS = 128
MAC_BYTES = 16
# Hole ranges an acknowledgement lists (the lowest first): enough for a
# publisher to re-send what a dropped message left missing, bounded so an
# acknowledgement stays a few hundred bytes whatever the holes.
ACK_MAX_HOLES = 32
# Maps and arrays a client reads of a notification before its mac is checked:
# an acknowledgement is a map, its holes an array of ACK_MAX_HOLES arrays.
NOTIFICATION_CONTAINERS = ACK_MAX_HOLES + 8
# Maps and arrays read of a refused message's meta to find its session.
MAX_META_CONTAINERS = 1000

# The first bytes a storable topic can start with: printable ASCII but "$", and
# the lead bytes of multi-byte UTF-8. The proxy subscribes to exactly these, one
# prefix each, so it takes in nothing else: no reserved topic, no frame that
# starts with a control byte, whoever sends it.
TOPIC_FIRST_BYTES = bytes(b for b in [*range(0x20, 0x80), *range(0xC2, 0xF5)]
                          if b != ord(RESERVED_PREFIX))
PROXY_SUBSCRIPTIONS = tuple(bytes((b,)) for b in TOPIC_FIRST_BYTES)

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
SESSION_REQUIRED = "session_required"  # meta names a producer but no epoch: no session
# Refusals that only the writer can decide (nacks), beside the reason codes above.
PRODUCER_FENCED = "producer_fenced"  # an older session of the producer: a newer one was opened
SEQ_OUT_OF_WINDOW = "seq_out_of_window"  # seq too far above the producer's highest (not decided)
UNKNOWN_SESSION = "unknown_session"  # an epoch the writer never handed out (database replaced?)
FORBIDDEN = "forbidden"              # (CURVE) the request's key may not run this command
BUSY = "busy"                        # the process cannot answer this now (proxy stats): retry
INTERNAL_ERROR = "internal_error"    # a bug in the process: answered and logged, never fatal
# Why the proxy cut a subscriber connection off (counted and logged: a SUB
# cannot be told over ZeroMQ; docs/protocol.md, "Subscription budgets").
OVER_CONNECTION_SUBSCRIPTION_BUDGET = "over_connection_subscription_budget"
OVER_TOTAL_SUBSCRIPTION_BUDGET = "over_total_subscription_budget"
# Control replies' other error codes (docs/protocol.md, "Control requests").
UNKNOWN_COMMAND = "unknown_command"
UNAVAILABLE = "unavailable"          # a database or node busy or unreachable: retry
FLUSH_FAILED = "flush_failed"        # the writer's `flush` could not commit (rows kept)
READ_FAILED = "read_failed"          # the reader's query failed (SQLite error): retry
PROOF_FAILED = "proof_failed"        # the reader could not build a document's proof
TOO_MANY_CONSUMERS = "too_many_consumers"  # BUS_MAX_CONSUMERS durable consumers exist
QUOTA_EXCEEDED = "quota_exceeded"    # (CURVE) the key is over a quota; the reason names it
SEALED_TOPIC = "sealed_topic"        # a purge of topics a seal covers (BUS_AUDIT_PREFIXES)
# utxo_* and anchor_* replies' error codes the anchor worker acts on.
NO_UTXO = "no_utxo"                  # no UTXO matches the reservation
REQUEST_ID_REUSED = "request_id_reused"  # a stored request id, sent with other arguments
LEASE_EXPIRED = "lease_expired"      # the lease is unknown or has run out: reserve again
UTXO_SPENT = "utxo_spent"            # utxo_renew of a lease whose UTXO is spent
NOT_FOUND = "not_found"              # no such UTXO, anchor or open seal
ALREADY_ANCHORED = "already_anchored"  # anchor_record of a document hash anchored before
# The anchor worker's anchor.error codes, beside bad_request, no_utxo and unavailable.
BUILD_FAILED = "build_failed"        # the transaction could not be built or signed
TRANSACTION_REFUSED = "transaction_refused"  # bitcoind refused it for good: anchored again
# The client library's code for a request that got no reply in time (BusTimeout).
TIMEOUT = "timeout"

# Every code above: the only way an error code is written outside this module
# (tests/test_layout.py fails on one written as a bare string).
ERROR_CODES = frozenset({
    TOO_FEW_FRAMES, TOO_MANY_FRAMES, EMPTY_TOPIC, TOPIC_NOT_UTF8, TOPIC_TOO_LONG,
    TOPIC_CONTROL_CHAR, MESSAGE_TOO_LARGE, META_NOT_MSGPACK, META_NOT_MAP, META_BAD_VALUE,
    BAD_REQUEST, RESERVED_TOPIC, SESSION_REQUIRED, PRODUCER_FENCED, SEQ_OUT_OF_WINDOW,
    UNKNOWN_SESSION, FORBIDDEN, BUSY, INTERNAL_ERROR, OVER_CONNECTION_SUBSCRIPTION_BUDGET,
    OVER_TOTAL_SUBSCRIPTION_BUDGET, UNKNOWN_COMMAND, UNAVAILABLE, FLUSH_FAILED, READ_FAILED,
    PROOF_FAILED, TOO_MANY_CONSUMERS, QUOTA_EXCEEDED, SEALED_TOPIC, NO_UTXO, REQUEST_ID_REUSED,
    LEASE_EXPIRED, UTXO_SPENT, NOT_FOUND, ALREADY_ANCHORED, BUILD_FAILED, TRANSACTION_REFUSED,
    TIMEOUT,
})


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

    @property
    def identity(self) -> Identity | None:
        """(producer, epoch, seq) if the message was sent in a producer session:
        only those identify one message (see session_identity)."""
        return session_identity(self.meta)


def is_reserved(topic: str) -> bool:
    return topic.startswith(RESERVED_PREFIX)


def ack_topic(producer: str) -> bytes:
    return (ACK_TOPIC_PREFIX + producer).encode("utf-8")


def nack_topic(producer: str) -> bytes:
    return (NACK_TOPIC_PREFIX + producer).encode("utf-8")


class MetaEncoder:
    """Encodes the meta maps of one producer (session).

    The same bytes as msgpack.packb of the map {producer, epoch?, seq, time_ns,
    content_type?, headers?, ack?, mac?} in that order, but the producer and
    epoch entries are packed once and the rest with a reused Packer: less than
    half the CPU of packb(dict), which matters on a publisher's hot path. With
    `signer` (a session's SessionMac) the map ends with the message's `mac`.
    Not thread-safe, like the socket it feeds.
    """

    def __init__(self, producer: str, epoch: int | None = None,
                 signer: SessionMac | None = None) -> None:
        self._pack = msgpack.Packer().pack
        self._producer = self._pack(META_PRODUCER) + self._pack(producer)
        if epoch is not None:
            self._producer += self._pack(META_EPOCH) + self._pack(epoch)
        self._fixed_pairs = 1 if epoch is None else 2
        self._signer = signer

    def encode(self, seq: int, *, time_ns: int | None = None, content_type: str | None = None,
               headers: dict[str, str] | None = None, ack: bool = False,
               topic: bytes = b"", payload: bytes = b"") -> bytes:
        """The meta of message `seq`; with a signer, `topic` and `payload` are
        the frames its mac covers."""
        pack = self._pack
        parts = [b"", self._producer, _PACKED_SEQ, pack(seq), _PACKED_TIME_NS,
                 pack(time.time_ns() if time_ns is None else time_ns)]
        if content_type:
            parts += (_PACKED_CONTENT_TYPE, pack(content_type))
        if headers:
            parts += (_PACKED_HEADERS, pack(headers))
        if ack:
            parts += (_PACKED_ACK, _PACKED_TRUE)
        signer = self._signer
        if signer is not None:
            parts.append(MAC_ENTRY)  # the pair's key and bin header: the tag follows
        # fixmap header: producer (+ epoch) and the pairs after them (a mac: half a part)
        parts[0] = bytes((0x80 | (self._fixed_pairs + (len(parts) + 1) // 2 - 1),))
        head = b"".join(parts)
        return head + signer.message(topic, payload, head) if signer is not None else head


(_PACKED_SEQ, _PACKED_TIME_NS, _PACKED_CONTENT_TYPE, _PACKED_HEADERS, _PACKED_ACK,
 _PACKED_TRUE) = (msgpack.packb(v) for v in (META_SEQ, META_TIME_NS, META_CONTENT_TYPE,
                                             META_HEADERS, META_ACK, True))
# The last entry of a signed map, up to its tag: fixstr "mac", then bin 8 of 16
# bytes (a3 6d 61 63 c4 10). The map's last MAC_BYTES bytes are the tag.
MAC_ENTRY = msgpack.packb(META_MAC) + b"\xc4" + bytes((MAC_BYTES,))
_MESSAGE_LABEL, _NOTIFICATION_LABEL = b"M", b"N"
_MESSAGE_HEADER = struct.Struct(">cII").pack
_NOTIFICATION_HEADER = struct.Struct(">cI").pack


class SessionMac:
    """The authentication codes of one producer session (docs/protocol.md,
    "Authenticating a session"): keyed BLAKE2b (RFC 7693) with the session key
    that producer_open hands out and a 16-byte output. It covers the whole
    message (topic, payload and every byte of the meta map but the tag
    itself) and the writer's acknowledgements and nacks to the session, so
    that nobody without the session key can send in the session's name, nor
    tell its publisher that a message is stored:

        message:       "M" | uint32 len(topic) | uint32 len(payload) | topic | payload | meta[:-16]
        notification:  "N" | uint32 len(topic) | topic | payload[:-16]

    (big-endian lengths), where the meta map (a notification's payload map)
    ends with the entry "mac": bin 16 (MAC_ENTRY) and its last 16 bytes are the
    tag. BLAKE2b rather than HMAC-SHA256 for its cost, which every message
    pays twice (publisher and writer): 0.6 against 0.9 us here, the keyed
    state computed once and copied; libsodium's crypto_generichash, Go's
    x/crypto/blake2b and the blakejs package compute the same."""

    def __init__(self, session_key: bytes) -> None:
        self._keyed = hashlib.blake2b(key=session_key, digest_size=MAC_BYTES)

    def message(self, topic: bytes, payload: bytes, meta_head: bytes) -> bytes:
        """The tag of a message whose meta, up to its tag, is `meta_head`."""
        h = self._keyed.copy()
        h.update(_MESSAGE_HEADER(_MESSAGE_LABEL, len(topic), len(payload)) + topic)
        h.update(payload)
        h.update(meta_head)
        return h.digest()

    def signed_meta(self, topic: bytes, payload: bytes, fields: dict[str, Any]) -> bytes:
        """The meta map of `fields` (any, in their order), ending with the mac of
        the message (topic, payload, that map)."""
        head = _map_head(fields)
        return head + self.message(topic, payload, head)

    def message_is_authentic(self, topic: bytes, payload: bytes, meta: bytes | None) -> bool:
        if meta is None:
            return False
        head = meta[:-MAC_BYTES]
        if not head.endswith(MAC_ENTRY):
            return False
        # message(), inlined: the writer checks every message of a session here.
        h = self._keyed.copy()
        h.update(_MESSAGE_HEADER(_MESSAGE_LABEL, len(topic), len(payload)) + topic)
        h.update(payload)
        h.update(head)
        return hmac.compare_digest(meta[-MAC_BYTES:], h.digest())

    def _notification_tag(self, topic: bytes, head: bytes) -> bytes:
        h = self._keyed.copy()
        h.update(_NOTIFICATION_HEADER(_NOTIFICATION_LABEL, len(topic)) + topic)
        h.update(head)
        return h.digest()

    def notification(self, topic: bytes, fields: dict[str, Any]) -> bytes:
        """A notification's payload: the msgpack map of `fields`, then its mac."""
        head = _map_head(fields)
        return head + self._notification_tag(topic, head)

    def notification_is_authentic(self, topic: bytes, payload: bytes) -> bool:
        head = payload[:-MAC_BYTES]
        return head.endswith(MAC_ENTRY) and \
            hmac.compare_digest(payload[-MAC_BYTES:], self._notification_tag(topic, head))


def _map_head(fields: dict[str, Any]) -> bytes:
    """The msgpack map of `fields` and a last `mac` entry, up to its tag."""
    return msgpack.packb({**fields, META_MAC: bytes(MAC_BYTES)})[:-MAC_BYTES]


def encode_meta(producer: str, seq: int, epoch: int | None = None,
                signer: SessionMac | None = None, **fields: Any) -> bytes:
    """One meta map; see MetaEncoder for the fields."""
    return MetaEncoder(producer, epoch, signer).encode(seq, **fields)


def decode_topic(raw: bytes, max_topic_bytes: int) -> str:
    if not raw:
        raise ProtocolError(EMPTY_TOPIC)
    if len(raw) > max_topic_bytes:
        raise ProtocolError(TOPIC_TOO_LONG, f"{len(raw)} > {max_topic_bytes} bytes")
    # The proxy takes in no topic starting below 0x20 (see TOPIC_FIRST_BYTES).
    if raw[0] < 0x20:
        raise ProtocolError(TOPIC_CONTROL_CHAR, f"first byte 0x{raw[0]:02x}")
    # PostgreSQL's text holds no NUL: stored there, one such topic failed its
    # whole batch (and the writer). Refused on both engines alike.
    if b"\x00" in raw:
        raise ProtocolError(TOPIC_CONTROL_CHAR, "a NUL byte")
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


def _unpack_meta(raw: bytes) -> Any:
    """A refused message's meta frame, at most MAX_META_CONTAINERS maps and
    arrays (TooManyContainers): an empty map is 1 byte on the wire and 64 in
    Python, and a refusal must cost no more than the few maps a session needs."""
    counted = _ContainerBudget(MAX_META_CONTAINERS)
    return msgpack.unpackb(raw, raw=False, strict_map_key=False, object_hook=counted,
                           list_hook=counted)


def decode_meta(raw: bytes) -> dict[str, Any]:
    # No container budget here, on the writer's hot path (a hook call a map):
    # the message limit bounds a stored meta (at most 64 bytes of Python per
    # byte on the wire, for one message at a time).
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(META_NOT_MSGPACK, type(exc).__name__) from None
    if not isinstance(meta, dict):
        raise ProtocolError(META_NOT_MAP, type(meta).__name__)
    # Checked inline, not in a loop or helper: this runs for every message the
    # writer stores (see bench/).
    producer = meta.get(META_PRODUCER)
    if producer is not None and not (isinstance(producer, str)  # is_producer_id, inlined
                                     and 0 < len(producer) <= MAX_PRODUCER_CHARS
                                     and "\x00" not in producer):
        raise ProtocolError(META_BAD_VALUE, f"producer must be a string of 1-{MAX_PRODUCER_CHARS}"
                                            " chars, no NUL")
    seq = meta.get(META_SEQ)
    if seq is not None and not (type(seq) is int and 1 <= seq <= MAX_INT64):
        raise ProtocolError(META_BAD_VALUE, "seq must be an integer from 1 to 2^63-1")
    epoch = meta.get(META_EPOCH)
    if epoch is not None and not (type(epoch) is int and 1 <= epoch <= MAX_INT64):
        raise ProtocolError(META_BAD_VALUE, "epoch must be an integer from 1 to 2^63-1")
    time_ns = meta.get(META_TIME_NS)
    if time_ns is not None and not (type(time_ns) is int and MIN_INT64 <= time_ns <= MAX_INT64):
        raise ProtocolError(META_BAD_VALUE, "time_ns must be a signed 64-bit integer")
    # What subscribers are handed as text: a header of bytes or a float (NaN)
    # stored once stopped every JSON client after it (the WebSocket gateway's).
    content_type = meta.get(META_CONTENT_TYPE)
    if content_type is not None and type(content_type) is not str:
        raise ProtocolError(META_BAD_VALUE, "content_type must be a string")
    headers = meta.get(META_HEADERS)
    if headers is not None and not (type(headers) is dict and all(
            type(k) is str and type(v) is str for k, v in headers.items())):
        raise ProtocolError(META_BAD_VALUE, "headers must map strings to strings")
    return meta


def decode_notification(payload: bytes) -> dict[str, Any] | None:
    """A `$bus.*` notification's map, or None if it is not one: a few maps and
    arrays at most (anyone can bind a notify endpoint while the writer
    restarts, and a client decodes before it can check a mac of another
    epoch), enough for an acknowledgement's ACK_MAX_HOLES holes."""
    try:
        note = msgpack.unpackb(payload, raw=False, strict_map_key=False,
                               object_hook=(counted := _ContainerBudget(NOTIFICATION_CONTAINERS)),
                               list_hook=counted)
    except Exception:  # msgpack raises several unrelated types; TooManyContainers
        return None
    return note if isinstance(note, dict) else None


def is_producer_id(value: Any) -> bool:
    # No NUL: it is stored as text, which PostgreSQL's cannot hold.
    return isinstance(value, str) and 0 < len(value) <= MAX_PRODUCER_CHARS \
        and "\x00" not in value


def _is_counter(value: Any) -> bool:
    return type(value) is int and 1 <= value <= MAX_INT64


Identity = tuple[str, int, int]  # (producer, epoch, seq) of a message in a producer session


def session_identity(meta: dict[str, Any]) -> Identity | None:
    """(producer, epoch, seq) when the meta names all three, else None: only
    such messages are deduplicated, acknowledged and refused with a nack."""
    producer, epoch, seq = meta.get(META_PRODUCER), meta.get(META_EPOCH), meta.get(META_SEQ)
    if producer is None or epoch is None or seq is None:
        return None
    return producer, epoch, seq


def refused_session(frames: list[bytes], max_meta_bytes: int) -> Identity | None:
    """The session identity of a message the writer refuses, if its meta frame
    still names a valid identity (the refusal can then be told to its
    producer, once its mac is checked). Only a message of exactly the three
    frames a mac covers: with another frame count, a copy of a real message
    would get that message's seq refused. A meta over `max_meta_bytes`, or of
    more containers than a meta may have, is not read (a refusal must not
    cost more than a message may)."""
    if len(frames) != 3 or len(frames[2]) > max_meta_bytes:
        return None
    try:
        meta = _unpack_meta(frames[2])
    except Exception:
        return None
    if not isinstance(meta, dict):
        return None
    producer, epoch, seq = meta.get(META_PRODUCER), meta.get(META_EPOCH), meta.get(META_SEQ)
    if is_producer_id(producer) and _is_counter(epoch) and _is_counter(seq):
        return producer, epoch, seq
    return None


def decode_message(frames: list[bytes], max_topic_bytes: int, max_message_bytes: int
                   ) -> tuple[str, bytes, bytes | None, dict[str, Any]]:
    """Validate a data message; returns (topic, payload, raw meta or None, meta)."""
    n = len(frames)
    if n == 3:  # the usual message, tested first (the writer decodes every one)
        raw, payload, meta_raw = frames
        size = len(raw) + len(payload) + len(meta_raw)
    elif n == 2:
        raw, payload = frames
        meta_raw, size = None, len(raw) + len(payload)
    elif n < 2:
        raise ProtocolError(TOO_FEW_FRAMES, "a data message needs [topic, payload]")
    else:
        raise ProtocolError(TOO_MANY_FRAMES, f"{n} frames")
    if size > max_message_bytes:
        raise ProtocolError(MESSAGE_TOO_LARGE, f"{size} > {max_message_bytes} bytes")
    topic = _DECODED_TOPICS.get(raw)
    if topic is None or len(raw) > max_topic_bytes:
        topic = decode_topic(raw, max_topic_bytes)
        if len(_DECODED_TOPICS) >= MAX_DECODED_TOPICS:  # bounded: endless topics
            _DECODED_TOPICS.clear()
        _DECODED_TOPICS[raw] = topic
    if meta_raw is None:
        return topic, payload, None, {}
    return topic, payload, meta_raw, decode_meta(meta_raw)


# Topic frames already found valid, and their text: a bus carries few topics
# many times, and decode_topic's checks are a tenth of the writer's ingest.
# The length limit, the caller's, is checked at each use.
_DECODED_TOPICS: dict[bytes, str] = {}
MAX_DECODED_TOPICS = 4096


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


# --- control requests and replies -------------------------------------------

def encode_request(request_id: Any, cmd: str, args: dict[str, Any] | None = None) -> bytes:
    return msgpack.packb({"id": request_id, "cmd": cmd, "args": args or {}})


# The most maps and arrays one request may hold (a utxo_upsert of 5,000
# outputs has about 5,000).
MAX_REQUEST_CONTAINERS = 50_000


def decode_request(frames: list[bytes], count: int | None = None
                   ) -> tuple[Any, str, dict[str, Any]]:
    """A request's frames (those after the envelope; `count` of them, when
    only the first are kept) -> (id, cmd, args). The id is recovered when
    possible, for the error reply."""
    if (count := len(frames) if count is None else count) != 1:
        raise ProtocolError(BAD_REQUEST, f"a request is one frame, not {count}")
    raw = frames[0]
    try:
        req = msgpack.unpackb(raw, raw=False, strict_map_key=False,
                              object_hook=(counted := _ContainerBudget()), list_hook=counted)
    except TooManyContainers:
        raise ProtocolError(BAD_REQUEST, f"more than {MAX_REQUEST_CONTAINERS} maps and arrays "
                                         "in one request") from None
    except Exception as exc:
        raise ProtocolError(BAD_REQUEST, f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(req, dict):
        raise ProtocolError(BAD_REQUEST, "request must be a msgpack map")
    cmd, args = req.get("cmd"), req.get("args", {})
    if not isinstance(cmd, str):
        raise RequestError(req.get("id"), BAD_REQUEST, "missing 'cmd' string")
    if not isinstance(args, dict):
        raise RequestError(req.get("id"), BAD_REQUEST, "'args' must be a map")
    # Only msgpack's uint64 (0xcf) encodes integers past 2^63-1: a request
    # without that byte needs no walk (the walk costs ~0.1 us an element).
    if b"\xcf" in raw and not _within_int64(args):
        raise RequestError(req.get("id"), BAD_REQUEST,
                           "an integer in 'args' is outside -2^63..2^63-1")
    return req.get("id"), cmd, args


def request_id_of(frames: list[bytes]) -> Any:
    """The `id` of a request refused before it is decoded (a quota), for its
    error reply: read from the top map's entries without building the others
    (msgpack's skip), None if there is none."""
    if len(frames) != 1:
        return None
    # An id is a string or a number: anything larger (a container, a string
    # of megabytes) raises instead of being built, as would the request.
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                max_buffer_size=max(len(frames[0]), 1), max_str_len=1024,
                                max_bin_len=1024, max_array_len=0, max_map_len=64,
                                max_ext_len=0)
    try:
        unpacker.feed(frames[0])
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "id":
                request_id = unpacker.unpack()
                return request_id if isinstance(request_id, (str, int, bytes)) else None
            unpacker.skip()
    except Exception:  # not msgpack, not a map: no id to give back
        return None
    return None


class TooManyContainers(ValueError):
    pass


class _ContainerBudget:
    """Counts the maps and arrays msgpack decodes (its hooks see each), so that
    a request of empty containers (an empty map is 1 byte on the wire and 64 in
    Python) stops at MAX_REQUEST_CONTAINERS instead of taking 70 times its size."""

    def __init__(self, limit: int = 0) -> None:
        self.left = limit or MAX_REQUEST_CONTAINERS

    def __call__(self, container: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise TooManyContainers
        return container


def _within_int64(value: Any) -> bool:
    """Is every integer inside `value` one SQLite can store? msgpack carries
    up to 2^64-1; beyond 2^63-1 SQLite's bindings raise OverflowError, so no
    request gets that far. Iterative: nesting may be as deep as msgpack allows."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int:
            if not MIN_INT64 <= item <= MAX_INT64:
                return False
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class RequestError(ProtocolError):
    """A request that decoded far enough to carry an id to echo."""

    def __init__(self, request_id: Any, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.request_id = request_id


def encode_reply_ok(request_id: Any, result: Any) -> bytes:
    return msgpack.packb({"id": request_id, "ok": True, "result": result})


def internal_error_reply(request_id: Any, exc: BaseException) -> bytes:
    """The reply to a request that failed on a bug (the handler logs it)."""
    return encode_reply_error(request_id, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


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
