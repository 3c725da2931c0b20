"""Client library: Publisher, Subscriber, HistoryClient and ControlClient.

Publisher opens a producer session with the writer (`producer_open`: an epoch
and the seq to go on from), connects an XPUB to the proxy's SUB and waits for
the proxy's subscriptions before its first message, so the first message
published right after connecting is not dropped (ZeroMQ's slow joiner). Each
message carries meta with the producer id, the epoch, a sequence, and the
publish time; acknowledgements and nacks come from the writer's notify
endpoint. Subscriber is a SUB on the proxy's PUB (and on the writer's notify
endpoint for "$" topics), and reads stored messages through HistoryClient (the
reader) to catch up or to resume a durable consumer. ControlClient speaks the
request/reply control protocol with a timeout, closing and reopening its REQ
socket after a timeout (the ZeroMQ Guide's Lazy Pirate).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import socket as _socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from bus import protocol, security, sockets
from bus.config import BusConfig, load_config, with_overrides
from bus.protocol import Message, ProtocolError

__all__ = ["BusError", "BusTimeout", "ControlClient", "HistoryClient", "HistoryPage", "Message",
           "MessageRefused", "ProducerFenced", "ProtocolError", "Publisher", "Subscriber"]


class BusError(Exception):
    """The bus answered with an error, or could not be reached."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class BusTimeout(BusError):
    """No answer within the timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "timeout")


class ProducerFenced(BusError):
    """A newer session of this producer id was opened (another Publisher with
    the same id, usually a restarted one): this one may not publish any more."""

    def __init__(self, message: str) -> None:
        super().__init__(message, protocol.PRODUCER_FENCED)


class MessageRefused(BusError):
    """The writer refused messages: `refused` lists (seq, code, reason), oldest
    first; `code` is the first one's. `unknown` counts refusals whose seqs could
    not be learned (more than the writer remembers were missed)."""

    def __init__(self, refused: list[tuple[int, str, str]], unknown: int = 0) -> None:
        parts = [f"seq {seq}: {code} ({reason})" for seq, code, reason in refused[:5]]
        if len(refused) > 5:
            parts.append(f"and {len(refused) - 5} more")
        if unknown:
            parts.append(f"{unknown} more refused, seqs unknown")
        super().__init__(f"{len(refused) + unknown} message(s) refused by the writer: "
                         + "; ".join(parts), refused[0][1] if refused else "refused")
        self.refused = refused
        self.unknown = unknown


# A durable consumer whose position could not be stored tries again this much later.
ACK_RETRY_SECONDS = 1.0
# Control errors that no retry can cure: a durable subscriber stops on them.
PERMANENT_ERRORS = frozenset({protocol.FORBIDDEN, protocol.BAD_REQUEST, "too_many_consumers"})
# Refusals a Publisher keeps for its next flush() to raise (the count goes on).
MAX_REFUSALS_REPORTED = 10_000


def default_producer_id() -> str:
    return f"{_socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Publisher:
    """Publishes data messages through the proxy, and learns what was stored.

    `connect()` (or entering the context manager) opens a producer session with
    the writer (`producer_open`: the next epoch of `producer_id` and the seq to
    continue from; an older incarnation of the same id still running is fenced
    from then on) and blocks until the proxy has subscribed to this publisher
    and the first acknowledgement of the session has arrived, or raises
    BusTimeout. `publish()` blocks while the queue to the proxy is full
    (backpressure) up to `send_timeout` seconds, then raises.

    Every message is kept until the writer acknowledges it (`$bus.ack.<producer>`
    on the writer's notify endpoint carries the highest sequence up to which
    everything is decided: stored, or refused with a `$bus.nack.<producer>`).
    `flush()` waits for that, re-sending what is still unacknowledged when
    acknowledgements stop for `resend_after` seconds (then 2x, 4x, ... up to
    30 s), with the same sequence numbers: the writer stores each (producer,
    seq) once. It raises MessageRefused for messages the writer refused since
    the last flush, and ProducerFenced once a newer session of the same
    producer id was opened. `publish(..., wait=True)` is publish + flush. At
    most `max_unacked` messages are kept: past that, `publish` waits for
    acknowledgements first (up to `send_timeout`, like a full socket).
    `close()` does not wait for acknowledgements; it waits up to `linger_ms`
    for queued messages to leave.
    """

    def __init__(self, config: BusConfig | None = None, *, endpoint: str | None = None,
                 producer_id: str | None = None, context: zmq.Context | None = None,
                 connect_timeout: float | None = None, send_timeout: float | None = None,
                 linger_ms: int = 5000, resend_after: float = 1.0,
                 max_unacked: int = 100_000) -> None:
        config = config or load_config()
        if endpoint:
            config = with_overrides(config, pub_endpoint=endpoint)
        self.config = config
        self.producer_id = producer_id or default_producer_id()
        if not protocol.is_producer_id(self.producer_id):
            raise ValueError(f"producer_id must be a string of 1-{protocol.MAX_PRODUCER_CHARS} "
                             "chars")
        self.connect_timeout = (config.request_timeout_ms / 1000.0
                                if connect_timeout is None else connect_timeout)
        self.send_timeout = send_timeout
        self.linger_ms = linger_ms
        self.resend_after = resend_after
        self.max_unacked = max_unacked
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._acks: zmq.Socket | None = None
        self._control: ControlClient | None = None
        self.epoch: int | None = None  # this session's, from producer_open
        self.last_seq = 0
        self.acked_seq = 0      # every message up to this one is decided (stored or refused)
        self.resent = 0
        self.refused_total = 0  # messages of this session the writer refused
        # (seq, frames) in seq order, oldest first: acknowledgements pop from the left.
        self._unacked: deque[tuple[int, tuple[bytes, bytes, bytes]]] = deque()
        self._refusals: dict[int, tuple[str, str]] = {}  # seq -> (code, reason), not yet acked
        self._refused_report: list[tuple[int, str, str]] = []  # for the next flush to raise
        self._refusals_unknown = 0  # refusals the writer counted that could not be told apart
        self._fenced: str | None = None
        self._session_acked = False
        self._mac: protocol.SessionMac | None = None
        self._proxy_prefixes: set[bytes] = set()  # the proxy's subscriptions seen so far
        self._topics: dict[str, bytes] = {}  # validated topic -> frame
        self._meta = protocol.MetaEncoder(self.producer_id)
        self._ack_topic = protocol.ack_topic(self.producer_id)
        self._nack_topic = protocol.nack_topic(self.producer_id)

    def connect(self) -> Publisher:
        if self._sock is not None:
            return self
        cfg = self.config
        deadline = time.monotonic() + self.connect_timeout
        self._sock = sockets.open_publisher(self._ctx, cfg, self.linger_ms)
        if self.send_timeout is not None:
            self._sock.setsockopt(zmq.SNDTIMEO, int(self.send_timeout * 1000))
        # A nack missed while the nack subscription is still on its way is
        # learned from the acknowledgements' `refused` count (_learn_refusals).
        self._acks = sockets.open_subscriber(self._ctx, cfg, [self._ack_topic, self._nack_topic],
                                             cfg.notify_endpoint)
        self._control = ControlClient(cfg.control_endpoint,
                                      max(1, int(self.connect_timeout * 1000)), 0, self._ctx,
                                      security.client_keys(cfg))
        try:
            self._open_session()
            self._wait_ready(deadline)
        except BaseException:
            self.close(linger_ms=0)
            raise
        return self

    def _open_session(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        pause = 0.05
        try:
            while True:
                try:
                    session = self._control.request("producer_open",
                                                    {"producer": self.producer_id})
                    break
                except BusTimeout:
                    raise
                except BusError as exc:
                    # The writer could not commit the session (its database is
                    # busy or reconnecting) and says to retry: so we do, within
                    # the connect timeout.
                    if exc.code != protocol.UNAVAILABLE or time.monotonic() + pause > deadline:
                        raise
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
        except BusTimeout:
            raise BusTimeout(f"the writer at {self.config.control_endpoint} did not open a "
                             f"producer session within {self.connect_timeout:g}s (is bus-writer "
                             "running?" + (" With CURVE: is this key in publishers/?"
                                           if self.config.curve_dir else "") + ")") from None
        self.epoch, next_seq = session["epoch"], session["next_seq"]
        key = session.get("session_key")  # CURVE: each message carries its MAC
        self._mac = None if key is None else protocol.SessionMac(key)
        self.last_seq = self.acked_seq = next_seq - 1
        self._meta = protocol.MetaEncoder(self.producer_id, self.epoch)

    def _wait_ready(self, deadline: float) -> None:
        """Until the proxy has subscribed to this publisher (its first subscription
        frame) and this session's first acknowledgement has arrived (the writer
        sends one when our subscription reaches it: acknowledgements reach us)."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._acks, zmq.POLLIN)
        while not (self._proxy_prefixes and self._session_acked):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(int(remaining * 1000) + 1):
                if not self._proxy_prefixes:
                    raise BusTimeout(f"proxy at {self.config.pub_endpoint} did not subscribe "
                                     f"within {self.connect_timeout:g}s (is bus-proxy running?)")
                raise BusTimeout(f"no acknowledgement from the writer's notify endpoint "
                                 f"{self.config.notify_endpoint} within "
                                 f"{self.connect_timeout:g}s (is BUS_NOTIFY_ENDPOINT the "
                                 "writer's?)")
            self.read_acks()
            self._raise_if_fenced()  # another open of our id came first

    def _wait_proxy_subscription(self, prefix: bytes) -> None:
        """The proxy subscribes to every first byte a topic may have, all at once
        when we connect; a message sent before its byte's subscription arrived
        would be dropped by our own socket."""
        deadline = time.monotonic() + self.connect_timeout
        while prefix not in self._proxy_prefixes:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1):
                raise BusTimeout(f"the proxy at {self.config.pub_endpoint} has not subscribed "
                                 f"to topics starting with {prefix!r}")
            self._read_proxy_subscriptions()

    def publish(self, topic: str, payload: bytes | str, *, content_type: str | None = None,
                headers: dict[str, str] | None = None, wait: bool = False,
                timeout: float | None = None) -> int:
        """Send one message; returns its sequence number.

        wait=True returns only once the writer has committed it (see flush).
        Raises protocol.ProtocolError (a ValueError) for a message the writer
        would refuse (topic, size of all frames, header types), before anything
        is sent; ProducerFenced once a newer session of this producer exists.
        """
        if self._sock is None:
            self.connect()
        if self._fenced is not None:
            raise ProducerFenced(self._fenced)
        topic_frame = self._topics.get(topic)
        if topic_frame is None:
            topic_frame = protocol.encode_topic(topic, self.config.max_topic_bytes)
            self._wait_proxy_subscription(topic_frame[:1])
            if len(self._topics) >= 1024:  # bounded: publishers with endless topics
                self._topics.clear()
            self._topics[topic] = topic_frame
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
            content_type = content_type or protocol.CONTENT_TEXT
        if headers is not None and not all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in headers.items()):
            raise protocol.ProtocolError(protocol.META_BAD_VALUE, "headers must map str to str")
        if len(self._unacked) >= self.max_unacked:  # backpressure, like a full socket
            self._wait_acked(self.max_unacked // 2, self.send_timeout)
        seq = self.last_seq + 1
        mac = None if self._mac is None else self._mac(topic_frame, payload, self.epoch, seq)
        frames = (topic_frame, payload, self._meta.encode(seq, content_type=content_type,
                                                          headers=headers, mac=mac))
        size = len(topic_frame) + len(payload) + len(frames[2])
        if size > self.config.max_message_bytes:
            raise protocol.ProtocolError(protocol.MESSAGE_TOO_LARGE,
                                         f"{size} > {self.config.max_message_bytes} bytes "
                                         "(topic, payload and meta)")
        self._send(frames)
        # Only now is the seq used: a message that was not sent leaves no hole.
        self._unacked.append((seq, frames))
        self.last_seq = seq
        if wait:
            self.flush(timeout)
        elif seq & 0xFF == 0:
            self.read_acks()  # now and then, so the unacknowledged set stays small
        return seq

    def _send(self, frames: tuple[bytes, bytes, bytes]) -> None:
        send = self._sock.send
        try:
            # Three sends, not send_multipart: a third of the CPU per message here.
            # libzmq checks the high-water mark on the first part only, so a
            # message is never left half-sent.
            send(frames[0], zmq.SNDMORE)
            send(frames[1], zmq.SNDMORE)
            send(frames[2])
        except zmq.Again:
            raise BusTimeout(f"publish blocked for {self.send_timeout}s: the proxy is not "
                             "reading (queue full)") from None

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def flush(self, timeout: float | None = None) -> None:
        """Return once every message published so far is committed, re-sending
        the unacknowledged ones when acknowledgements stop (see _wait_acked).
        Raises BusTimeout after `timeout` seconds (default BUS_REQUEST_TIMEOUT_MS);
        nothing is dropped then, a later flush() continues. Raises MessageRefused
        (once) for the messages the writer refused since the last flush, after
        the others are committed; ProducerFenced if this session was replaced."""
        self._raise_if_fenced()
        self._wait_acked(0, self.config.request_timeout_ms / 1000.0 if timeout is None
                         else timeout)
        if self._refused_report or self._refusals_unknown:
            refused, unknown = self._refused_report, self._refusals_unknown
            self._refused_report, self._refusals_unknown = [], 0
            raise MessageRefused(refused, unknown)

    def _wait_acked(self, at_most: int, timeout: float | None) -> None:
        """Read acknowledgements until at most `at_most` messages are unacknowledged,
        re-sending them when none arrive: after `resend_after` seconds, then
        doubling up to 30 s while there is still no progress, so that a writer
        that is down is not buried under copies. timeout None: no limit."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        interval = self.resend_after
        resend_at = started + interval
        while len(self._unacked) > at_most:
            self._raise_if_fenced()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                count = len(self._unacked)
                raise BusTimeout(f"{count} message{'s' if count != 1 else ''} not acknowledged "
                                 f"within {timeout:g}s (is bus-writer running? is the disk "
                                 "full? bus-cli health says)")
            if now >= resend_at:
                for _seq, frames in list(self._unacked):
                    self._send(frames)
                self.resent += len(self._unacked)
                interval = min(interval * 2, 30.0)
                resend_at = now + interval
            before = len(self._unacked)
            self.read_acks(min(resend_at, deadline or resend_at) - now)
            if len(self._unacked) < before:  # progress: start the re-send clock again
                interval = self.resend_after
                resend_at = time.monotonic() + interval

    def read_acks(self, wait: float = 0.0) -> int:
        """Apply the acknowledgements and nacks that arrive within `wait` seconds
        (none by default: what has arrived); returns `acked_seq`. publish() does
        this now and then by itself; call it to learn sooner what is stored."""
        acks = self._acks
        if acks is None:
            return self.acked_seq
        if acks.poll(max(0, int(wait * 1000))):
            while True:
                try:
                    topic, payload = acks.recv_multipart(zmq.NOBLOCK)[:2]
                except zmq.Again:
                    break
                except ValueError:
                    continue  # one frame: not a notification
                # Exact match: a prefix subscription also brings the notifications
                # of producers whose ids start with ours.
                if topic == self._ack_topic:
                    self._apply_ack(payload)
                elif topic == self._nack_topic:
                    self._apply_nack(payload)
        unacked, refusals = self._unacked, self._refusals
        while unacked and unacked[0][0] <= self.acked_seq:
            seq = unacked.popleft()[0]
            if refusals and seq in refusals:
                self._refused_report.append((seq, *refusals.pop(seq)))
        del self._refused_report[:-MAX_REFUSALS_REPORTED]
        self._read_proxy_subscriptions()
        return self.acked_seq

    def _read_proxy_subscriptions(self) -> None:
        """Subscription notices pile up on the XPUB when nobody reads them."""
        while self._sock.poll(0):
            frame = self._sock.recv()
            if frame[:1] == b"\x01":
                self._proxy_prefixes.add(frame[1:])

    def _apply_ack(self, payload: bytes) -> None:
        try:
            ack = msgpack.unpackb(payload)
            epoch, acked, refused = ack["epoch"], int(ack["contiguous_seq"]), int(ack["refused"])
        except Exception:
            return  # not an acknowledgement we understand
        if epoch != self.epoch:
            if isinstance(epoch, int) and epoch > (self.epoch or 0):
                self._fence(epoch)
            return  # an older session's
        self._session_acked = True
        if acked <= self.acked_seq:
            return
        if refused > self.refused_total and not self._learn_refusals(refused):
            return  # which seqs were refused is not known yet: keep them unacknowledged
        self.acked_seq = acked

    def _apply_nack(self, payload: bytes) -> None:
        try:
            nack = msgpack.unpackb(payload)
            epoch, seq, code, reason = nack["epoch"], nack["seq"], nack["code"], nack["reason"]
        except Exception:
            return
        if epoch != self.epoch:
            return
        if code == protocol.PRODUCER_FENCED:
            self._fenced = f"producer {self.producer_id!r}: {reason}"
        else:
            self._note_refusal(seq, code, reason)

    def _note_refusal(self, seq: int, code: str, reason: str) -> None:
        # Only a seq this session sent: another key can make the writer nack
        # (epoch, seq) pairs before this session exists (unknown_session).
        if self.acked_seq < seq <= self.last_seq and seq not in self._refusals:
            self._refusals[seq] = (code, reason)
            self.refused_total += 1

    def _learn_refusals(self, refused: int) -> bool:
        """An acknowledgement counts more refusals than the nacks that arrived:
        ask the writer which (producer_status keeps the session's last 256).
        False if it cannot say now (the acknowledgement is applied later)."""
        try:
            status = self._control.request("producer_status", {"producer": self.producer_id})
        except BusError:
            return False
        if not status or status["epoch"] != self.epoch:
            return False
        for seq, code in status["refusals"]:
            self._note_refusal(seq, code, "refused (the nack was missed; learned from "
                                          "producer_status)")
        if refused > self.refused_total:  # more than the writer remembers
            self._refusals_unknown += refused - self.refused_total
            self.refused_total = refused
        return True

    def _fence(self, epoch: int) -> None:
        self._fenced = (f"producer {self.producer_id!r} was opened again (epoch {epoch}); this "
                        f"publisher's session (epoch {self.epoch}) is fenced")

    def _raise_if_fenced(self) -> None:
        if self._fenced is not None:
            raise ProducerFenced(self._fenced)

    def close(self, linger_ms: int | None = None) -> None:
        if self._sock is not None:
            self._sock.close(linger=self.linger_ms if linger_ms is None else linger_ms)
            self._sock = None
        if self._acks is not None:
            self._acks.close(linger=0)
            self._acks = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> Publisher:
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class HistoryPage:
    rows: list[list[Any]]  # as the reader sent them: see protocol.HISTORY_ROW_FIELDS
    after_id: int          # ask for the next page after this id
    last_id: int           # the newest stored id when the page was read
    more: bool             # more stored messages after `after_id`

    @property
    def messages(self) -> list[Message]:
        return [protocol.message_from_row(row) for row in self.rows]


class HistoryClient:
    """Reads pages of stored messages from the reader (`bus-cli reader`)."""

    def __init__(self, config: BusConfig | None = None, *, endpoint: str | None = None,
                 context: zmq.Context | None = None, timeout_ms: int | None = None,
                 retries: int = 1) -> None:
        config = config or load_config()
        self.config = config
        self._client = ControlClient(endpoint or config.read_endpoint,
                                     timeout_ms or config.request_timeout_ms, retries, context,
                                     security.client_keys(config))

    def page(self, prefixes: Iterable[str] = ("",), *, after_id: int | None = None,
             since_ns: int | None = None, limit: int | None = None) -> HistoryPage:
        """Messages with id > after_id, or committed at/after since_ns, or from the
        oldest; the reader bounds the page (rows, bytes, rows examined)."""
        self.request_page(prefixes, after_id=after_id, since_ns=since_ns, limit=limit)
        return self.collect_page()

    def request_page(self, prefixes: Iterable[str] = ("",), *, after_id: int | None = None,
                     since_ns: int | None = None, limit: int | None = None) -> None:
        """Ask for a page without waiting for it (see collect_page): a replay
        converts one page while the reader reads the next."""
        args: dict[str, Any] = {"prefixes": list(prefixes) or [""]}
        for key, value in (("after_id", after_id), ("since_ns", since_ns), ("limit", limit)):
            if value is not None:
                args[key] = value
        self._client.send("history", args)

    def collect_page(self) -> HistoryPage:
        result = self._client.result()
        return HistoryPage(result["messages"], result["after_id"], result["last_id"],
                           result["more"])

    @property
    def waiting(self) -> bool:
        return self._client.waiting

    def messages(self, prefixes: Iterable[str] = ("",), *, after_id: int | None = None,
                 since_ns: int | None = None, limit: int | None = None) -> Iterator[Message]:
        """Every stored message from the start point to the newest, page by page
        (at most `limit`); the next page is read while this one is consumed."""
        prefixes = list(prefixes)
        page = self.page(prefixes, after_id=after_id, since_ns=since_ns, limit=limit)
        left = limit
        while True:
            rows = page.rows if left is None else page.rows[:left]
            if left is not None:
                left -= len(rows)
            if page.more and left != 0:
                self.request_page(prefixes, after_id=page.after_id, limit=left)
            yield from map(protocol.message_from_row, rows)
            if not page.more or left == 0:
                return
            page = self.collect_page()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HistoryClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def since_to_ns(since: dt.datetime | dt.timedelta | int | float) -> int:
    """A start time as ns since the epoch: a datetime, a timedelta ago, or
    seconds since the epoch (int/float). Clamped to 0..2^63-1, what the wire
    carries: before the epoch is "everything", far in the future "nothing yet"."""
    if isinstance(since, dt.timedelta):
        ns = time.time_ns() - int(since.total_seconds() * 1e9)
    elif isinstance(since, dt.datetime):
        if since.tzinfo is None:
            raise ValueError("since: give an aware datetime (with a time zone)")
        ns = int(since.timestamp() * 1e9)
    else:
        ns = int(since * 1e9)
    return min(max(ns, 0), protocol.MAX_INT64)


class Subscriber:
    """Receives data messages whose topic starts with one of `prefixes`.

    Three modes:
    - live (default): what passes the proxy from now on. A prefix starting
      with "$" subscribes to the writer's notifications ($bus.ack.*,
      $bus.nack.*, $bus.commit) on its notify endpoint instead.
    - `since=` (a timedelta ago, an aware datetime, or epoch seconds) or
      `after_id=`: stored messages from there, then live ones, with no gap and
      no duplicate at the seam for messages that carry producer meta (see
      docs/protocol.md, "Catching up").
    - `durable="NAME"`: stored messages after the last one NAME acknowledged,
      across restarts of this process and of the bus. Delivery follows the
      commits (woken by $bus.commit, polling every `poll_interval` s when no
      notification comes), and every message has its stored `id`. With
      `auto_ack` (default) a message counts as acknowledged once the next one
      is asked for, or `ack()` is called; positions reach the writer at most
      every `ack_interval` s and on close(). A new NAME starts at `since` /
      `after_id` if given, else after the newest stored message.
    Malformed live messages are skipped and counted in `invalid`.
    """

    def __init__(self, prefixes: Iterable[str] = ("",), config: BusConfig | None = None, *,
                 endpoint: str | None = None, context: zmq.Context | None = None,
                 since: dt.datetime | dt.timedelta | int | float | None = None,
                 after_id: int | None = None, durable: str | None = None,
                 auto_ack: bool = True, ack_interval: float = 0.2,
                 poll_interval: float = 1.0) -> None:
        config = config or load_config()
        if endpoint:
            config = with_overrides(config, sub_endpoint=endpoint)
        self.config = config
        self.prefixes = list(prefixes) or [""]
        self._wants_reserved = any(p.startswith(protocol.RESERVED_PREFIX) for p in self.prefixes)
        self.stored = durable is not None or since is not None or after_id is not None
        if self.stored and self._wants_reserved:
            raise ValueError("'$' topics are not stored: subscribe to them live")
        self.durable = durable
        self.auto_ack = auto_ack
        self.ack_interval = ack_interval
        self.poll_interval = poll_interval
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self.invalid = 0
        self.errors = 0                  # failed requests to the reader or writer
        self.last_error: str | None = None
        # Live data is subscribed to except for a durable consumer, which reads
        # only what is stored; stored modes also hear the commit watermark, from
        # the writer's notify endpoint like every "$" topic.
        live = [] if durable is not None else \
            [p.encode("utf-8") for p in self.prefixes if not protocol.is_reserved(p)]
        notices = [p.encode("utf-8") for p in self.prefixes if protocol.is_reserved(p)] + \
            ([protocol.COMMIT_TOPIC.encode()] if self.stored else [])
        self._sock = sockets.open_subscriber(self._ctx, config, live)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._notify: zmq.Socket | None = None
        if notices:
            self._notify = sockets.open_subscriber(self._ctx, config, notices,
                                                   config.notify_endpoint)
            self._poller.register(self._notify, zmq.POLLIN)
        if not self.stored:
            return
        self._history = HistoryClient(config, context=self._ctx)
        self._since_ns = None if since is None else since_to_ns(since)
        self._after_id = after_id
        self._more = True                # ask the reader before waiting for a commit
        self._next_poll = 0.0
        self._pending: deque[Message] = deque()
        self._to_ack: int | None = None  # the message returned last (durable)
        # Since-mode seam (see _cut_at_seam): live messages held until the stored
        # stream reaches one of them, indexed by their session key.
        self.switched_to_live = False
        self._held: deque[Message] = deque()
        self._held_keys: set[protocol.Identity] = set()
        self._delivered: dict[str, int] = {}  # producer -> highest seq delivered
        self.duplicates_skipped = 0
        if durable is not None:
            self._control = ControlClient(config.control_endpoint, config.request_timeout_ms,
                                          1, self._ctx, security.client_keys(config))
            try:
                self._acked_id = self._sent_ack_id = self._start_durable(durable)
            except BaseException:  # writer or reader unreachable: leave nothing open
                self.durable = None
                self._control.close()
                self.close()
                raise
            self._ack_sent_at = time.monotonic()
            self._unchecked_acks = 0

    # --- durable positions ----------------------------------------------------

    def _start_durable(self, name: str) -> int:
        """The id to resume after: NAME's stored position, or for a new NAME the
        requested start (or the newest stored id), stored at once."""
        known = self._control.request("consumer_get", {"consumer": name})
        if known["last_id"] is not None:
            self._after_id, self._since_ns = known["last_id"], None
            # An ack that does not move it: with CURVE, NAME must be this key's
            # (forbidden otherwise), which is better learned before reading.
            self._control.request("consumer_ack", {"consumer": name, "last_id": known["last_id"]})
            return known["last_id"]
        if self._after_id is None and self._since_ns is None:
            self._after_id = known["last_message_id"] or 0
        elif self._after_id is None:
            page = self._history.page(self.prefixes, since_ns=self._since_ns, limit=1)
            self._after_id = page.rows[0][0] - 1 if page.rows else page.after_id
        self._since_ns = None
        self._control.request("consumer_ack", {"consumer": name, "last_id": self._after_id})
        return self._after_id

    def ack(self, message: Message | int | None = None) -> None:
        """Acknowledge `message` (a message, or its id; default: the last one
        received) and all before it."""
        if self.durable is None:
            return
        target = self._to_ack if message is None else \
            message if isinstance(message, int) else message.id
        if target is not None and target > self._acked_id:
            self._acked_id = target
        self._send_ack_if_due()

    def _send_ack_if_due(self) -> None:
        if self._acked_id > self._sent_ack_id and \
                time.monotonic() - self._ack_sent_at >= self.ack_interval:
            self._send_ack()

    def _send_ack(self) -> None:
        """Store the position with the writer. On failure (writer restarting) it is
        kept and tried again after ACK_RETRY_SECONDS, not at every message."""
        if self._acked_id <= self._sent_ack_id:
            return
        self._ack_sent_at = time.monotonic()
        try:
            self._control.request("consumer_ack", {"consumer": self.durable,
                                                   "last_id": self._acked_id})
            self._sent_ack_id = self._acked_id
        except BusError as exc:
            if exc.code in PERMANENT_ERRORS:  # retrying cannot help: stop reading
                raise
            self._failed(exc)
            self._ack_sent_at = time.monotonic() + ACK_RETRY_SECONDS

    def _failed(self, exc: BusError) -> None:
        self.errors += 1
        self.last_error = str(exc)

    # --- receiving --------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, or None if none arrives within `timeout` seconds."""
        if not self.stored:
            return self._receive_live(None if timeout is None else time.monotonic() + timeout)
        if self.durable is not None:
            if self.auto_ack and self._to_ack is not None and self._to_ack > self._acked_id:
                self._acked_id = self._to_ack
            self._unchecked_acks += 1
            # The clock is read every 64 messages, and when the page runs out.
            if self._unchecked_acks >= 64 or not self._pending:
                self._unchecked_acks = 0
                self._send_ack_if_due()
        if self._pending:  # the replay's fast path
            msg = self._pending.popleft()
            self._to_ack = msg.id
            return msg
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._pending:
                msg = self._pending.popleft()
                self._to_ack = msg.id
                return msg
            if self.switched_to_live:
                msg = self._receive_live(deadline)
                if msg is None or self._first_delivery(msg):
                    return msg
                continue
            if self._more or time.monotonic() >= self._next_poll:
                self._read_page()
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._wait_for_commit(remaining)

    def _recv(self, timeout_ms: int | None) -> list[bytes] | None:
        """A message's frames from the data or the notify socket, whichever has
        one within timeout_ms (None: no limit), else None."""
        events = dict(self._poller.poll(timeout_ms))
        for sock in (self._sock, self._notify):
            if sock is not None and sock in events:
                return sock.recv_multipart()
        return None

    def _receive_live(self, deadline: float | None) -> Message | None:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            frames = self._recv(None if remaining is None else int(remaining * 1000) + 1)
            if frames is None:
                return None
            try:
                msg = protocol.parse_message(frames)
            except protocol.ProtocolError:
                self.invalid += 1
                continue
            if protocol.is_reserved(msg.topic) and not self._wants_reserved:
                continue
            return msg

    def _read_page(self) -> None:
        self._hold_live()
        history = self._history
        try:
            if history.waiting:  # read ahead while the last page was consumed
                page = history.collect_page()
            else:
                page = history.page(self.prefixes, after_id=self._after_id,
                                    since_ns=self._since_ns)
        except BusError as exc:  # reader down: try again at the next poll
            self._failed(exc)
            self._more = False
            self._next_poll = time.monotonic() + self.poll_interval
            return
        self._after_id, self._since_ns, self._more = page.after_id, None, page.more
        self._next_poll = time.monotonic() + self.poll_interval
        if page.more:
            history.request_page(self.prefixes, after_id=page.after_id)
        if self.durable is not None:
            self._pending.extend(page.messages)
        else:
            first = self._first_delivery
            self._pending.extend(m for m in self._cut_at_seam(page.messages) if first(m))

    def _wait_for_commit(self, remaining: float | None) -> None:
        """Sleep until a commit may have stored something for us, the poll interval
        passes, or `remaining` runs out. Live data that arrives meanwhile is held."""
        wait = self._next_poll - time.monotonic()
        if remaining is not None:
            wait = min(wait, remaining)
        if wait > 0 and not self._poller.poll(int(wait * 1000) + 1):
            return
        self._hold_live()

    def _hold_live(self) -> None:
        """Read what the SUB socket has: commit notices tell that more is stored;
        live data is held (since mode) until the stored stream meets it."""
        commit_topic = protocol.COMMIT_TOPIC
        held = self._held
        while (frames := self._recv(0)) is not None:
            try:
                msg = protocol.parse_message(frames)
            except protocol.ProtocolError:
                self.invalid += 1
                continue
            if msg.topic == commit_topic:
                try:
                    last_id = msgpack.unpackb(msg.payload)["last_id"]
                except Exception:
                    continue
                if last_id > (self._after_id or 0):
                    self._more = True
                continue
            if len(held) >= self.config.sub_hwm:  # bounded; the stored stream has them all
                held.clear()
                self._held_keys.clear()
            held.append(msg)
            if (key := msg.identity) is not None:
                self._held_keys.add(key)

    def _cut_at_seam(self, stored: list[Message]) -> list[Message]:
        """Since mode: the stored messages to deliver from this page. When a stored
        message is also held from the live stream, the two streams have met:
        everything the proxy passed before it is stored (the writer commits in
        capture order, and capture and live see the proxy's order), and
        everything after it arrives live. So deliver stored messages up to it,
        then the held live messages after it, then live."""
        keys = self._held_keys
        if not keys:
            return stored
        for i, msg in enumerate(stored):
            if msg.identity in keys:
                meeting = msg.identity
                held = list(self._held)
                cut = next(j for j, m in enumerate(held) if m.identity == meeting)
                # Held messages before the meeting point were stored before it;
                # those with producer meta go through the duplicate filter anyway.
                after = [m for m in held[:cut] if m.identity is not None] + held[cut + 1:]
                self._held.clear()
                keys.clear()
                self.switched_to_live = True
                self._notify.setsockopt(zmq.UNSUBSCRIBE, protocol.COMMIT_TOPIC.encode())
                return stored[:i + 1] + after
        return stored

    def _first_delivery(self, msg: Message) -> bool:
        """False for a message of a producer session whose seq was delivered
        already (the seam's overlap, or a publisher's re-send seen live). Its
        seqs go on across the producer's sessions; a message without a session
        identifies nothing and is always delivered."""
        key = msg.identity
        if key is None or self.durable is not None:
            return True
        producer, _epoch, seq = key
        delivered = self._delivered
        if seq <= delivered.get(producer, 0):
            self.duplicates_skipped += 1
            return False
        if len(delivered) >= 100_000 and producer not in delivered:
            delivered.clear()  # bounded; a forgotten producer only loses its dedupe
        delivered[producer] = seq
        return True

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.receive()
            if msg is not None:
                yield msg

    def close(self) -> None:
        if self.durable is not None:
            if self.auto_ack:
                self.ack()
            self._send_ack()
            self._control.close()
        if self.stored:
            self._history.close()
        self._sock.close(linger=0)
        if self._notify is not None:
            self._notify.close(linger=0)
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ControlClient:
    """Request/reply with a bus process's control endpoint.

    `request()` returns the reply's result, raises BusError(code) on an error
    reply and BusTimeout when no reply came after `retries` + 1 attempts.
    """

    def __init__(self, endpoint: str, timeout_ms: int = 3000, retries: int = 0,
                 context: zmq.Context | None = None,
                 curve: security.ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self.timeout_ms = timeout_ms
        self.retries = retries
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock: zmq.Socket | None = None
        self._ids = itertools.count(1)
        self._pending: tuple[str, str] | None = None

    def request(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        for attempt in range(self.retries + 1):
            self.send(cmd, args)
            try:
                return self.result()
            except BusTimeout:
                if attempt == self.retries:
                    raise
        raise AssertionError("unreachable")

    def send(self, cmd: str, args: dict[str, Any] | None = None) -> None:
        """Send a request without waiting: `result()` collects the reply, so a
        caller can work while the other process answers (one request at a time)."""
        request_id = f"{os.getpid()}-{next(self._ids)}"
        if self._pending is not None and self._sock is not None:
            self._sock.close(linger=0)  # an uncollected reply: drop it with its socket
            self._sock = None
        if self._sock is None:
            self._sock = sockets.open_request(self._ctx, self.endpoint, self.curve)
        self._sock.send(protocol.encode_request(request_id, cmd, args))
        self._pending = (request_id, cmd)

    def result(self) -> Any:
        """The reply to the request sent last; BusTimeout after timeout_ms."""
        request_id, cmd = self._pending
        self._pending = None
        if not self._sock.poll(self.timeout_ms):
            # A REQ socket without its reply is stuck; only a new socket can send again.
            self._sock.close(linger=0)
            self._sock = None
            raise BusTimeout(f"no reply to {cmd!r} from {self.endpoint} within "
                             f"{self.timeout_ms} ms (is the process running?"
                             + (" With CURVE: is this key in a list that endpoint lets in?"
                                if self.curve is not None else "") + ")")
        reply = protocol.decode_reply(self._sock.recv())
        if reply.get("id") != request_id:
            raise BusError(f"reply id {reply.get('id')!r} does not match {request_id!r}",
                           "bad_reply")
        if reply["ok"]:
            return reply.get("result")
        error = reply.get("error") or {}
        raise BusError(f"{cmd}: {error.get('reason', 'error')}", error.get("code", "error"))

    @property
    def waiting(self) -> bool:
        """A request was sent and its reply not yet collected."""
        return self._pending is not None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
