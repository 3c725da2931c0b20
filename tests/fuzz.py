"""Fuzz harness (issue #11): malformed frames of every shape at every endpoint
of a running bus, mixed with valid acknowledged messages.

Each endpoint gets its own sender on a thread: data messages of 1-6 frames
(empty, huge, control bytes, `$`, invalid UTF-8, metas that are not msgpack,
not maps, or maps with integers at and past 64 bits) to the publisher side
and straight into the capture pipe; subscription frames of every length to
the subscriber side and the notify endpoint; request envelopes of every shape
(wrong frame counts, not msgpack, wrong types, known commands with garbage
arguments, integers past 64 bits) to the three REP endpoints, from a REQ
socket and from a DEALER that skips the envelope. Meanwhile a Publisher sends
valid messages. Afterwards: every process is still running, every valid
message is acknowledged and stored exactly once, `PRAGMA integrity_check` is
ok, and each process's RSS is sampled (peak, and after the burst).

    .venv/bin/python -m tests.fuzz --frames 1000000     # per endpoint, on demand
    .venv/bin/python -m tests.fuzz --frames 2000 --seconds 20
    .venv/bin/python -m tests.fuzz --subscription-flood  # subscription_flood_and_churn

tests/test_fuzz.py runs it in CI with a short budget.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from bus import protocol, sockets
from bus.client import Publisher
from tests.conftest import Bus, query

VALID_PRODUCER = "fuzz-valid"
ROLES = ("writer", "proxy", "reader")
COMMANDS = ("ping", "stats", "flush", "history", "utxo_stats", "anchor_proof", "consumer_ack",
            "consumer_get", "consumer_delete", "producer_open", "producer_status",
            "utxo_reserve", "utxo_renew", "utxo_release", "utxo_spend", "utxo_get",
            "utxo_upsert", "utxo_remove", "utxo_sweep", "utxo_tip", "anchor_record",
            "anchor_replace", "anchor_fail", "anchor_update", "anchor_open", "anchor_known",
            "anchor_leaves", "producers_list", "producer_info", "producer_remove", "nope", "")
INT_EDGES = (0, 1, -1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, -(2**63))
META_KEYS = ("producer", "epoch", "seq", "time_ns", "content_type", "headers", "ack", "mac")
REPLY_WAIT_MS = 2000


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


class Shapes:
    """Random frames of the shapes that break parsers, from one seeded RNG.
    With a `session` (producer, epoch, session key) of the fuzzer's own, some
    messages carry that session's valid mac over malformed content, or a mac
    misplaced, truncated or under another key: the writer's refusal of a
    message it can attribute, and its mac check, get their share."""

    def __init__(self, rng: random.Random, max_message_bytes: int,
                 session: tuple[str, int, bytes] | None = None) -> None:
        self.rng = rng
        self.max_message_bytes = max_message_bytes
        self.session = session
        self.signer = protocol.SessionMac(session[2]) if session else None

    def blob(self) -> bytes:
        r = self.rng.random()
        if r < 0.1:
            return b""
        if r < 0.15:  # around the message limit, or well past it
            return self.rng.randbytes(self.rng.choice((self.max_message_bytes - 1,
                                                       self.max_message_bytes + 1,
                                                       2 * self.max_message_bytes)))
        return self.rng.randbytes(self.rng.choice((1, 7, 64, 300, 4096)))

    def value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        if depth < 3 and r < 0.1:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(4))]
        if depth < 3 and r < 0.2:
            return {self.rng.choice(("a", "seq", "producer", 1)): self.value(depth + 1)
                    for _ in range(self.rng.randrange(4))}
        if r < 0.5:
            return self.rng.choice(INT_EDGES)
        if r < 0.6:
            return self.rng.choice((None, True, False, 1.5, float("nan")))
        if r < 0.8:
            return self.rng.choice(("", "x" * 300, "é", "fuzz", "\x00", "a" * 129))
        return self.blob()

    def packed(self, value: Any) -> bytes:
        try:
            return msgpack.packb(value)
        except (OverflowError, ValueError, TypeError):
            return b"\xc1"

    def topic(self) -> bytes:
        return self.rng.choice((b"", b"$bus.ack.fuzz", b"\x00t", b"\x01t", b"\xff\xfe",
                                b"t" * 257, b"fuzz.t", "fuzz.é".encode(), b"fuzz.\xc3",
                                self.rng.randbytes(5)))

    def meta(self) -> bytes:
        r = self.rng.random()
        if r < 0.15:
            return self.rng.choice((b"\xc1", b"\x91", b"\xde\xff\xff", self.rng.randbytes(9)))
        if r < 0.3:
            return self.packed(self.value())
        meta = {key: self.value() for key in self.rng.sample(META_KEYS, self.rng.randrange(5))}
        if meta.get("producer") == VALID_PRODUCER:
            meta["producer"] = "fuzz-other"
        return self.packed(meta)

    def signed_message(self) -> list[bytes]:
        producer, epoch, _key = self.session
        topic, payload = self.topic(), self.blob()
        fields = {"producer": producer, "epoch": self.rng.choice((epoch, epoch, epoch + 1,
                                                                  self.value())),
                  "seq": self.rng.choice((self.rng.randrange(1, 10**6), self.value()))}
        for key in self.rng.sample(META_KEYS[3:-1], self.rng.randrange(3)):
            fields[key] = self.value()
        r = self.rng.random()
        if r < 0.6:
            meta = self.signer.signed_meta(topic, payload, fields)
        elif r < 0.7:  # another key's mac
            meta = protocol.SessionMac(self.rng.randbytes(32)).signed_meta(topic, payload, fields)
        elif r < 0.8:  # the mac entry not last
            meta = self.packed({"mac": self.rng.randbytes(16), **fields})
        elif r < 0.9:  # cut inside its tag, or inside its entry
            meta = self.signer.signed_meta(topic, payload, fields)[:-self.rng.randrange(1, 23)]
        else:  # signed, then one byte of the map changed
            meta = bytearray(self.signer.signed_meta(topic, payload, fields))
            meta[self.rng.randrange(len(meta))] ^= 0x01
            meta = bytes(meta)
        return [topic, payload, meta] + [self.blob()] * self.rng.choice((0, 0, 0, 1))

    def data_message(self) -> list[bytes]:
        if self.signer is not None and self.rng.random() < 0.3:
            return self.signed_message()
        frames = [self.topic(), self.blob()]
        extra = self.rng.choice((0, 1, 1, 1, 2, 4))
        if extra == 0 and self.rng.random() < 0.3:
            return frames[:1]
        return frames + [self.meta() for _ in range(extra)]

    def subscription(self) -> bytes:
        body = self.rng.randbytes(self.rng.choice((0, 1, 10, 100, 300, 2000)))
        return self.rng.choice((b"\x01", b"\x00", b"", b"\x02")) + body

    def request(self) -> list[bytes]:
        r = self.rng.random()
        if r < 0.1:
            return [self.rng.randbytes(self.rng.randrange(1, 40))]
        if r < 0.2:
            return [protocol.encode_request(1, "ping")] * self.rng.randrange(2, 4)
        cmd = self.rng.choice(COMMANDS)
        if cmd in ("producer_open", "producer_remove", "consumer_delete", "consumer_ack"):
            # never the valid ones
            args = {"producer": "fuzz-other", "consumer": "fuzz-consumer",
                    "last_id": self.value()}
        else:
            args = {key: self.value() for key in self.rng.sample(
                ("after_id", "since_ns", "limit", "prefixes", "hash", "request_id", "utxos",
                 "lease_id", "documents", "root", "height", "amount_sat", "anchor_id"),
                self.rng.randrange(4))}
        return [self.packed(self.rng.choice(({"id": self.value(), "cmd": cmd, "args": args},
                                             {"cmd": cmd, "args": self.value()},
                                             {"id": 1, "cmd": self.value()})))]


class Sender:
    """One endpoint's fuzzing loop on a thread, within a frame and time budget."""

    def __init__(self, name: str, loop: Callable[[Sender], None], frames: int,
                 deadline: float) -> None:
        self.name = name
        self.budget = frames
        self.deadline = deadline
        self.frames = 0
        self.replies = 0
        self.unanswered = 0
        self.oversized = 0  # requests past the endpoint's MAXMSGSIZE: dropped with the connection
        self.error: BaseException | None = None
        self._loop = loop
        self.thread = threading.Thread(target=self._run, name=f"fuzz-{name}", daemon=True)

    def more(self) -> bool:
        return self.frames < self.budget and time.monotonic() < self.deadline

    def _run(self) -> None:
        try:
            self._loop(self)
        except BaseException as exc:  # reported in the result
            self.error = exc


