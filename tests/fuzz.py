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
    .venv/bin/python -m tests.fuzz --shape idle --frames 1100 --seconds 10
    .venv/bin/python -m tests.fuzz --subscription-flood  # subscription_flood_and_churn
    .venv/bin/python -m tests.fuzz --shape small-disk --disk-mib 20 --rounds 100 --seconds 60
    .venv/bin/python -m tests.fuzz --shape long-reader --seconds 60 --rate 5000 --clients 8

`idle_connections` is the "idle connections" shape (issue 22): waves of TCP
connections that send nothing, to every endpoint, past the processes'
open-file limits, while clients connected before are served.
`subscription_flood_and_churn` and `noisy_neighbour` are issue 22's other
shapes (subscriptions, a publisher flooding invalid messages).

`small_disk` (issue 22, item 5) puts the database on a tmpfs of its own
(mounting needs root: without it the shape prints one line and exits 77,
"skipped") and fills it, round after round, with acknowledged publishers,
then frees the space: every acknowledged message stored once, the WAL within
its bound on that disk, the writer recovered after each round, SIGTERM exits
0. `long_reader` (item 7) keeps the reader busy with concurrent history
clients (whole pages, scans that match little or nothing) while messages are
published at a steady rate: the WAL's peak within its bound, acknowledgements
flowing (longest gap, p99), every acknowledged message stored once, every
request answered in time. Both print their figures with `checks`, and exit 1
when one does not hold.

tests/test_fuzz.py runs it in CI with a short budget.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from bus import protocol, security, sockets
from bus.client import BusError, ControlClient, Publisher
from tests.conftest import Bus, mounted_tmpfs, query, wait_for

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


# The endpoints a hostile local client can open connections to, by setting.
IDLE_ENDPOINTS = {"pub": "pub_endpoint", "sub": "sub_endpoint", "control": "control_endpoint",
                  "notify": "notify_endpoint", "proxy_control": "proxy_control_endpoint",
                  "read": "read_endpoint"}


def open_idle(endpoint: str, count: int) -> list[socket.socket]:
    """`count` TCP connections to a tcp:// endpoint that will never send a
    byte (not even a ZMTP greeting): non-blocking connects, so a process that
    cannot accept (its descriptor table full, its backlog full) does not stall
    the opener."""
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    idle = []
    for _ in range(count):
        conn = socket.socket(socket.AF_INET6 if host.startswith("[") else socket.AF_INET)
        conn.setblocking(False)
        conn.connect_ex((host.strip("[]"), int(port)))
        idle.append(conn)
    return idle


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def idle_connections(bus: Bus, per_endpoint: int, rounds: int, hold_s: float,
                     client: Any = None, admin: Any = None) -> dict[str, Any]:
    """The "idle connections" shape (issue 22, item 1): `rounds` waves of
    `per_endpoint` TCP connections that send nothing, to every tcp endpoint of
    a started bus, each held `hold_s` seconds, then closed. Clients connected
    before the first wave (a Publisher, a control client of the writer and of
    the proxy: `client` and `admin` are their configs, with CURVE their keys)
    must be served throughout: each wave publishes and waits for every
    acknowledgement, and pings both control endpoints. The figures: whether
    each process lived through it, each one's most open descriptors, what was
    published and acknowledged, the pings answered and missed, and each
    process's `connections` stats afterwards, and each one's RSS before and at
    its peak."""
    cfg = bus.config()
    client = client or cfg
    keys = security.client_keys(admin or cfg)
    endpoints = {name: getattr(cfg, field) for name, field in IDLE_ENDPOINTS.items()
                 if getattr(cfg, field).startswith("tcp://")}
    pids = {role: getattr(bus, role).pid for role in ROLES if getattr(bus, role) is not None}
    most_fds = dict.fromkeys(pids, 0)
    alive = dict.fromkeys(pids, True)
    pings = {"answered": 0, "missed": 0}
    published = 0
    unacknowledged_waves = 0
    opened = 0
    rss = RssSampler(pids)
    before = rss.now()
    with Publisher(client, producer_id="fuzz-idle", connect_timeout=10) as pub, \
            ControlClient(cfg.control_endpoint, timeout_ms=3000, curve=keys) as writer, \
            ControlClient(cfg.proxy_control_endpoint, timeout_ms=3000, curve=keys) as proxy:
        for control in (writer, proxy):
            control.request("ping")
        for _ in range(rounds):
            idle: list[socket.socket] = []
            try:
                for endpoint in endpoints.values():
                    idle += open_idle(endpoint, per_endpoint)
                opened += len(idle)
                deadline = time.monotonic() + hold_s
                while True:
                    for role, pid in pids.items():
                        most_fds[role] = max(most_fds[role], open_fds(pid))
                        alive[role] = alive[role] and getattr(bus, role).popen.poll() is None
                    for _ in range(20):
                        pub.publish("fuzz.idle", b"%d" % published)
                        published += 1
                    try:
                        pub.flush(timeout=10)
                    except BusError:
                        unacknowledged_waves += 1
                    for control in (writer, proxy):
                        try:
                            pings["answered" if control.request("ping") == "pong"
                                  else "missed"] += 1
                        except BusError:
                            pings["missed"] += 1
                    if time.monotonic() >= deadline or not all(alive.values()):
                        break
            finally:
                for conn in idle:
                    conn.close()
            if not all(alive.values()):
                break
        acknowledged = pub.acked_seq
    rss.stop()
    stats = {}
    for role, endpoint in (("writer", "BUS_CONTROL_ENDPOINT"),
                           ("proxy", "BUS_PROXY_CONTROL_ENDPOINT"),
                           ("reader", "BUS_READ_ENDPOINT")):
        if role not in pids:
            continue
        alive[role] = alive[role] and getattr(bus, role).popen.poll() is None
        try:
            stats[role] = bus.request(endpoint, "stats").get("connections") \
                if alive[role] else None
        except BusError as exc:
            stats[role] = repr(exc)
    return {"opened": opened, "alive": alive, "most_fds": most_fds, "pings": pings,
            "rss_kib": {role: {"before": before[role], "peak": rss.peak[role]} for role in pids},
            "published": published, "acknowledged": acknowledged,
            "unacknowledged_waves": unacknowledged_waves,
            "stored": query(bus.db, "SELECT count(*), count(DISTINCT producer_seq) FROM "
                                    "messages WHERE producer_id = 'fuzz-idle'")[0],
            "connections": stats}


