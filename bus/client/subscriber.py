"""Subscriber: live messages from the proxy, stored ones from the reader to
catch up or to resume a durable consumer.

The modes are separate pieces: Subscriber reads the live sockets and pages the
stored messages; `Seam` is what catching up adds (live messages held until the
stored stream meets them, duplicates dropped); `DurablePosition` is what a
durable consumer adds (where to resume, acknowledgements sent to the writer).
"""

from __future__ import annotations

import bisect
import datetime as dt
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgpack
import zmq

from bus import protocol, security, sockets
from bus.client.control import ControlClient
from bus.client.errors import BusError
from bus.client.history import HistoryClient, since_to_ns
from bus.config import BusConfig, load_config, with_overrides
from bus.protocol import Message

# A durable consumer whose position could not be stored tries again this much later.
ACK_RETRY_SECONDS = 1.0
# Control errors that no retry can cure: a durable subscriber stops on them.
PERMANENT_ERRORS = frozenset({protocol.FORBIDDEN, protocol.BAD_REQUEST,
                              protocol.TOO_MANY_CONSUMERS})


# What a subscriber remembers of each producer's delivered seqs (Delivered):
# runs of consecutive seqs, at most this many a producer (the oldest merged
# past it), and in all (all forgotten past it: about 13 MB; each producer
# holds a run at least, so producers are bounded by it too).
MAX_RUNS_PER_PRODUCER = 1024
MAX_RUNS = 100_000


class Delivered:
    """The seqs delivered of each producer, as sorted runs of consecutive
    seqs [first, last]: a seq is new unless a run holds it.

    Not a highest-seq mark: a producer's seqs are not stored in seq order.
    After a writer's crash (or a takeover) its publisher sends again what the
    lost commit held, and the new writer stores it after later seqs that
    reached it first (a hole filled, writer/producers.py): a mark dropped
    those as seen, and a subscriber catching up missed them for good. Runs
    stay few: one, plus one per hole still open. A live subscriber that
    lost messages (SUB's high-water mark) has a run per loss; past
    MAX_RUNS_PER_PRODUCER the two oldest are merged (what lies between them
    counts as seen: the old mark's rule, for the oldest holes alone)."""

    def __init__(self) -> None:
        self.runs: dict[str, list[list[int]]] = {}
        self.count = 0  # runs in all

    def add(self, producer: str, seq: int) -> bool:
        """Whether `seq` of `producer` is new (then it is delivered now)."""
        if self.count >= MAX_RUNS:  # a publisher forging producer ids and seqs live
            self.runs.clear()  # bounded; a forgotten producer only loses its dedupe
            self.count = 0
        runs = self.runs.get(producer)
        if runs is None:
            self.runs[producer] = [[seq, seq]]
            self.count += 1
            return True
        i = bisect.bisect_right(runs, seq, key=lambda run: run[0])  # runs[i - 1] starts <= seq
        if i and runs[i - 1][1] >= seq:
            return False
        joins_before = i > 0 and runs[i - 1][1] == seq - 1
        joins_after = i < len(runs) and runs[i][0] == seq + 1
        if joins_before and joins_after:
            runs[i - 1][1] = runs.pop(i)[1]
            self.count -= 1
        elif joins_before:
            runs[i - 1][1] = seq
        elif joins_after:
            runs[i][0] = seq
        else:
            runs.insert(i, [seq, seq])
            self.count += 1
            if len(runs) > MAX_RUNS_PER_PRODUCER:
                runs[0][1] = runs.pop(1)[1]
                self.count -= 1
        return True