def send_data(ctx: zmq.Context, kind: int, endpoint: str, shapes: Shapes
              ) -> Callable[[Sender], None]:
    def loop(sender: Sender) -> None:
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 100)
        sock.connect(endpoint)
        if kind == zmq.XPUB:  # wait for the proxy's subscriptions, as a publisher would
            sock.poll(5000)
        try:
            while sender.more():
                frames = shapes.data_message()
                try:
                    sock.send_multipart(frames)
                except zmq.Again:
                    continue
                sender.frames += len(frames)
                if kind == zmq.XPUB:
                    while sock.poll(0):
                        sock.recv()
        finally:
            sock.close()
    return loop


class RawPeer:
    """A hand-made ZMTP 3.0 peer (NULL mechanism, SUB by default) over TCP: it
    sends whatever frames it is given, multi-frame messages included. libzmq's
    own XSUB crashes its process when it sends multipart messages (libzmq
    4.3.5: a segfault at close), and a hostile peer is not libzmq anyway."""

    GREETING = b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32

    def __init__(self, endpoint: str, socket_type: bytes = b"SUB") -> None:
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(self.GREETING)
        ready = (b"\x05READY" + b"\x0bSocket-Type" + len(socket_type).to_bytes(4, "big")
                 + socket_type)
        self.sock.sendall(bytes((0x04, len(ready))) + ready)
        # Nothing before the peer's greeting and READY: libzmq takes a frame
        # sent while its handshake waits (on its ZAP handler) for a handshake
        # command, and drops the connection (ZMTP_UNEXPECTED_COMMAND).
        self._read_exactly(64)
        flags = self._read_exactly(1)[0]
        size = self._read_exactly(8 if flags & 0x02 else 1)
        self._read_exactly(int.from_bytes(size, "big"))
        self.sock.setblocking(False)

    def _read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the peer closed the connection in its handshake")
            data += chunk
        return data

    def send(self, frames: list[bytes]) -> None:
        wire = bytearray()
        for n, frame in enumerate(frames):
            more = 0x01 if n < len(frames) - 1 else 0
            if len(frame) > 255:
                wire += bytes((more | 0x02,)) + len(frame).to_bytes(8, "big")
            else:
                wire += bytes((more, len(frame)))
            wire += frame
        self.sock.settimeout(1.0)
        self.sock.sendall(wire)
        self.sock.setblocking(False)
        try:
            while self.sock.recv(65536):  # whatever the peer sends back: dropped
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        self.sock.close()