NOISY_PUBLISHER = str(Path(__file__).with_name("noisy_publisher.py"))


def refused(writer_stats: dict[str, Any]) -> int:
    """Messages the writer did not store for what they are: invalid, or not
    authentic."""
    return writer_stats["ingest"]["rejected_total"] + \
        writer_stats["security"]["messages_not_authentic"]
HONEST_PRODUCER = "honest"
# An acknowledgement later than this is a publisher's timeout (the figure).
ACK_TIMEOUT_S = 5.0


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of `values` (sorted), 0 when empty."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, int(round(fraction * len(values))) - 1))]


def noisy_neighbour(bus: Bus, seconds: float, honest_rate: float = 50.0, noise: bool = True,
                    kind: str = "bad_meta") -> dict[str, Any]:
    """The noisy-neighbour shape (issue 22, item 6): one publisher connection
    floods invalid messages as fast as it can (tests/noisy_publisher.py, its
    own process) while an honest Publisher sends `honest_rate` messages a
    second for `seconds` and times each one's acknowledgement (publish to the
    acknowledgement that covers it). The figures: the honest latencies (ms),
    how many took longer than ACK_TIMEOUT_S or never came, the rate the noise
    was offered at and the rate the writer refused it at. `kind`: the noise
    (tests/noisy_publisher.py: `bad_meta`, or `forged`, macs that are not the
    session's). `noise=False`: the same without the flood, for comparison.

    The default rate is under BATCH_LOW_LOAD_THRESHOLD (100 msg/s): above it
    the writer batches, and each acknowledgement waits up to
    BATCH_FLUSH_INTERVAL_MS (50 ms) by design, flood or not."""
    cfg = bus.config()
    stats = bus.writer_stats()
    before, flushes_before = stats["ingest"], stats["batch"]
    not_authentic = stats["security"]["messages_not_authentic"]
    with Publisher(cfg, producer_id=HONEST_PRODUCER) as pub:
        pub.publish("honest.t", b"first", wait=True)  # the session and the paths are up
        flooder = None
        if noise:
            flooder = bus.spawn([sys.executable, NOISY_PUBLISHER, str(seconds + 3.0), kind])
            wait_for(lambda: refused(bus.writer_stats()) > refused(stats) + 1000,
                     message="the noise reaching the writer")
        noise_seen = refused(bus.writer_stats())
        started = time.monotonic()
        sent_at: dict[int, float] = {}  # seq -> publish time, in seq order
        latencies: list[float] = []

        def take_acks(wait: float) -> None:
            acked = pub.read_acks(wait)
            now = time.monotonic()
            while sent_at and (seq := next(iter(sent_at))) <= acked:
                latencies.append(now - sent_at.pop(seq))

        interval = 1.0 / honest_rate
        next_at = started
        published = 0
        while (now := time.monotonic()) < started + seconds:
            if now >= next_at:
                sent_at[pub.publish("honest.t", b"%d" % published)] = now
                published += 1
                next_at += interval
            take_acks(max(0.0, min(next_at - time.monotonic(), 0.05)))
        honest_s = time.monotonic() - started
        stats = bus.writer_stats()
        noise_refused = refused(stats) - noise_seen
        flushes = {reason[len("flush_by_"):]: n - flushes_before[reason]
                   for reason, n in stats["batch"].items() if reason.startswith("flush_by_")}
        # The stragglers: acknowledged within ACK_TIMEOUT_S after the last send, or timeouts.
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while sent_at and time.monotonic() < deadline:
            take_acks(0.05)
        noise_line = "noise 0 1" if flooder is None else flooder.stdout.wait_line(
            lambda line: line.startswith("noise "), 30)
        pub.flush(timeout=60)
    noise_sent, noise_seconds = noise_line.split()[1:3]
    latencies.sort()
    after = bus.writer_stats()
    return {
        "seconds": round(honest_s, 1),
        "honest_published": published,
        "honest_ms": {name: round(percentile(latencies, q) * 1000, 1) for name, q in
                      (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))},
        "honest_timeouts": sum(t > ACK_TIMEOUT_S for t in latencies) + len(sent_at),
        "noise_sent_per_s": round(int(noise_sent) / float(noise_seconds)),
        "noise_refused_per_s": round(noise_refused / honest_s),
        "writer_flushes": flushes,  # by reason, while the honest publisher published
        "writer_rejected": {reason: n - before["rejected"].get(reason, 0)
                            for reason, n in after["ingest"]["rejected"].items()},
        "writer_not_authentic": after["security"]["messages_not_authentic"] - not_authentic,
        "alive": {role: getattr(bus, role).popen.poll() is None for role in ROLES},
        "honest_stored": query(bus.db, "SELECT count(*), count(DISTINCT producer_seq) FROM "
                                       "messages WHERE producer_id = ?", (HONEST_PRODUCER,))[0],
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