class Seam:
    """Catching up (`since=` / `after_id=`): live messages are held while the
    stored ones are delivered, until a stored message is also one held, where
    the two streams meet (see `cut`); from then on only live ones, with each
    (producer, seq) delivered once across the seam and across re-sends."""

    def __init__(self, hold_limit: int, hold_bytes: int | None = None) -> None:
        self.hold_limit = hold_limit
        self.hold_bytes = hold_bytes  # and at most this much of their payloads (None: no bound)
        self._held_size = 0
        self.met = False
        self.duplicates_skipped = 0
        self._held: deque[Message] = deque()
        self._held_keys: set[protocol.Identity] = set()
        self._delivered = Delivered()

    def hold(self, msg: Message) -> None:
        if len(self._held) >= self.hold_limit or (  # bounded; the stored stream has them all
                self.hold_bytes is not None and self._held_size >= self.hold_bytes):
            self._held.clear()
            self._held_keys.clear()
            self._held_size = 0
        self._held.append(msg)
        self._held_size += len(msg.payload)
        if (key := msg.identity) is not None:
            self._held_keys.add(key)

    def cut(self, stored: list[Message]) -> list[Message]:
        """The stored messages to deliver from this page. When a stored message
        is also held from the live stream, the two streams have met:
        everything the proxy passed before it is stored (the writer commits in
        capture order, and capture and live see the proxy's order), and
        everything after it arrives live. So deliver stored messages up to it,
        then the held live messages after it, then live (`met`)."""
        keys = self._held_keys
        if keys:
            for i, msg in enumerate(stored):
                if msg.identity in keys:
                    meeting = msg.identity
                    held = list(self._held)
                    cut = next(j for j, m in enumerate(held) if m.identity == meeting)
                    # Held messages before the meeting point were stored before
                    # it; those with producer meta go through the filter anyway.
                    after = [m for m in held[:cut] if m.identity is not None] + held[cut + 1:]
                    self._held.clear()
                    keys.clear()
                    self._held_size = 0
                    self.met = True
                    stored = stored[:i + 1] + after
                    break
        return [m for m in stored if self.first_delivery(m)]

    def first_delivery(self, msg: Message) -> bool:
        """False for a message of a producer session whose seq was delivered
        already (the seam's overlap, or a publisher's re-send seen live). Its
        seqs go on across the producer's sessions; a message without a session
        identifies nothing and is always delivered."""
        key = msg.identity
        if key is None:
            return True
        producer, _epoch, seq = key
        if self._delivered.add(producer, seq):
            return True
        self.duplicates_skipped += 1
        return False


class DurablePosition:
    """A durable consumer's position with the writer: where NAME resumes, what
    this process acknowledged, and sending it (at most every `ack_interval`
    s, and on close)."""

    def __init__(self, name: str, control: ControlClient, auto_ack: bool,
                 ack_interval: float, on_error: Callable[[BusError], None]) -> None:
        self.name = name
        self.control = control
        self.auto_ack = auto_ack
        self.ack_interval = ack_interval
        self._on_error = on_error
        self.prefixes: list[str] = []   # what it reads: the writer counts its lag on them
        self.taken: int | None = None   # the id of the message returned last
        self.acked_id = self._sent_id = 0
        self._sent_at = time.monotonic()
        self._unchecked = 0

    def start(self, history: HistoryClient, prefixes: list[str], after_id: int | None,
              since_ns: int | None) -> int:
        """The id to resume after: NAME's stored position, or for a new NAME the
        requested start (or the newest stored id), stored at once."""
        self.prefixes = list(prefixes)
        known = self.control.request("consumer_get", {"consumer": self.name})
        if known["last_id"] is not None:
            # An ack that does not move it: with CURVE, NAME must be this key's
            # (forbidden otherwise), which is better learned before reading;
            # it tells the writer the prefixes read now.
            self.control.request("consumer_ack", self._ack_args(known["last_id"]))
            start = known["last_id"]
        else:
            if after_id is None and since_ns is None:
                start = known["last_message_id"] or 0
            elif after_id is None:
                page = history.page(prefixes, since_ns=since_ns, limit=1)
                start = page.rows[0][0] - 1 if page.rows else page.after_id
            else:
                start = after_id
            self.control.request("consumer_ack", self._ack_args(start))
        self.acked_id = self._sent_id = start
        self._sent_at = time.monotonic()
        return start

    def _ack_args(self, last_id: int) -> dict[str, Any]:
        return {"consumer": self.name, "last_id": last_id, "prefixes": self.prefixes}

    def before_receive(self, page_empty: bool) -> None:
        """With auto_ack, the message returned last counts as acknowledged once
        the next is asked for; the clock is read every 64 messages, and when
        the page runs out."""
        if self.auto_ack and self.taken is not None and self.taken > self.acked_id:
            self.acked_id = self.taken
        self._unchecked += 1
        if self._unchecked >= 64 or page_empty:
            self._unchecked = 0
            self.send_if_due()

    def ack(self, message: Message | int | None = None) -> None:
        target = self.taken if message is None else \
            message if isinstance(message, int) else message.id
        if target is not None and target > self.acked_id:
            self.acked_id = target
        self.send_if_due()

    def send_if_due(self) -> None:
        if self.acked_id > self._sent_id and \
                time.monotonic() - self._sent_at >= self.ack_interval:
            self.send()

    def send(self) -> None:
        """Store the position with the writer. On failure (writer restarting) it is
        kept and tried again after ACK_RETRY_SECONDS, not at every message."""
        if self.acked_id <= self._sent_id:
            return
        self._sent_at = time.monotonic()
        try:
            self.control.request("consumer_ack", self._ack_args(self.acked_id))
            self._sent_id = self.acked_id
        except BusError as exc:
            if exc.code in PERMANENT_ERRORS:  # retrying cannot help: stop reading
                raise
            self._on_error(exc)
            self._sent_at = time.monotonic() + ACK_RETRY_SECONDS

    def close(self) -> None:
        if self.auto_ack:
            self.ack()
        self.send()
        self.control.close()