def send_subscriptions(ctx: zmq.Context, endpoint: str, shapes: Shapes
                       ) -> Callable[[Sender], None]:
    """Single subscription frames from libzmq XSUBs that come and go, and
    multi-frame messages of subscriptions and garbage from a raw ZMTP peer."""
    def loop(sender: Sender) -> None:
        sock = raw = None
        try:
            while sender.more():
                if raw is None or shapes.rng.random() < 0.001:
                    if raw is not None:
                        raw.close()
                    raw = RawPeer(endpoint)
                if sock is None or shapes.rng.random() < 0.001:  # connections come and go
                    if sock is not None:
                        sock.close()
                    sock = ctx.socket(zmq.XSUB)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.SNDTIMEO, 100)
                    sock.connect(endpoint)
                if shapes.rng.random() < 0.1:
                    frames = [shapes.subscription(), shapes.blob()]
                    try:
                        raw.send(frames)
                    except OSError:  # dropped by the peer (e.g. MAXMSGSIZE): a new one
                        raw.close()
                        raw = None
                        continue
                    sender.frames += len(frames)
                    continue
                try:
                    sock.send(shapes.subscription())
                except zmq.Again:
                    continue
                sender.frames += 1
                while sock.poll(0):
                    sock.recv_multipart()
        finally:
            for peer in (sock, raw):
                if peer is not None:
                    peer.close()
    return loop


