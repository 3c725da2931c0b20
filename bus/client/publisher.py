"""Publisher: a producer session with the writer, messages through the proxy,
and what the writer acknowledged or refused."""

from __future__ import annotations

import os
import socket as _socket
import time
import uuid
from collections import deque
from itertools import islice
from typing import Any

import zmq

from bus import protocol, security, sockets
from bus.client.control import ControlClient
from bus.client.errors import BusError, BusTimeout, MessageRefused, ProducerFenced
from bus.config import BusConfig, load_config, with_overrides


# Refusals a Publisher keeps for its next flush() to raise (the count goes on).
_backend_send = zmq.backend.Socket.send
MAX_REFUSALS_REPORTED = 10_000
# The largest notification frame taken from the notify endpoint (a producer id
# of 128 characters and a nack's reason fit many times over).
NOTIFICATION_MAX_BYTES = 64 << 10
# Notifications applied per read_acks() call at most.
MAX_NOTIFICATIONS_PER_READ = 10_000
# The longest wait between two rounds of re-sending the same messages.
MAX_RESEND_INTERVAL_S = 30.0


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
    seq) once. What an acknowledgement lists in its `holes` (seqs the writer
    never received, below one it did) is sent again at once, and alone. It
    raises MessageRefused for messages the writer refused since
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
        self.holes_resent = 0   # of `resent`: messages re-sent because an ack listed their seq
        self._holes_resent_at = 0.0
        # Between two rounds of the same holes: resend_after, doubling while
        # nothing is acknowledged (drops that go on are not answered with
        # ever more copies), back to resend_after on progress.
        self._holes_interval = resend_after
        self._holes_resent_upto = 0
        # tend()'s: (next re-send at, its interval, acked_seq when it was set).
        self._tend_clock: tuple[float, float, int] | None = None
        self.refused_total = 0  # messages of this session the writer refused
        # (seq, frames) in seq order, oldest first: acknowledgements pop from the left.
        self._unacked: deque[tuple[int, tuple[bytes, bytes, bytes]]] = deque()
        self._refusals: dict[int, tuple[str, str]] = {}  # seq -> (code, reason), not yet acked
        self._refused_report: list[tuple[int, str, str]] = []  # for the next flush to raise
        self._refusals_unknown = 0  # refusals the writer counted that could not be told apart
        self._fenced: str | None = None
        # A notification without this session's mac said that a newer session
        # exists: asked of the writer (producer_status) before it is believed.
        self._fence_suspected = False
        self._fence_checked_at = 0.0
        self._session_acked = False
        self._mac: protocol.SessionMac | None = None  # this session's, from producer_open
        # Notifications not applied, by why: not_authentic (no valid mac of this
        # session), other_epoch, beyond_sent (an ack past the last seq sent).
        self.notifications_ignored: dict[str, int] = {}
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
        self._open_sockets()
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

    def _open_sockets(self) -> None:
        """The XPUB to the proxy and the SUB to the writer's notifications,
        each watched for a wrong peer at its endpoint (bus/sockets.PeerWatch:
        something that bound the proxy's or the writer's port while it
        restarted); `_check_peers` connects them again."""
        cfg = self.config
        self._peer_watches = (sockets.PeerWatch(cfg.pub_endpoint),
                              sockets.PeerWatch(cfg.notify_endpoint))
        self._sock = sockets.open_publisher(self._ctx, cfg, self.linger_ms,
                                            self._peer_watches[0].attach)
        if self.send_timeout is not None:
            self._sock.setsockopt(zmq.SNDTIMEO, int(self.send_timeout * 1000))
        # A nack missed while the nack subscription is still on its way is
        # learned from the acknowledgements' `refused` count (_learn_refusals).
        def notify_opened(sock: zmq.Socket) -> None:
            # A notification is a few hundred bytes: a larger frame (from
            # whatever bound the notify endpoint) drops that connection in
            # libzmq instead of costing this process its size.
            sock.setsockopt(zmq.MAXMSGSIZE, NOTIFICATION_MAX_BYTES)
            self._peer_watches[1].attach(sock)
        self._acks = sockets.open_subscriber(self._ctx, cfg, [self._ack_topic, self._nack_topic],
                                             cfg.notify_endpoint, notify_opened)
        # What _wait_notice waits on: the notifications, and the monitors that
        # tell of a wrong peer (each attached once, with its socket).
        self._notices = zmq.Poller()
        self._notices.register(self._acks, zmq.POLLIN)
        for watch in self._peer_watches:
            self._notices.register(watch.monitor, zmq.POLLIN)

    def _check_peers(self) -> None:
        """Connect again an endpoint libzmq gave up on. The proxy subscribes
        again on the new connection; what went nowhere meanwhile is re-sent
        (unacknowledged); the writer answers the new acknowledgement
        subscription with this producer's current acknowledgement."""
        for watch in getattr(self, "_peer_watches", ()):
            watch.check()

    def _wait_notice(self, acks: zmq.Socket, wait: float) -> bool:
        """Whether `acks` has something to read within `wait` seconds,
        connecting a socket again meanwhile if its endpoint had a wrong peer
        (a wait can last 30 s): the sockets' monitors wake it, and it looks
        at least every REDIAL_MAX_S."""
        deadline = time.monotonic() + wait
        while True:
            self._check_peers()
            remaining = min(deadline - time.monotonic(), sockets.REDIAL_MAX_S)
            if acks in dict(self._notices.poll(max(0, int(remaining * 1000)))):
                return True
            if time.monotonic() >= deadline:
                return False

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
        key = session.get("session_key")
        if not isinstance(key, bytes):
            raise BusError(protocol.BAD_REQUEST, "producer_open answered no session_key: the "
                                                 "writer is older than this client")
        # Each message carries the session's mac; each notification must too.
        self._mac = protocol.SessionMac(key)
        self.last_seq = self.acked_seq = next_seq - 1
        self._meta = protocol.MetaEncoder(self.producer_id, self.epoch, self._mac)

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
        frames = (topic_frame, payload, self._meta.encode(seq, content_type=content_type,
                                                          headers=headers, topic=topic_frame,
                                                          payload=payload))
        size = len(topic_frame) + len(payload) + len(frames[2])
        if size > self.config.max_message_bytes:
            raise protocol.ProtocolError(protocol.MESSAGE_TOO_LARGE,
                                         f"{size} > {self.config.max_message_bytes} bytes "
                                         "(topic, payload and meta)")
        # Recorded before it is sent: a KeyboardInterrupt (Ctrl-C) that lands
        # between the send and the record left a message sent and never
        # counted, its acknowledgement ignored as past the last seq sent, and
        # flush() waiting out its timeout. Recorded and not sent, it is sent
        # again by flush() as any unacknowledged message is.
        self._unacked.append((seq, frames))
        self.last_seq = seq
        try:
            self._send(frames)
        except BusTimeout:  # not sent (the queue was full): the seq is not used
            self._unacked.pop()
            self.last_seq = seq - 1
            raise
        if wait:
            self.flush(timeout)
        elif seq & 0xFF == 0:
            self.read_acks()  # now and then, so the unacknowledged set stays small
        return seq

    def _send(self, frames: tuple[bytes, bytes, bytes]) -> None:
        sock = self._sock
        try:
            # Three sends, not send_multipart: a third of the CPU per message here.
            # libzmq checks the high-water mark on the first part only, so a
            # message is never left half-sent. pyzmq's own send (its Cython
            # layer), not the Python wrapper over it, which adds 0.1 us a call
            # for options (routing ids, copy thresholds) these frames never use.
            _backend_send(sock, frames[0], zmq.SNDMORE)
            _backend_send(sock, frames[1], zmq.SNDMORE)
            _backend_send(sock, frames[2])
        except zmq.Again:
            raise BusTimeout(f"publish blocked for {self.send_timeout}s: the proxy is not "
                             "reading (queue full)") from None

    def _resend(self, frames: tuple[bytes, bytes, bytes]) -> bool:
        """Queue a copy if the queue has room now; False if it has none."""
        try:
            self._sock.send(frames[0], zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._sock.send(frames[1], zmq.SNDMORE)
        self._sock.send(frames[2])
        return True

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
            raise MessageRefused(*self.take_refusals())

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
                self._resend_unacked()
                interval = min(interval * 2, MAX_RESEND_INTERVAL_S)
                resend_at = now + interval
            before = len(self._unacked)
            self.read_acks(min(resend_at, deadline or resend_at) - now)
            if len(self._unacked) < before:  # progress: start the re-send clock again
                interval = self.resend_after
                resend_at = time.monotonic() + interval

    def _resend_unacked(self) -> None:
        """Every unacknowledged message again, without waiting: a queue that
        is full (the proxy gone) takes the rest at the next round; blocking
        here ignored flush()'s timeout."""
        for _seq, frames in list(self._unacked):
            if not self._resend(frames):
                break
            self.resent += 1

    def tend(self, now: float) -> None:
        """What flush() does between its waits, for a caller that must not
        block (the gateway's producer sessions call it with read_acks()):
        re-send every unacknowledged message once acknowledgements stopped
        for `resend_after` s, then 2x, 4x... up to 30 s while nothing is
        acknowledged; back to `resend_after` on progress."""
        if not self._unacked:
            self._tend_clock = None
            return
        clock = self._tend_clock
        if clock is None or clock[2] != self.acked_seq:  # progress (or a first message)
            self._tend_clock = (now + self.resend_after, self.resend_after, self.acked_seq)
        elif now >= clock[0]:
            self._resend_unacked()
            interval = min(clock[1] * 2, MAX_RESEND_INTERVAL_S)
            self._tend_clock = (now + interval, interval, self.acked_seq)

    def take_refusals(self) -> tuple[list[tuple[int, str, str]], int]:
        """The refusals flush() would raise (seq, code, reason), and how many
        more the writer counted without saying which; forgotten once taken."""
        refused, unknown = self._refused_report, self._refusals_unknown
        self._refused_report, self._refusals_unknown = [], 0
        return refused, unknown

    @property
    def fenced(self) -> str | None:
        """Why this session is fenced (a newer one of the producer id exists), or None."""
        return self._fenced

    def read_acks(self, wait: float = 0.0) -> int:
        """Apply the acknowledgements and nacks that arrive within `wait` seconds
        (none by default: what has arrived); returns `acked_seq`. publish() does
        this now and then by itself; call it to learn sooner what is stored."""
        acks = self._acks
        if acks is None:
            return self.acked_seq
        if self._wait_notice(acks, wait):
            # Bounded: a flood of notifications must not hold publish() here.
            for _ in range(MAX_NOTIFICATIONS_PER_READ):
                try:
                    topic, payload = acks.recv_multipart(zmq.NOBLOCK)[:2]
                except zmq.Again:
                    break
                except ValueError:
                    continue  # one frame: not a notification
                # Exact match: a prefix subscription also brings the notifications
                # of producers whose ids start with ours.
                if topic == self._ack_topic:
                    self._apply_ack(topic, payload)
                elif topic == self._nack_topic:
                    self._apply_nack(topic, payload)
        if self._fence_suspected:
            self._check_fenced()
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

    def _ignore(self, why: str) -> None:
        self.notifications_ignored[why] = self.notifications_ignored.get(why, 0) + 1

    def _apply_ack(self, topic: bytes, payload: bytes) -> None:
        ack = protocol.decode_notification(payload)
        try:
            epoch, acked, refused = ack["epoch"], int(ack["contiguous_seq"]), int(ack["refused"])
        except Exception:
            return self._ignore("not_authentic")  # not an acknowledgement we understand
        if epoch != self.epoch:
            # Another session's, whose key we do not hold: a newer one would
            # fence us, if the writer says so.
            if isinstance(epoch, int) and epoch > (self.epoch or 0):
                self._fence_suspected = True
            return self._ignore("other_epoch")
        if self._mac is None or not self._mac.notification_is_authentic(topic, payload):
            return self._ignore("not_authentic")
        if acked > self.last_seq:  # nothing sent can be acknowledged past what was sent
            return self._ignore("beyond_sent")
        self._session_acked = True
        holes = ack.get("holes")
        if holes:
            self._resend_holes(holes)
        if acked <= self.acked_seq:
            return
        if refused > self.refused_total and not self._learn_refusals(refused):
            return  # which seqs were refused is not known yet: keep them unacknowledged
        self.acked_seq = acked
        self._holes_interval = self.resend_after

    def _resend_holes(self, holes: Any) -> None:
        """An authentic acknowledgement lists seqs below its `max_seq` that
        the writer never received (a copy dropped on the way, e.g. for a
        mac that did not check): send those again now, and only those,
        rather than the whole window when acknowledgements stall. A hole is
        re-sent again only after `_holes_interval` (its copy may be on its way)."""
        unacked = self._unacked
        if not unacked:
            return
        now = time.monotonic()
        again = now - self._holes_resent_at >= self._holes_interval
        floor = 0 if again else self._holes_resent_upto
        first_kept, resent = unacked[0][0], 0
        for hole in holes[:protocol.ACK_MAX_HOLES]:
            try:
                first, last = (int(bound) for bound in hole)
            except (TypeError, ValueError):
                return
            start, end = max(first, floor + 1, first_kept), min(last, self.last_seq)
            if start > end:  # re-sent already: islice would still walk the deque up to it
                continue
            # Kept messages have consecutive seqs: the hole's are a slice.
            for seq, frames in islice(unacked, start - first_kept, end - first_kept + 1):
                if not self._resend(frames):
                    break  # the queue is full: the next acknowledgement tries again
                resent += 1
                self._holes_resent_upto = max(self._holes_resent_upto, seq)
        if resent:
            self.resent += resent
            self.holes_resent += resent
            if again:
                if self._holes_resent_at:  # a second round of the same holes: back off
                    self._holes_interval = min(self._holes_interval * 2, MAX_RESEND_INTERVAL_S)
                self._holes_resent_at = now

    def _apply_nack(self, topic: bytes, payload: bytes) -> None:
        nack = protocol.decode_notification(payload)
        try:
            epoch, seq, code, reason = nack["epoch"], nack["seq"], nack["code"], nack["reason"]
        except Exception:
            return self._ignore("not_authentic")
        if epoch != self.epoch:
            return self._ignore("other_epoch")
        if code == protocol.PRODUCER_FENCED:
            # The writer no longer holds our session's key to sign this: ask it.
            self._fence_suspected = True
        elif self._mac is None or not self._mac.notification_is_authentic(topic, payload):
            self._ignore("not_authentic")
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

    def _check_fenced(self) -> None:
        """A notification said that a newer session of our producer id exists:
        believe it only if the writer's producer_status says so (anyone can
        send a notification without a mac; at most one question a second)."""
        now = time.monotonic()
        if now - self._fence_checked_at < 1.0:
            return
        self._fence_checked_at = now
        try:
            status = self._control.request("producer_status", {"producer": self.producer_id})
        except BusError:
            return  # asked again at the next notification, a second later
        self._fence_suspected = False
        epoch = status.get("epoch") if isinstance(status, dict) else None
        if isinstance(epoch, int) and epoch > (self.epoch or 0):
            self._fenced = (f"producer {self.producer_id!r} has a newer session (epoch {epoch}:"
                            " opened again, or removed by an admin); "
                            f"this publisher's session (epoch {self.epoch}) is fenced")

    def _raise_if_fenced(self) -> None:
        if self._fenced is not None:
            raise ProducerFenced(self._fenced)

    def close(self, linger_ms: int | None = None) -> None:
        for watch in getattr(self, "_peer_watches", ()):
            watch.close()
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
