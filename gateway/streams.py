"""A connection's streams of stored messages: a replay (stored messages from
an id or a time, then live ones, meeting with no gap and no duplicate, as
bus.client.Subscriber does: its Seam) and a durable consumer (stored messages
after the position NAME acknowledged, bus.client.subscriber's
DurablePosition). Requests to the reader and the writer are the client
library's, run in the gateway's worker threads (REQUEST_THREADS): a slow
reader holds a stream, never the loop.

Stored messages are sent as the connection takes them (a stream waits while
the connection's outbox is over half full): a replay of a million messages
to a slow browser is paced by the browser, not cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol as TypingProtocol

import zmq

from bus import protocol, security
from bus.logging import get_logger
from bus.client import BusError, ControlClient, HistoryClient
from bus.client.subscriber import PERMANENT_ERRORS, DurablePosition, Seam
from bus.config import BusConfig
from bus.protocol import Message
from gateway.frames import Encoded

log = get_logger("gateway")

# Live messages a replay holds while it reads the stored ones, at most, in
# count and in payload bytes (then it forgets them: the stored stream has them
# all, and the two meet at a later live message).
HOLD_LIMIT = 10_000
HOLD_BYTES = 1 << 20
# With no commit notice, the reader is asked again this often.
POLL_S = 1.0
# After a failed request to the reader or the writer, a stream tries again
# this much later (and tells its client, once until it succeeds).
RETRY_S = 1.0


class Receiver(TypingProtocol):
    """What a stream sends to: its connection."""

    def deliver(self, stream: int, encoded: Encoded) -> bool: ...
    def tell(self, kind: str, **fields: Any) -> None: ...
    async def room(self) -> None: ...


class Stream:
    """What replays and durable consumers share: paging the reader, waiting
    for commits, telling the client about failures."""

    kind = "stream"

    def __init__(self, stream_id: int, prefixes: list[str], receiver: Receiver,
                 config: BusConfig, ctx: zmq.Context, executor: ThreadPoolExecutor,
                 commits: Callable[[], tuple[int, asyncio.Event]]) -> None:
        self.id = stream_id
        self.prefixes = prefixes
        self.receiver = receiver
        self.config = config
        self.executor = executor
        self.ctx = ctx
        self.commits = commits
        self.history = HistoryClient(config, context=ctx)
        self.delivered = 0
        self.last_delivered_id = 0   # a consumer acknowledges up to this id at most
        self.errors = 0
        self.failing: str | None = None
        self.task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[Any] | None = None

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn` in a worker thread, one at a time: a ZeroMQ socket is never
        used by two threads at once. A call outlives its stream's task when
        that is cancelled (shielded); the next call, and close(), wait for it
        (the client library's request timeout bounds it)."""
        while self._inflight is not None and not self._inflight.done():
            await asyncio.wait([self._inflight])
        loop = asyncio.get_running_loop()
        self._inflight = loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))
        return await asyncio.shield(self._inflight)

    async def _page(self, after_id: int | None, since_ns: int | None) -> Any:
        """The next page, retrying every RETRY_S while the reader cannot answer."""
        while True:
            try:
                page = await self._call(self.history.page, self.prefixes, after_id=after_id,
                                        since_ns=since_ns)
            except BusError as exc:
                self._failed(exc)
                await asyncio.sleep(RETRY_S)
                continue
            if self.failing is not None:
                self.failing = None
                self.receiver.tell("stream_resumed", stream=self.id)
            return page

    def _failed(self, exc: BusError) -> None:
        self.errors += 1
        if exc.code in PERMANENT_ERRORS:
            raise exc
        if self.failing is None:
            self.failing = str(exc)
            self.receiver.tell("stream_waiting", stream=self.id, code=exc.code,
                               reason=str(exc))

    async def _wait_for_commit(self, after_id: int) -> None:
        """Until a commit stored something after `after_id`, or POLL_S."""
        last, event = self.commits()
        if last > after_id:
            return
        try:
            await asyncio.wait_for(event.wait(), POLL_S)
        except TimeoutError:
            pass

    async def _send(self, messages: list[Message]) -> None:
        for msg in messages:
            await self.receiver.room()
            if self.receiver.deliver(self.id, Encoded(msg)):
                self.delivered += 1
            if msg.id is not None:  # delivered, or skipped as one it could not encode
                self.last_delivered_id = max(self.last_delivered_id, msg.id)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run_and_report())

    async def _run_and_report(self) -> None:
        try:
            await self.run()
        except asyncio.CancelledError:
            raise
        except BusError as exc:  # no retry can cure it (forbidden, bad request)
            self.receiver.tell("stream_ended", stream=self.id, code=exc.code, reason=str(exc))
        except Exception as exc:  # out of sockets, a bug: said, never silent
            log.exception("stream_failed", stream=self.id, kind=self.kind)
            self.receiver.tell("stream_ended", stream=self.id, code=protocol.INTERNAL_ERROR,
                               reason=f"{type(exc).__name__}: {str(exc)[:200]}")

    async def run(self) -> None:
        raise NotImplementedError

    def take(self, encoded: Encoded) -> None:
        """A live message of the stream's prefixes (replays only)."""

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        await self._call(self.history.close)

    def snapshot(self) -> dict[str, Any]:
        return {"stream": self.id, "kind": self.kind, "prefixes": self.prefixes,
                "delivered": self.delivered, "errors": self.errors, "failing": self.failing}