def connected(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def send_requests(ctx: zmq.Context, endpoint: str, max_request_bytes: int, shapes: Shapes
                  ) -> Callable[[Sender], None]:
    def loop(sender: Sender) -> None:
        req = dealer = None
        try:
            while sender.more():
                if shapes.rng.random() < 0.1:  # no envelope at all: REP drops it
                    dealer = dealer or connected(ctx, zmq.DEALER, endpoint)
                    frames = shapes.request()
                    dealer.send_multipart(frames)
                    sender.frames += len(frames)
                    while dealer.poll(0):
                        dealer.recv_multipart()
                    continue
                req = req or connected(ctx, zmq.REQ, endpoint)
                frames = shapes.request()
                req.send_multipart(frames)
                sender.frames += len(frames)
                if any(len(frame) > max_request_bytes for frame in frames):
                    sender.oversized += 1  # libzmq drops it with the connection: no reply
                    req.close()
                    req = None
                elif req.poll(REPLY_WAIT_MS):
                    req.recv_multipart()
                    sender.replies += 1
                else:  # a REQ without its reply is stuck: a new one
                    sender.unanswered += 1
                    req.close()
                    req = None
        finally:
            for sock in (req, dealer):
                if sock is not None:
                    sock.close()
    return loop


class RssSampler:
    def __init__(self, pids: dict[str, int], interval: float = 0.2) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def now(self) -> dict[str, int]:
        return {role: rss_kib(pid) for role, pid in self.pids.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for role, kib in self.now().items():
                self.peak[role] = max(self.peak[role], kib)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


ENDPOINTS = ("pub", "capture", "sub", "notify", "control", "proxy_control", "read")


def fuzz(bus: Bus, frames: int, seconds: float, seed: int = 1, valid_every: float = 0.002
         ) -> dict[str, Any]:
    """Fuzz a started bus (no CURVE: the capture pipe is reachable) with up to
    `frames` frames per endpoint for at most `seconds`; the figures."""
    cfg = bus.config()
    ctx = zmq.Context()
    deadline = time.monotonic() + seconds
    # A session of the fuzzer's own, whose key some malformed messages carry.
    from bus.client import ControlClient
    with ControlClient(cfg.control_endpoint, timeout_ms=5000) as control:
        opened = control.request("producer_open", {"producer": "fuzz-session"})
    session = ("fuzz-session", opened["epoch"], opened["session_key"])
    # An RNG per sender: one Random shared by threads would interleave its draws.
    senders = [Sender(name, loops_for(name, ctx, cfg, Shapes(random.Random(seed * 100 + n),
                                                             cfg.max_message_bytes, session)),
                      frames, deadline) for n, name in enumerate(ENDPOINTS)]
    rss = RssSampler({role: getattr(bus, role).pid for role in ROLES})
    before = rss.now()
    valid = 0
    started = time.monotonic()
    with Publisher(cfg, producer_id=VALID_PRODUCER) as pub:
        for sender in senders:
            sender.thread.start()
        while any(sender.thread.is_alive() for sender in senders):
            pub.publish("fuzz.valid", b"%d" % valid)
            valid += 1
            time.sleep(valid_every)
        burst_s = time.monotonic() - started
        pub.flush(timeout=120)
    after_burst = rss.now()
    settled = _settle(rss)
    rss.stop()
    ctx.destroy(linger=0)
    stored = query(bus.db, "SELECT count(*), count(DISTINCT producer_seq) FROM messages "
                           "WHERE producer_id = ?", (VALID_PRODUCER,))[0]
    writer = bus.writer_stats()
    return {
        "frames_per_endpoint": {s.name: s.frames for s in senders},
        "replies": {s.name: s.replies for s in senders if s.replies or s.unanswered},
        "unanswered": {s.name: s.unanswered for s in senders if s.unanswered},
        "oversized_requests": {s.name: s.oversized for s in senders if s.oversized},
        "sender_errors": {s.name: repr(s.error) for s in senders if s.error},
        "burst_seconds": round(burst_s, 1),
        "alive": {role: getattr(bus, role).popen.poll() is None for role in ROLES},
        "valid_published": valid, "valid_stored": stored[0], "valid_distinct": stored[1],
        "integrity": query(bus.db, "PRAGMA integrity_check")[0][0],
        "rss_kib": {role: {"before": before[role], "peak": rss.peak[role],
                           "after_burst": after_burst[role], "settled": settled[role]}
                    for role in ROLES},
        "writer_rejected": writer["ingest"]["rejected"],
        "writer_nacked": writer["ingest"]["nacked"],
        "writer_not_authentic": writer["security"]["messages_not_authentic"],
        "fuzz_session_stored": query(bus.db, "SELECT count(*) FROM messages WHERE producer_id"
                                             " = 'fuzz-session'")[0][0],
    }


def loops_for(name: str, ctx: zmq.Context, cfg: Any, shapes: Shapes) -> Callable[[Sender], None]:
    if name in ("pub", "capture"):
        return send_data(ctx, zmq.XPUB if name == "pub" else zmq.PUSH,
                         cfg.pub_endpoint if name == "pub" else cfg.capture_endpoint, shapes)
    if name in ("sub", "notify"):
        return send_subscriptions(ctx, cfg.sub_endpoint if name == "sub" else
                                  cfg.notify_endpoint, shapes)
    endpoint = {"control": cfg.control_endpoint, "proxy_control": cfg.proxy_control_endpoint,
                "read": cfg.read_endpoint}[name]
    limit = sockets.MAX_REQUEST_BYTES if name == "control" else sockets.MAX_SMALL_REQUEST_BYTES
    return send_requests(ctx, endpoint, limit, shapes)


def _settle(rss: RssSampler, seconds: float = 10.0) -> dict[str, int]:
    """RSS once it stops falling (or after `seconds`): what the burst left behind."""
    deadline = time.monotonic() + seconds
    last = rss.now()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = rss.now()
        if all(now[r] >= last[r] for r in now):
            return now
        last = now
    return last


def subscription_flood_and_churn(bus: Bus, flooders: int = 4, prefixes: int = 15_000,
                                 prefix_bytes: int = 1000, churn_seconds: float = 8.0,
                                 seed: int = 1) -> dict[str, Any]:
    """Issue 22's subscription shape: `flooders` SUBs each subscribing to
    `prefixes` random prefixes of `prefix_bytes` (held, and sent again on each
    reconnect), then 50 SUBs connecting and leaving over and over (each
    departure makes libzmq walk the proxy's whole subscription trie) while a
    Publisher sends acknowledged rounds of 20 messages. The figures: the
    longest round's wait for its acknowledgements, the proxy's peak RSS, its
    refusals, and whether every process lived and every message is stored."""
    cfg = bus.config()
    ctx = zmq.Context()
    rss = RssSampler({role: getattr(bus, role).pid for role in ROLES}, interval=0.02)
    before = rss.now()
    stop = threading.Event()
    churns = [0]

    def flood(n: int) -> None:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SNDHWM, 0)
        sub.connect(cfg.sub_endpoint)
        rng = random.Random(seed * 1000 + n)
        for _ in range(prefixes):
            sub.setsockopt(zmq.SUBSCRIBE, rng.randbytes(prefix_bytes))
        stop.wait()
        sub.close()

    def churn() -> None:
        while not stop.is_set():
            subs = [ctx.socket(zmq.SUB) for _ in range(50)]
            for i, sub in enumerate(subs):
                sub.setsockopt(zmq.LINGER, 0)
                sub.connect(cfg.sub_endpoint)
                sub.setsockopt(zmq.SUBSCRIBE, b"churn.%d" % i)
            stop.wait(0.05)
            for sub in subs:
                sub.close()
            churns[0] += 1

    threads = [threading.Thread(target=flood, args=(n,), daemon=True) for n in range(flooders)]
    threads.append(threading.Thread(target=churn, daemon=True))
    for thread in threads:
        thread.start()
    longest, sent = 0.0, 0
    waits: list[tuple[float, float]] = []  # each round's wait, and when it started
    begun = time.monotonic()
    try:
        with Publisher(cfg, producer_id="fuzz-churned", connect_timeout=30) as pub:
            end = time.monotonic() + churn_seconds
            while time.monotonic() < end:
                started = time.monotonic()
                for _ in range(20):
                    pub.publish("fuzz.churn", b"%d" % sent)
                    sent += 1
                pub.flush(timeout=120)
                waits.append((round(time.monotonic() - started, 3), round(started - begun, 2)))
                longest = max(longest, waits[-1][0])
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        rss.stop()
        ctx.destroy(linger=0)
    stored = query(bus.db, "SELECT count(DISTINCT producer_seq) FROM messages WHERE "
                           "producer_id = 'fuzz-churned'")[0][0]
    return {
        "alive": {role: getattr(bus, role).popen.poll() is None for role in ROLES},
        "longest_ack_wait_s": round(longest, 3), "published": sent, "stored": stored,
        "longest_waits_s_at_s": sorted(waits, reverse=True)[:3],
        "churn_cycles": churns[0],
        "rss_kib": {role: {"before": before[role], "peak": rss.peak[role]} for role in ROLES},
        "subscriptions": bus.proxy_stats().get("subscriptions"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="per endpoint")
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--subscription-flood", action="store_true",
                        help="issue 22's shape instead: SUBs flooding prefixes, then churning")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bus-fuzz-") as tmp:
        bus = Bus(Path(tmp)).start()
        try:
            result = (subscription_flood_and_churn(bus, seed=args.seed)
                      if args.subscription_flood else
                      fuzz(bus, args.frames, args.seconds, args.seed))
        finally:
            bus.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