class Subscriber:
    """Receives data messages whose topic starts with one of `prefixes`.

    Three modes:
    - live (default): what passes the proxy from now on. A prefix starting
      with "$" subscribes to the writer's notifications ($bus.ack.*,
      $bus.nack.*, $bus.commit) on its notify endpoint instead.
    - `since=` (a timedelta ago, an aware datetime, or epoch seconds) or
      `after_id=`: stored messages from there, then live ones, with no gap and
      no duplicate at the seam for messages that carry producer meta (see
      docs/protocol.md, "Catching up", and `Seam`).
    - `durable="NAME"`: stored messages after the last one NAME acknowledged,
      across restarts of this process and of the bus. Delivery follows the
      commits (woken by $bus.commit, polling every `poll_interval` s when no
      notification comes), and every message has its stored `id`. With
      `auto_ack` (default) a message counts as acknowledged once the next one
      is asked for, or `ack()` is called; positions reach the writer at most
      every `ack_interval` s and on close() (`DurablePosition`). A new NAME
      starts at `since` / `after_id` if given, else after the newest stored
      message.
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
        self.poll_interval = poll_interval
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self.invalid = 0
        self.errors = 0                  # failed requests to the reader or writer
        self.last_error: str | None = None
        self._seam: Seam | None = None
        self._position: DurablePosition | None = None
        # Live data is subscribed to except for a durable consumer, which reads
        # only what is stored; stored modes also hear the commit watermark, from
        # the writer's notify endpoint like every "$" topic.
        live = [] if durable is not None else \
            [p.encode("utf-8") for p in self.prefixes if not protocol.is_reserved(p)]
        notices = [p.encode("utf-8") for p in self.prefixes if protocol.is_reserved(p)] + \
            ([protocol.COMMIT_TOPIC.encode()] if self.stored else [])
        # Each socket watched for a wrong peer at its endpoint (something that
        # bound the proxy's or the writer's port while it restarted: libzmq
        # gives up on it); its monitor wakes _recv, which connects it again.
        self._peer_watches = [sockets.PeerWatch(config.sub_endpoint)]
        self._sock = sockets.open_subscriber(self._ctx, config, live,
                                             on_open=self._peer_watches[0].attach)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._notify: zmq.Socket | None = None
        if notices:
            self._peer_watches.append(sockets.PeerWatch(config.notify_endpoint))
            self._notify = sockets.open_subscriber(self._ctx, config, notices,
                                                   config.notify_endpoint,
                                                   self._peer_watches[1].attach)
            self._poller.register(self._notify, zmq.POLLIN)
        for watch in self._peer_watches:
            self._poller.register(watch.monitor, zmq.POLLIN)
        if not self.stored:
            return
        self._history = HistoryClient(config, context=self._ctx)
        self._since_ns = None if since is None else since_to_ns(since)
        self._after_id = after_id
        self._more = True                # ask the reader before waiting for a commit
        self._next_poll = 0.0
        self._pending: deque[Message] = deque()
        if durable is None:
            self._seam = Seam(config.sub_hwm)
            return
        control = ControlClient(config.control_endpoint, config.request_timeout_ms, 1,
                                self._ctx, security.client_keys(config))
        self._position = DurablePosition(durable, control, auto_ack, ack_interval, self._failed)
        try:
            self._after_id = self._position.start(self._history, self.prefixes, after_id,
                                                  self._since_ns)
            self._since_ns = None
        except BaseException:  # writer or reader unreachable: leave nothing open
            self._position = None
            self.durable = None
            control.close()
            self.close()
            raise

    @property
    def switched_to_live(self) -> bool:
        """Catching up: the stored stream has met the live one."""
        return self._seam is not None and self._seam.met

    @property
    def duplicates_skipped(self) -> int:
        return 0 if self._seam is None else self._seam.duplicates_skipped

    @property
    def received_through(self) -> int | None:
        """A durable consumer: every stored message of its prefixes with an id
        up to this one has been returned by receive() (what it has read, not
        what it acknowledged). None in the other modes."""
        if self._position is None:
            return None
        return self._pending[0].id - 1 if self._pending else self._after_id

    def ack(self, message: Message | int | None = None) -> None:
        """Acknowledge `message` (a message, or its id; default: the last one
        received) and all before it (durable; nothing otherwise)."""
        if self._position is not None:
            self._position.ack(message)

    def _failed(self, exc: BusError) -> None:
        self.errors += 1
        self.last_error = str(exc)

    # --- receiving --------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, or None if none arrives within `timeout` seconds."""
        if not self.stored:
            return self._receive_live(None if timeout is None else time.monotonic() + timeout)
        position = self._position
        if position is not None:
            position.before_receive(not self._pending)
        if self._pending:  # the replay's fast path
            return self._take()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._pending:
                return self._take()
            if self.switched_to_live:
                msg = self._receive_live(deadline)
                if msg is None or self._seam.first_delivery(msg):
                    return msg
                continue
            if self._more or time.monotonic() >= self._next_poll:
                self._read_page()
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._wait_for_commit(remaining)

    def _take(self) -> Message:
        msg = self._pending.popleft()
        if self._position is not None:
            self._position.taken = msg.id
        return msg

    def _recv(self, timeout_ms: int | None) -> list[bytes] | None:
        """A message's frames from the data or the notify socket, whichever has
        one within timeout_ms (None: no limit), else None. Meanwhile a socket
        whose endpoint had a wrong peer is connected again: its monitor wakes
        the wait, and while a redial is pending it is looked at at least every
        REDIAL_MAX_S."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        watches = self._peer_watches
        while True:
            pending = any(w.connections is not None and w.connections.gave_up is not None
                          for w in watches)
            wait_ms = None if deadline is None else \
                max(0, int((deadline - time.monotonic()) * 1000))
            if pending and (wait_ms is None or wait_ms > sockets.REDIAL_MAX_S * 1000):
                wait_ms = int(sockets.REDIAL_MAX_S * 1000)
            events = dict(self._poller.poll(wait_ms))
            if pending or any(w.monitor in events for w in watches):
                for watch in watches:
                    watch.check()
            for sock in (self._sock, self._notify):
                if sock is not None and sock in events:
                    return sock.recv_multipart()
            if deadline is not None and time.monotonic() >= deadline:
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

    # --- stored messages ----------------------------------------------------------

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
        if self._seam is None:
            self._pending.extend(page.messages)
            return
        self._pending.extend(self._seam.cut(page.messages))
        if self._seam.met:  # live from now on: the commit watermark is no longer needed
            self._notify.setsockopt(zmq.UNSUBSCRIBE, protocol.COMMIT_TOPIC.encode())

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
        """Read what the sockets have: commit notices tell that more is stored;
        live data is held (catching up) until the stored stream meets it."""
        commit_topic = protocol.COMMIT_TOPIC
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
            if self._seam is not None:
                self._seam.hold(msg)

    def __iter__(self) -> Iterator[Message]:
        while True:
            msg = self.receive()
            if msg is not None:
                yield msg

    def close(self) -> None:
        if self._position is not None:
            self._position.close()
        if self.stored:
            self._history.close()
        for watch in self._peer_watches:
            watch.close()
        self._sock.close(linger=0)
        if self._notify is not None:
            self._notify.close(linger=0)
        if self._own_context and not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