class Replay(Stream):
    """Stored messages from `after_id` / `since_ns`, then live ones."""

    kind = "replay"

    def __init__(self, *args: Any, after_id: int | None, since_ns: int | None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_id = after_id
        self.since_ns = since_ns
        self.seam = Seam(HOLD_LIMIT, HOLD_BYTES)

    def take(self, encoded: Encoded) -> None:
        if not self.seam.met:
            self.seam.hold(encoded.msg)
        elif self.seam.first_delivery(encoded.msg):
            if self.receiver.deliver(self.id, encoded):
                self.delivered += 1

    async def run(self) -> None:
        after_id, since_ns = self.after_id, self.since_ns
        while not self.seam.met:
            page = await self._page(after_id, since_ns)
            after_id, since_ns = page.after_id, None
            await self._send(self.seam.cut(page.messages))
            if not self.seam.met and not page.more:
                await self._wait_for_commit(after_id)
        self.receiver.tell("stream_live", stream=self.id, after_id=after_id)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "live": self.seam.met,
                "duplicates_skipped": self.seam.duplicates_skipped}


class Durable(Stream):
    """A durable consumer: stored messages after NAME's position, which the
    client moves with `ack` (stored with the writer at most every 0.2 s, and
    when the stream closes)."""

    kind = "consume"

    def __init__(self, *args: Any, name: str, after_id: int | None, since_ns: int | None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.name = name
        self.start_after = after_id
        self.since_ns = since_ns
        control = ControlClient(self.config.control_endpoint, self.config.request_timeout_ms, 1,
                                self.ctx,
                                security.client_keys(self.config))
        self.position = DurablePosition(name, control, False, 0.2, self._ack_failed)
        self.started = asyncio.Event()

    def _ack_failed(self, exc: BusError) -> None:
        self.errors += 1

    async def run(self) -> None:
        while True:
            try:
                after_id = await self._call(self.position.start, self.history, self.prefixes,
                                            self.start_after, self.since_ns)
                break
            except BusError as exc:
                self._failed(exc)
                await asyncio.sleep(RETRY_S)
        self.started.set()
        self.receiver.tell("stream_started", stream=self.id, consumer=self.name,
                           after_id=after_id)
        while True:
            page = await self._page(after_id, None)
            after_id = page.after_id
            await self._send(page.messages)
            # What the client acknowledged reaches the writer within about a
            # second even when it acknowledges no more.
            await self._call(self.position.send_if_due)
            if not page.more:
                await self._wait_for_commit(after_id)

    async def ack(self, last_id: int) -> None:
        """The client has handled every message up to `last_id`."""
        await self._call(self.position.ack, last_id)

    async def close(self) -> None:
        await super().close()
        if self.started.is_set():
            await self._call(self.position.close)
        else:
            await self._call(self.position.control.close)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "consumer": self.name, "acked_id": self.position.acked_id}