class WalWatcher:
    """The WAL file's size, sampled every `interval` s on a thread: its peak,
    and when (seconds after the start) it was reached."""

    def __init__(self, wal: str, interval: float = 0.005) -> None:
        self.wal = wal
        self.interval = interval
        self.peak = 0
        self.peak_at_s = 0.0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                size = os.stat(self.wal).st_size
            except FileNotFoundError:
                continue
            if size > self.peak:
                self.peak, self.peak_at_s = size, round(time.monotonic() - self._started, 2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def within(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Whether `condition` comes true within `timeout` s (conftest's wait_for
    fails a pytest test instead; the harness reports it as a failed check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def sigterm_exits(bus: Bus, timeout: float = 30.0) -> dict[str, int | str]:
    """SIGTERM each process (the proxy, then the writer, then the reader, the
    order of Bus.stop) and its exit status, "timeout" if it did not exit."""
    codes: dict[str, int | str] = {}
    for role in ("proxy", "writer", "reader"):
        popen = getattr(bus, role).popen
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
        try:
            codes[role] = popen.wait(timeout)
        except subprocess.TimeoutExpired:
            codes[role] = "timeout"
    return codes


def stored_once(db: str, producers: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per producer: its acknowledged messages (`producers`: producer ->
    acked seq), the rows stored and the distinct seqs among them."""
    stored = {}
    for producer, acknowledged in producers.items():
        rows, distinct = query(db, "SELECT count(*), count(DISTINCT producer_seq) FROM "
                                   "messages WHERE producer_id = ?", (producer,))[0]
        stored[producer] = {"acknowledged": acknowledged, "stored": rows, "distinct": distinct}
    return stored


def all_stored_once(stored: dict[str, dict[str, int]]) -> bool:
    return all(s["acknowledged"] == s["stored"] == s["distinct"] > 0 for s in stored.values())


def writer_wal(bus: Bus, keys: tuple[str, ...]) -> dict[str, Any]:
    """Those of the writer's WAL figures (`stats`: wal, and batch.max_flush_ms,
    the longest commit) that it has."""
    try:
        stats = bus.writer_stats()
    except BusError as exc:
        return {"error": repr(exc)}
    return {**{key: stats["wal"][key] for key in keys if key in stats["wal"]},
            "max_flush_ms": stats["batch"].get("max_flush_ms")}


def disk_is_full(bus: Bus) -> bool:
    """The writer says its commits fail for a full disk."""
    backlog = bus.writer_stats()["backlog"]
    return bool(backlog["failing_for_s"]) and "full" in str(backlog["last_error"])


# Small-disk shape: how long the writer may take to store its backlog once
# space is freed (0.4 s measured in issue 22), and to acknowledge the messages
# published after that (200: they were never acknowledged before the fix).
RECOVERY_TIMEOUT_S = 60.0
AFTER_RECOVERY_MESSAGES = 200
AFTER_RECOVERY_TIMEOUT_S = 20.0
# A round publishes until the writer says the disk is full (up to this many
# messages: the WAL may have room left for some), then this many more, held
# back in the writer's buffer until space is freed.
FILL_MAX_MESSAGES = 50_000
BACKLOG_MESSAGES = 500


def fill_up(path: Path) -> Path:
    """A file at `path` that takes all of its file system's free space, down
    to the last page. Written until the disk says it is full, not to a size
    read before: the writer may take or give back space meanwhile (tests/
    test_hostile.py's fill, for an idle writer, then fails with ENOSPC)."""
    chunk = 1 << 20
    zeros = bytes(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while chunk >= 512:
            try:
                os.write(fd, zeros[:chunk])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return path


def small_disk_wal_bound(disk_bytes: int, page_size: int) -> int:
    """The WAL's stated bound on a file system of `disk_bytes`
    (docs/architecture.md, "Small disks"): the journal_size_limit the writer
    gives itself with all of it free (the most it ever can) and one
    transaction, at most a sixteenth of the free space in message bytes; its
    pages (rows, indexes, page headers) take up to twice that in the WAL."""
    from storage.sqlite import wal_budget
    budget = wal_budget(disk_bytes, page_size)
    return budget.size_limit + 2 * budget.transaction_bytes


def small_disk(bus: Bus, disk: Path, rounds: int, seconds: float, publishers: int = 2,
               payload_bytes: int = 1000) -> dict[str, Any]:
    """The small-disk shape (issue 22, item 5): a started bus whose database is
    on `disk` (a small file system of its own, e.g. a 20 MiB tmpfs). Each
    round a file takes all of the free space, `publishers` acknowledged
    Publishers publish until the writer's commits fail for the full disk and
    BACKLOG_MESSAGES more, the file is deleted, and the round waits for every
    message to be acknowledged and then for AFTER_RECOVERY_MESSAGES more (the
    writer stuck for good there before the WAL was sized from the free
    space). Rounds go on up to `rounds`, `seconds`, or until what is stored
    leaves less than a quarter of the disk free. Meanwhile the WAL file's size
    is sampled; at the end each process gets SIGTERM. The figures: each
    round's messages and timings, the WAL's peak and its bound, each
    process's exit status, what was acknowledged and stored; `checks` says
    which of them hold."""
    cfg = bus.config()
    payload = os.urandom(payload_bytes)
    vfs = os.statvfs(disk)
    disk_bytes = vfs.f_blocks * vfs.f_frsize
    page_size = query(bus.db, "PRAGMA page_size")[0][0]
    wal_bound = small_disk_wal_bound(disk_bytes, page_size)
    wal = WalWatcher(bus.db + "-wal")
    began = time.monotonic()
    pubs = [Publisher(cfg, producer_id=f"fuzz-disk-{n}", connect_timeout=30)
            for n in range(publishers)]
    done: list[dict[str, Any]] = []
    ended_by = "rounds"
    try:
        for pub in pubs:
            pub.publish("fuzz.disk", payload, wait=True, timeout=10)
        for number in range(rounds):
            if time.monotonic() - began >= seconds:
                ended_by = "seconds"
                break
            free = os.statvfs(disk)
            if free.f_bavail * free.f_frsize < disk_bytes // 4:
                ended_by = "disk_used"
                break
            round_: dict[str, Any] = {"round": number}
            done.append(round_)
            first_seqs = [pub.last_seq + 1 for pub in pubs]
            filler = fill_up(disk / f"filler-{number}")
            started, published, full = time.monotonic(), 0, False
            while published < FILL_MAX_MESSAGES and not full:
                for _ in range(100):
                    pubs[published % publishers].publish("fuzz.disk", payload)
                    published += 1
                    for pub in pubs:
                        pub.read_acks()
                full = disk_is_full(bus)
            round_["until_full"] = {"messages": published,
                                    "seconds": round(time.monotonic() - started, 2)}
            if not full:
                round_["disk_full"] = False
                filler.unlink()
                break
            for n in range(BACKLOG_MESSAGES):
                pubs[n % publishers].publish("fuzz.disk", payload)
            round_["held_back"] = sum(pub.last_seq - pub.acked_seq for pub in pubs)
            round_["wal_bytes_full"] = os.path.getsize(bus.db + "-wal")
            freed = time.monotonic()
            filler.unlink()
            try:
                for pub in pubs:
                    pub.flush(timeout=max(0.1, freed + RECOVERY_TIMEOUT_S - time.monotonic()))
            except BusError as exc:
                round_["recovered"] = repr(exc)
                break
            round_["recovered_s"] = round(time.monotonic() - freed, 2)
            after = time.monotonic()
            for n in range(AFTER_RECOVERY_MESSAGES):
                pubs[n % publishers].publish("fuzz.after", payload)
            try:
                for pub in pubs:
                    pub.flush(timeout=max(0.1, after + AFTER_RECOVERY_TIMEOUT_S
                                          - time.monotonic()))
            except BusError as exc:
                round_["after_recovery"] = repr(exc)
                break
            round_["after_recovery_s"] = round(time.monotonic() - after, 2)
            round_["messages"] = sum(pub.last_seq - first + 1
                                     for pub, first in zip(pubs, first_seqs))
    except BusError as exc:  # the writer did not answer (stats), or a publish timed out
        ended_by = f"error: {exc!r}"
    finally:
        acknowledged = {pub.producer_id: pub.acked_seq for pub in pubs}
        unacknowledged = sum(pub.last_seq - pub.acked_seq for pub in pubs)
        for pub in pubs:
            pub.close()
    alive = {role: getattr(bus, role).popen.poll() is None for role in ROLES}
    wal_end = writer_wal(bus, ("bytes", "size_limit", "free_bytes", "checkpoints",
                               "writer_checkpoints", "errors"))
    exits = sigterm_exits(bus)
    wal.stop()
    stored = stored_once(bus.db, acknowledged)
    db_bytes = os.path.getsize(bus.db)
    recovered = [r for r in done if "after_recovery_s" in r]
    checks = {
        "disk_filled_and_recovered_each_round": bool(done) and len(recovered) == len(done)
        and not ended_by.startswith("error"),
        "every_acknowledged_message_stored_once": all_stored_once(stored)
        and unacknowledged == 0,
        "wal_within_bound": wal.peak <= wal_bound,
        "all_alive_until_sigterm": all(alive.values()),
        "sigterm_exits_0": all(code == 0 for code in exits.values()),
        "integrity_ok": query(bus.db, "PRAGMA integrity_check") == [("ok",)],
    }
    return {
        "disk_mib": round(disk_bytes / (1 << 20), 1),
        "seconds": round(time.monotonic() - began, 1), "ended_by": ended_by,
        "rounds": done,
        "recovered_s_max": max((r["recovered_s"] for r in recovered), default=None),
        "after_recovery_s_max": max((r["after_recovery_s"] for r in recovered), default=None),
        "wal_peak_bytes": wal.peak, "wal_peak_at_s": wal.peak_at_s, "wal_bound_bytes": wal_bound,
        "wal_end": wal_end,
        "database_bytes": db_bytes,
        "stored": stored, "unacknowledged": unacknowledged,
        "sigterm_exit": exits,
        "checks": checks,
    }


# Long-reader shape. Every history request is answered (a page, or an error
# reply such as read_failed) within HISTORY_DEADLINE_S: the reader serves one
# request at a time and interrupts any read at 0.5 s (reader/service.py
# READ_MAX_S), so a request waits about that long for each client ahead of it.
HISTORY_DEADLINE_S = 10.0
# The WAL's stated bound with the bus's own reader (docs/architecture.md,
# "Checkpoints and the WAL"): journal_size_limit (storage.sqlite
# WAL_SIZE_LIMIT, 32 MiB) and one transaction, with tests/test_wal.py's room
# for a machine so loaded that a page outlasts the writer's 200 ms wait once.
LONG_READER_WAL_SLACK = 8 << 20
# Acknowledgements keep flowing: no gap longer than this while messages wait,
# and this p99 of publish-to-acknowledgement (a stall, not a benchmark: the
# writer's own checkpoint may hold one commit up to 200 ms, and the machine
# is shared). The issue measured commits of 1,069 ms under a long reader.
ACK_GAP_BOUND_S = 2.0
ACK_P99_BOUND_S = 1.0
# The pages the clients ask for, by kind: everything (pages of
# BUS_HISTORY_PAGE_ROWS rows, up to BUS_HISTORY_PAGE_BYTES), 64 prefixes that
# match nothing (the windowed scan, 5,000 ids a window, over all of history),
# and one prefix that matches one message in RARE_EVERY.
RARE_TOPIC = "fuzz.rare.t"
RARE_EVERY = 1000
HISTORY_KINDS = {"all": [""],
                 "nothing": ["nothing.%d." % i + "x" * 200 for i in range(64)],
                 "rare": ["fuzz.rare."]}


def seed_history(bus: Bus, rows: int) -> None:
    """`rows` stored messages (and one on RARE_TOPIC) for a bus not yet
    started to page through: the scans have something to scan from the start."""
    from tests.test_wal import seeded_history  # here: tests.test_wal imports this module
    seeded_history(Path(bus.db), rows, RARE_TOPIC)


def history_clients(env: dict[str, str], clients: int, stop: Any, out: Any) -> None:
    """`clients` threads, each asking the reader for pages of one kind of
    HISTORY_KINDS back to back (paging on from each page's after_id, and from
    the start again at the end) until `stop` is set; each request's time to
    its answer, and what the answer was. Run in a process of its own
    (long_reader), so that its threads' work is not in the publisher's
    figures. Puts "ready", then its figures, on `out`."""
    from bus.client import BusTimeout
    from bus.client.history import HistoryClient
    from bus.config import load_config
    cfg = load_config(env=env)
    kinds = list(HISTORY_KINDS)
    figures = [{"kind": kinds[n % len(kinds)], "pages": 0, "rows": 0, "errors": {},
                "unanswered": 0, "failures": [], "times": []} for n in range(clients)]

    def ask(figure: dict[str, Any]) -> None:
        prefixes = HISTORY_KINDS[figure["kind"]]
        after_id = 0
        history = HistoryClient(cfg, timeout_ms=int(HISTORY_DEADLINE_S * 1000), retries=0)
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    page = history.page(prefixes, after_id=after_id)
                except BusTimeout:
                    figure["unanswered"] += 1
                    history.close()
                    history = HistoryClient(cfg, timeout_ms=int(HISTORY_DEADLINE_S * 1000),
                                            retries=0)
                    continue
                except BusError as exc:  # an error reply: answered, and the client retries
                    figure["errors"][exc.code] = figure["errors"].get(exc.code, 0) + 1
                else:
                    figure["pages"] += 1
                    figure["rows"] += len(page.rows)
                    after_id = page.after_id if page.more else 0
                figure["times"].append(time.monotonic() - started)
        except Exception as exc:  # reported, and a failed check
            figure["failures"].append(repr(exc))
        finally:
            history.close()

    threads = [threading.Thread(target=ask, args=(figure,), daemon=True) for figure in figures]
    for thread in threads:
        thread.start()
    out.put("ready")
    for thread in threads:
        thread.join()
    out.put(figures)


def long_reader(bus: Bus, seconds: float, rate: float = 5000.0, clients: int = 8,
                payload_bytes: int = 1000) -> dict[str, Any]:
    """The long-reader shape (issue 22, item 7): a started bus (seeded with
    history to page through: seed_history) whose reader `clients` concurrent
    clients keep busy with large pages and with filtered scans that match
    little or nothing (history_clients, its own process), while a Publisher
    publishes `rate` messages a second for `seconds` and times each one's
    acknowledgement. Meanwhile the WAL file's size is sampled. The figures:
    the WAL's peak and its bound, the acknowledgement latencies and the
    longest gap between two acknowledgements while messages waited, the
    clients' requests (pages, error replies by code, unanswered, the longest
    and p99 time to an answer) by kind, what was stored; `checks` says which
    of them hold."""
    import multiprocessing
    from storage.sqlite import WAL_SIZE_LIMIT
    cfg = bus.config()
    payload = os.urandom(payload_bytes)
    wal_bound = WAL_SIZE_LIMIT + LONG_READER_WAL_SLACK
    spawn = multiprocessing.get_context("spawn")
    stop, out = spawn.Event(), spawn.Queue()
    readers = spawn.Process(target=history_clients, args=(bus.env, clients, stop, out),
                            daemon=True)
    readers.start()
    figures: list[dict[str, Any]] = []
    wal = WalWatcher(bus.db + "-wal")
    latencies: list[float] = []
    longest_gap = 0.0
    try:
        if out.get(timeout=60) != "ready":
            raise RuntimeError("the history clients did not start")
        with Publisher(cfg, producer_id="fuzz-long-reader", connect_timeout=30) as pub:
            pub.publish("fuzz.reader.t", payload, wait=True, timeout=10)
            sent_at: dict[int, float] = {}  # seq -> publish time, in seq order
            waiting_since: float | None = None  # the last acknowledgement, or the publish after
            acked = pub.acked_seq

            def take_acks(wait: float) -> None:
                nonlocal acked, waiting_since, longest_gap
                if pub.read_acks(wait) == acked:
                    return
                now = time.monotonic()
                acked = pub.acked_seq
                if waiting_since is not None:
                    longest_gap = max(longest_gap, now - waiting_since)
                while sent_at and (seq := next(iter(sent_at))) <= acked:
                    latencies.append(now - sent_at.pop(seq))
                waiting_since = now if sent_at else None

            started = time.monotonic()
            published = 0
            while (now := time.monotonic()) < started + seconds:
                due = int((now - started) * rate) - published
                for _ in range(due):
                    published += 1
                    topic = RARE_TOPIC if published % RARE_EVERY == 0 else "fuzz.reader.t"
                    sent_at[pub.publish(topic, payload)] = now
                if due and waiting_since is None:
                    waiting_since = now
                take_acks(0.005)
            publish_s = time.monotonic() - started
            deadline = time.monotonic() + 60
            while sent_at and time.monotonic() < deadline:
                take_acks(0.05)
            if waiting_since is not None:
                longest_gap = max(longest_gap, time.monotonic() - waiting_since)
            unacknowledged = pub.last_seq - pub.acked_seq
            acknowledged = {pub.producer_id: pub.acked_seq}
    finally:
        stop.set()
        wal.stop()
        try:
            figures = out.get(timeout=HISTORY_DEADLINE_S + 30)
        except queue.Empty:  # reported as no figures: a failed check
            figures = []
        readers.join(timeout=10)
        if readers.is_alive():
            readers.kill()
    latencies.sort()
    alive = {role: getattr(bus, role).popen.poll() is None for role in ROLES}
    reader_stats = bus.request("BUS_READ_ENDPOINT", "stats") if alive["reader"] else {}
    wal_end = writer_wal(bus, ("bytes", "checkpoints", "writer_checkpoints",
                               "max_checkpoint_ms"))
    stored = stored_once(bus.db, acknowledged)
    requests: dict[str, dict[str, Any]] = {}
    for kind in HISTORY_KINDS:
        mine = [f for f in figures if f["kind"] == kind]
        times = sorted(t for f in mine for t in f["times"])
        errors: dict[str, int] = {}
        for f in mine:
            for code, n in f["errors"].items():
                errors[code] = errors.get(code, 0) + n
        requests[kind] = {"clients": len(mine), "pages": sum(f["pages"] for f in mine),
                          "rows": sum(f["rows"] for f in mine), "errors": errors,
                          "unanswered": sum(f["unanswered"] for f in mine),
                          "failures": [x for f in mine for x in f["failures"]],
                          "answer_s": {"p50": round(percentile(times, 0.5), 3),
                                       "p99": round(percentile(times, 0.99), 3),
                                       "max": round(times[-1] if times else 0.0, 3)}}
    checks = {
        "wal_within_bound": wal.peak <= wal_bound,
        "acks_keep_flowing": longest_gap <= ACK_GAP_BOUND_S
        and percentile(latencies, 0.99) <= ACK_P99_BOUND_S,
        "every_acknowledged_message_stored_once": all_stored_once(stored)
        and unacknowledged == 0,
        "every_request_answered_in_time": len(figures) == clients and all(
            r["pages"] > 0 and r["unanswered"] == 0 and not r["failures"]
            and r["answer_s"]["max"] <= HISTORY_DEADLINE_S for r in requests.values()),
        "all_alive": all(alive.values()),
    }
    return {
        "seconds": round(publish_s, 1), "rate": rate, "clients": clients,
        "published": published,
        "ack_ms": {name: round(percentile(latencies, q) * 1000, 1) for name, q in
                   (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "longest_ack_gap_ms": round(longest_gap * 1000, 1),
        "wal_peak_bytes": wal.peak, "wal_peak_at_s": wal.peak_at_s, "wal_bound_bytes": wal_bound,
        "wal_end": wal_end,
        "requests": requests,
        "reader": {key: reader_stats.get(key) for key in ("requests", "rows_served",
                                                          "max_page_ms")},
        "stored": stored, "unacknowledged": unacknowledged,
        "checks": checks,
    }


# The exit status when a shape cannot run here (a tmpfs cannot be mounted):
# "skipped", as automake's and meson's test harnesses read it.
EXIT_SKIPPED = 77


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="per endpoint")
    parser.add_argument("--seconds", type=float, default=None,
                        help="at most (default: 3600; small-disk 300; long-reader 60)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shape", choices=("frames", "idle", "small-disk", "long-reader"),
                        default="frames",
                        help="malformed frames (default); idle connections: --frames of them "
                             "to each endpoint, held --seconds, in 3 waves; small-disk: the "
                             "database on a --disk-mib tmpfs filled and freed for --rounds "
                             "rounds or --seconds; long-reader: history clients keeping the "
                             "reader busy while --rate messages a second are published for "
                             "--seconds")
    parser.add_argument("--rounds", type=int, default=100, help="small-disk: at most")
    parser.add_argument("--disk-mib", type=int, default=20, help="small-disk: the tmpfs")
    parser.add_argument("--rate", type=float, default=5000.0,
                        help="long-reader: acknowledged messages a second")
    parser.add_argument("--clients", type=int, default=8,
                        help="long-reader: concurrent history clients")
    parser.add_argument("--history-rows", type=int, default=100_000,
                        help="long-reader: messages stored before the bus starts")
    parser.add_argument("--subscription-flood", action="store_true",
                        help="issue 22's shape instead: SUBs flooding prefixes, then churning")
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else \
        {"small-disk": 300.0, "long-reader": 60.0}.get(args.shape, 3600.0)
    with tempfile.TemporaryDirectory(prefix="bus-fuzz-") as tmp, \
            contextlib.ExitStack() as stack:
        settings: dict[str, Any] = {}
        if args.shape == "small-disk":
            import pytest  # mounted_tmpfs says why it cannot mount with pytest.skip
            try:
                disk = stack.enter_context(mounted_tmpfs(Path(tmp) / "disk", args.disk_mib))
            except pytest.skip.Exception as exc:
                print(f"small-disk: skipped: {exc.msg.splitlines()[0]}", file=sys.stderr)
                sys.exit(EXIT_SKIPPED)
            settings = {"BUS_DB": disk / "bus.db", "BUS_SHUTDOWN_TIMEOUT_MS": 10_000}
        bus = Bus(Path(tmp), **settings)
        stack.callback(bus.close)
        if args.shape == "long-reader":
            seed_history(bus, args.history_rows)
        bus.start()
        if args.subscription_flood:
            result = subscription_flood_and_churn(bus, seed=args.seed)
        elif args.shape == "idle":
            result = idle_connections(bus, args.frames, 3, seconds)
        elif args.shape == "small-disk":
            result = small_disk(bus, disk, args.rounds, seconds)
        elif args.shape == "long-reader":
            result = long_reader(bus, seconds, args.rate, args.clients)
        else:
            result = fuzz(bus, args.frames, seconds, args.seed)
    print(json.dumps(result, indent=2))
    failed = [name for name, held in result.get("checks", {}).items() if not held]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    main()
