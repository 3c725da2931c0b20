"""The gateway's view of live traffic: one SUB on the proxy's subscriber
side, one on the writer's notifications (commit watermarks), and the index of
who wants which topic prefix.

The SUB takes the whole stream (every storable first byte,
protocol.PROXY_SUBSCRIPTIONS, as an edge proxy does) and the gateway filters
it for its clients: what browsers subscribe and unsubscribe never reaches the
proxy, whose subscription budget counts every byte a connection ever sent
(one connection for thousands of browsers would be cut off), and no "$" topic
comes this way. The sockets are read from the event loop (ZMQ_FD is
edge-triggered: each wake reads until libzmq has nothing, at most
READ_BATCH messages a turn of the loop).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from typing import Any, Protocol as TypingProtocol

import msgpack
import zmq

from bus import protocol, sockets
from bus.config import BusConfig
from bus.logging import get_logger
from gateway.frames import FRAME_TARGET_BYTES, Encoded, batch

log = get_logger("gateway")

# Messages, and bytes, read from a socket before the loop turns to its other
# work (the connections' sends): what one turn adds to a connection's outbox
# stays well under its budget (BUS_GATEWAY_SEND_BUFFER_BYTES, 64 KiB at least).
READ_BATCH = 512
READ_BATCH_BYTES = 32 << 10
# Messages libzmq queues for the gateway when its loop falls behind (then the
# proxy drops for it, as for any slow subscriber): at most LIVE_HWM x
# BUS_MAX_MESSAGE_BYTES of the gateway's memory (docs/protocol.md, "WebSocket
# gateway": its memory).
LIVE_HWM = 1000
# Live messages are counted per topic group (the first two dot-separated
# parts, as `bus-cli topics` groups them) for the console's rates: at most
# this many groups, the rest counted under "(other)".
MAX_TOPIC_GROUPS = 1000


class Sink(TypingProtocol):
    """Who takes live messages of its prefixes: a connection's live
    subscriptions, a replay stream."""

    def take(self, encoded: Encoded) -> None: ...


class PrefixIndex:
    """prefix -> its sinks; the sinks whose prefixes a topic starts with, each once."""

    def __init__(self) -> None:
        self.sinks: dict[str, set[Sink]] = {}
        self._lengths: list[int] = []           # sorted, each length once
        self._per_length: dict[int, int] = {}   # prefixes of each length

    def add(self, prefix: str, sink: Sink) -> None:
        found = self.sinks.get(prefix)
        if found is None:
            found = self.sinks[prefix] = set()
            count = self._per_length.get(len(prefix), 0)
            if not count:  # a new length: the one change that costs a sort's insertion
                bisect.insort(self._lengths, len(prefix))
            self._per_length[len(prefix)] = count + 1
        found.add(sink)

    def remove(self, prefix: str, sink: Sink) -> None:
        found = self.sinks.get(prefix)
        if found is None:
            return
        found.discard(sink)
        if not found:
            del self.sinks[prefix]
            count = self._per_length[len(prefix)] - 1
            if count:
                self._per_length[len(prefix)] = count
            else:
                del self._per_length[len(prefix)]
                self._lengths.remove(len(prefix))

    def matching(self, topic: str) -> set[Sink]:
        matched: set[Sink] = set()
        sinks = self.sinks
        for length in self._lengths:
            if length > len(topic):
                break
            found = sinks.get(topic[:length])
            if found:
                matched |= found
        return matched


class LiveFeed:
    """The two SUB sockets, read from the loop; `received`, `invalid` and
    `last_commit_id` for stats; `commits` wakes the streams waiting for more
    stored messages."""

    def __init__(self, ctx: zmq.Context, config: BusConfig,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.index = PrefixIndex()
        self.received = self.invalid = self.delivered = self.failed = 0
        self.topics: dict[str, int] = {}
        self.last_commit_id = 0
        self.commits = asyncio.Event()
        self.watches = [sockets.PeerWatch(config.sub_endpoint),
                        sockets.PeerWatch(config.notify_endpoint)]
        def data_opened(sock: zmq.Socket) -> None:
            sock.setsockopt(zmq.RCVHWM, LIVE_HWM)
            self.watches[0].attach(sock)
        self.data = sockets.open_subscriber(ctx, config, list(protocol.PROXY_SUBSCRIPTIONS),
                                            on_open=data_opened)

        def notify_opened(sock: zmq.Socket) -> None:
            sock.setsockopt(zmq.MAXMSGSIZE, 64 << 10)  # a commit notice is tens of bytes
            self.watches[1].attach(sock)
        self.notices = sockets.open_subscriber(ctx, config, [protocol.COMMIT_TOPIC.encode()],
                                               config.notify_endpoint, notify_opened)
        self._readers: list[int] = []
        self._watch(self.data, self._read_data)
        self._watch(self.notices, self._read_notices)

    def _watch(self, sock: zmq.Socket, read: Callable[[], bool]) -> None:
        fd = sock.getsockopt(zmq.FD)

        def wake() -> None:
            try:
                more = read()
            except Exception:  # the fd is edge-triggered: a wake lost is a socket deaf for good
                log.exception("live_read_failed")
                more = True
            if more:  # more to read: after the loop's other work
                self.loop.call_soon(wake)
        self.loop.add_reader(fd, wake)
        self._readers.append(fd)
        self.loop.call_soon(wake)  # what came before the reader was added

    def check_peers(self, now: float) -> None:
        """Connect again a socket whose endpoint had a wrong peer (something
        bound the proxy's or the writer's port while it restarted: libzmq
        gives up on it); the service calls this each turn."""
        for watch in self.watches:
            watch.check(now)

    def _read_data(self) -> bool:
        sock, index = self.data, self.index
        size = 0
        for _ in range(READ_BATCH):
            if size >= READ_BATCH_BYTES:
                break
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            self.received += 1
            size += sum(len(frame) for frame in frames)
            try:
                msg = protocol.parse_message(frames)
            except protocol.ProtocolError:
                self.invalid += 1
                continue
            if protocol.is_reserved(msg.topic):
                continue
            self._count(msg.topic)
            sinks = index.matching(msg.topic)
            if sinks:
                encoded = Encoded(msg)
                for sink in sinks:
                    try:
                        sink.take(encoded)
                    except Exception:  # a bug must not stop the loop's reading for good
                        self.failed += 1
                        log.exception("delivery_failed", topic=msg.topic[:200])
                self.delivered += 1
        return True

    def _count(self, topic: str) -> None:
        group = ".".join(topic.split(".", 2)[:2])
        topics = self.topics
        if group in topics:
            topics[group] += 1
        elif len(topics) < MAX_TOPIC_GROUPS:
            topics[group] = 1
        else:
            topics["(other)"] = topics.get("(other)", 0) + 1

    def _read_notices(self) -> bool:
        for _ in range(READ_BATCH):
            try:
                frames = self.notices.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            if len(frames) < 2 or frames[0] != protocol.COMMIT_TOPIC.encode():
                continue
            try:
                last_id = msgpack.unpackb(frames[1])["last_id"]
            except Exception:
                continue
            if type(last_id) is int and last_id > self.last_commit_id:
                self.last_commit_id = last_id
                self.commits.set()
                self.commits = asyncio.Event()
        return True

    def gave_up(self) -> bool:
        return any(watch.gave_up() for watch in self.watches)

    def close(self) -> None:
        for fd in self._readers:
            self.loop.remove_reader(fd)
        for watch in self.watches:
            watch.close()
        self.data.close(linger=0)
        self.notices.close(linger=0)


# A live group gathers what arrives for this long before it sends it: one
# frame a connection per tick instead of one a message (a frame costs the
# gateway and the browser far more than a message in it).
COALESCE_S = 0.005


class LiveGroup:
    """The connections subscribed live to the same prefixes, in the same kind
    of frames: a message is matched and encoded once for the group, and each
    tick's messages become one set of frames, built once and queued to every
    member (what fan-out to a thousand browsers of one dashboard costs is a
    frame a member a tick, not a message a member)."""

    def __init__(self, key: tuple[frozenset[str], bool], loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.binary = key[1]
        self.loop = loop
        self.members: set[Any] = set()
        self.pending: list[str | bytes] = []
        self._pending_bytes = 0
        self._scheduled = False

    def take(self, encoded: Encoded) -> None:
        item = encoded.item(self.binary)
        if item is None:
            return
        self.pending.append(item)
        self._pending_bytes += len(item)
        if self._pending_bytes >= READ_BATCH_BYTES:  # a tick's worth of bytes: now
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self.loop.call_later(COALESCE_S, self._flush_due)

    def _flush_due(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        items, self.pending = self.pending, []
        self._pending_bytes = 0
        if not items or not self.members:
            return
        frames, run, size = [], [], 0
        for item in items:
            run.append(item)
            size += len(item)
            if size >= FRAME_TARGET_BYTES:
                frames.append(batch(self.binary, 0, run))
                run, size = [], 0
        if run:
            frames.append(batch(self.binary, 0, run))
        for member in list(self.members):
            member.deliver_frames(frames, len(items))
