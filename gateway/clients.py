"""One WebSocket connection: who it is (its token), what it reads (live
prefixes, streams), its producer sessions, and what waits to be sent to it
(its Outbox, bounded in bytes: past BUS_GATEWAY_SEND_BUFFER_BYTES, counting
what the kernel holds for it, a connection is closed with 1008 "slow
consumer" instead of growing the gateway)."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from typing import Any

from websockets.asyncio.server import ServerConnection

from gateway import frames
from gateway.frames import Encoded
from gateway.producers import ProducerSession
from gateway.streams import Stream

# RFC 6455 close codes the gateway uses (and registered ones it means).
CLOSE_GOING_AWAY = 1001          # the gateway stops
CLOSE_PROTOCOL_ERROR = 1002      # not a frame of this protocol (after one error reply)
CLOSE_POLICY = 1008              # no token, a revoked one, a slow consumer, over a cap
CLOSE_TRY_AGAIN_LATER = 1013     # the gateway is over its memory limit
# A client's stream id for its live subscriptions.
LIVE_STREAM = 0


class Outbox:
    """Frames and messages waiting to be sent, in order, with their size."""

    def __init__(self) -> None:
        self.items: deque[tuple[int | None, str | bytes]] = deque()
        self.bytes = 0
        self.ready = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()

    def put(self, stream: int | None, item: str | bytes) -> None:
        """A message of `stream`, or a whole frame (stream None)."""
        self.items.append((stream, item))
        self.bytes += len(item)
        self.ready.set()
        self.drained.clear()

    def next_frame(self, binary: bool) -> str | bytes | None:
        """The next frame to send: a reply or notice as it is, or a stream's
        consecutive messages in one delivery frame of up to
        FRAME_TARGET_BYTES (a larger message goes alone)."""
        items = self.items
        if not items:
            self.ready.clear()
            return None
        stream, item = items.popleft()
        self.bytes -= len(item)
        if stream is None:
            return self._taken(item)
        run, size = [item], len(item)
        while items and items[0][0] == stream and size < frames.FRAME_TARGET_BYTES:
            item = items.popleft()[1]
            self.bytes -= len(item)
            run.append(item)
            size += len(item)
        return self._taken(frames.batch(binary, stream, run))

    def _taken(self, frame: str | bytes) -> str | bytes:
        if not self.items:
            self.ready.clear()
            self.drained.set()
        return frame

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0
        self.drained.set()


class Client:
    """A connection's state. `token_hash` names its token (its rights are
    read again at each request: a token changed or revoked takes effect at
    once); `binary` is the kind of its first frame."""

    def __init__(self, ws: ServerConnection, number: int, send_budget: int,
                 on_cut: Any) -> None:
        self.ws = ws
        self.number = number
        self.send_budget = send_budget
        self.on_cut = on_cut             # (client, reason) for the gateway's counters
        self.token_hash: str | None = None
        self.token_name: str | None = None
        self.token: Any = None           # its rights when it presented it
        # Its default producer name: random, so that no other connection names it.
        self.own_producer = f"ws-{secrets.token_hex(8)}"
        self.binary: bool | None = None
        self.live: set[str] = set()
        self.group: Any = None           # its live group (gateway/live.LiveGroup)
        self.streams: dict[int, Stream] = {}
        self.producers: dict[str, ProducerSession] = {}
        self.unacked = 0
        self.unacked_bytes = 0           # the payloads of those publishes
        self.outbox = Outbox()
        self.closing: str | None = None
        self.close_task: asyncio.Task[None] | None = None
        self.received = self.sent_messages = 0

    @property
    def peer(self) -> str:
        try:
            host, port = self.ws.remote_address[:2]
            return f"{host}:{port}"
        except Exception:
            return "?"

    def buffered(self) -> int:
        """Bytes held for this connection: its outbox and the kernel's share."""
        transport = self.ws.transport
        # A frame taken from the outbox is in the transport's buffer as soon
        # as send() is called: it writes, then waits for the buffer to drain.
        return self.outbox.bytes + (transport.get_write_buffer_size()
                                    if transport is not None else 0)

    # --- what the gateway sends -------------------------------------------

    def deliver(self, stream: int, encoded: Encoded) -> bool:
        if self.closing is not None:
            return False
        item = encoded.item(bool(self.binary))
        if item is None:
            return False
        if self.buffered() + len(item) > self.send_budget:
            self.cut(CLOSE_POLICY, "slow consumer", f"more than {self.send_budget} bytes "
                                                    "waiting to be sent")
            return False
        self.outbox.put(stream, item)
        self.sent_messages += 1
        return True

    def deliver_frames(self, frames: list[str | bytes], messages: int) -> None:
        """A tick of its live group's messages, as frames built once for the group."""
        if self.closing is not None:
            return
        size = sum(len(frame) for frame in frames)
        if self.buffered() + size > self.send_budget:
            self.cut(CLOSE_POLICY, "slow consumer", f"more than {self.send_budget} bytes "
                                                    "waiting to be sent")
            return
        for frame in frames:
            self.outbox.put(None, frame)
        self.sent_messages += messages

    def send_frame(self, frame: str | bytes) -> None:
        """A reply or a notice, within the same budget as messages: a client
        that sends requests and reads no reply is a slow consumer too."""
        if self.closing is not None:
            return
        if self.buffered() + len(frame) > self.send_budget:
            self.cut(CLOSE_POLICY, "slow consumer", f"more than {self.send_budget} bytes "
                                                    "waiting to be sent (replies)")
            return
        self.outbox.put(None, frame)

    def reply(self, request_id: Any, result: Any = None,
              error: tuple[str, str] | None = None) -> None:
        self.send_frame(frames.reply(bool(self.binary), request_id, result, error))

    def tell(self, kind: str, **fields: Any) -> None:
        self.send_frame(frames.notice(bool(self.binary), kind, **fields))

    async def room(self) -> None:
        """Until the outbox is under half the budget (stored messages are paced)."""
        while self.closing is None and self.buffered() > self.send_budget // 2:
            await self.outbox.drained.wait()
            if self.buffered() > self.send_budget // 2:
                await asyncio.sleep(0.01)

    async def send_loop(self) -> None:
        """Send what the outbox holds, as it comes; websockets' send waits
        while the kernel's buffer is over its write limit."""
        ws, outbox = self.ws, self.outbox
        while self.closing is None:
            await outbox.ready.wait()
            frame = outbox.next_frame(bool(self.binary))
            if frame is None:
                continue
            await ws.send(frame)

    def held(self) -> int:
        """Bytes the gateway holds for this connection: what waits to be sent
        and its publishes not yet decided."""
        return self.buffered() + self.unacked_bytes

    def cut(self, code: int, reason: str, detail: str = "", keep_outbox: bool = False) -> None:
        """Close the connection with `code`, dropping what waits for it (but
        the replies already queued, with `keep_outbox`: a clean stop)."""
        if self.closing is not None:
            return
        self.closing = reason
        if keep_outbox:
            self.on_cut(self, reason, detail)
            self.close_task = asyncio.get_running_loop().create_task(self._close_after_sending(
                code, reason))
            return
        self.outbox.clear()
        self.outbox.ready.set()  # the send loop ends
        self.on_cut(self, reason, detail)
        self.close_task = asyncio.get_running_loop().create_task(
            self.ws.close(code, reason[:120]))

    async def _close_after_sending(self, code: int, reason: str) -> None:
        outbox = self.outbox
        while (frame := outbox.next_frame(bool(self.binary))) is not None:
            await self.ws.send(frame)
        await self.ws.close(code, reason[:120])

    def snapshot(self) -> dict[str, Any]:
        return {"connection": self.number, "peer": self.peer, "token": self.token_name,
                "format": None if self.binary is None else
                "msgpack" if self.binary else "json",
                "live": sorted(self.live), "streams": [s.snapshot() for s in
                                                       self.streams.values()],
                "producers": sorted(self.producers), "unacked": self.unacked,
                "buffered_bytes": self.buffered(), "received": self.received,
                "sent_messages": self.sent_messages}
