"""The WebSocket gateway (gateway/), with the real processes: a bus, `bus-cli
gateway`, and WebSocket clients (the `websockets` package's, as a browser
speaks it: frames, close codes, Origin). What one connection can do, the
permission matrix of tokens, revocation, a slow consumer cut off, hostile
frames and a clean stop."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from bus.client import Publisher
from tests.conftest import BUS_CLI, Bus, RawProducer, free_port, query, wait_for
from tests.test_hostile import publish_acked


class Gateway:
    """`bus-cli gateway` on a free port, for `bus`."""

    def __init__(self, bus: Bus, **settings: Any) -> None:
        self.bus = bus
        self.port = free_port()
        env = {"BUS_GATEWAY_LISTEN": f"127.0.0.1:{self.port}",
               **{k: str(v) for k, v in settings.items()}}
        self.proc = bus.spawn([BUS_CLI, "gateway"], env=env)
        self.url = f"ws://127.0.0.1:{self.port}/"
        wait_for(self._listening, message="the gateway listening")

    def _listening(self) -> bool:
        assert self.proc.popen.poll() is None, self.proc.stderr.collect()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def connect(self, token: str | None = None, *, binary: bool = False,
                header: bool = False, **options: Any) -> Ws:
        headers = {"Authorization": f"Bearer {token}"} if header and token else None
        # Entered: websockets (17.1 on) wants a client used as a context manager.
        ws = Ws(connect(self.url, additional_headers=headers, open_timeout=5,
                        **options).__enter__(), binary)
        if token is not None and not header:
            ws.auth = ws.request("auth", token=token)
        return ws

    def stats(self, token: str | None = None) -> dict[str, Any]:
        with self.connect(token) as ws:
            reply = ws.request("stats")
        assert reply["ok"], reply
        return reply["result"]

    def peak_rss(self) -> int:
        """The gateway's peak resident set (VmHWM), in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmHWM:"))) * 1024


class Ws:
    """A client connection: requests answered by id, and the frames that
    came meanwhile (deliveries, notices) kept in order."""

    def __init__(self, conn: ClientConnection, binary: bool) -> None:
        self.conn = conn
        self.binary = binary
        self.frames: list[dict[str, Any]] = []
        self.replies: dict[Any, dict[str, Any]] = {}
        self.ids = iter(range(1, 1 << 30))
        self.auth: dict[str, Any] | None = None

    def send(self, op: str, **args: Any) -> int:
        request_id = next(self.ids)
        request = {"op": op, "id": request_id, **args}
        self.conn.send(msgpack.packb(request) if self.binary else json.dumps(request))
        return request_id

    def _read(self, timeout: float) -> bool:
        try:
            data = self.conn.recv(timeout=timeout)
        except TimeoutError:
            return False
        frame = msgpack.unpackb(data) if isinstance(data, bytes) else json.loads(data)
        if frame.get("type") == "reply":
            self.replies[frame["id"]] = frame
        else:
            self.frames.append(frame)
        return True

    def reply(self, request_id: int, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while request_id not in self.replies:
            assert time.monotonic() < deadline, f"no reply to request {request_id}"
            self._read(0.2)
        return self.replies.pop(request_id)

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        return self.reply(self.send(op, **args))

    def messages(self, stream: int) -> list[dict[str, Any]]:
        return [m for f in self.frames if f.get("type") == "messages" and f["stream"] == stream
                for m in f["messages"]]

    def wait(self, condition: Any, timeout: float = 15, message: str = "frames") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {message}"
            self._read(0.2)

    def closed(self, timeout: float = 10) -> tuple[int, str]:
        """(code, reason) the gateway closed the connection with."""
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "the gateway did not close the connection"
            try:
                self._read(0.2)
            except ConnectionClosed as exc:
                return exc.rcvd.code, exc.rcvd.reason
            if self.conn.close_code is not None:
                return self.conn.close_code, self.conn.close_reason or ""

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ws:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def seqs_by_producer(messages: list[dict[str, Any]]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = defaultdict(list)
    for m in messages:
        found[m["producer"]].append(m["seq"])
    return found


def stored(bus: Bus, producer: str, seq: int) -> bool:
    return bool(query(bus.db, "SELECT count(*) FROM messages WHERE producer_id = ? AND "
                              "producer_seq = ?", (producer, seq))[0][0])


def test_one_connection_subscribes_replays_consumes_and_publishes(bus: Bus) -> None:
    gw = Gateway(bus)
    publish_acked(bus, "before", "orders.a", 50)
    ws = gw.connect()
    assert ws.request("subscribe", prefixes=["orders."])["result"]["prefixes"] == ["orders."]
    # A replay from the start while a publisher goes on: the stored and the
    # live stream meet with no gap and no duplicate.
    done = threading.Event()

    def publish_meanwhile() -> None:
        with Publisher(bus.config(), producer_id="during", connect_timeout=5) as pub:
            for i in range(2000):
                pub.publish("orders.b", b"%d" % i)
                if i % 200 == 0:
                    time.sleep(0.01)
            pub.flush(timeout=30)
        done.set()
    publisher = threading.Thread(target=publish_meanwhile)
    publisher.start()
    assert ws.request("replay", stream=1, prefixes=["orders."], after_id=0)["ok"]
    publisher.join(timeout=60)
    assert done.is_set()
    ws.wait(lambda: len(ws.messages(1)) >= 2050 and len(ws.messages(0)) >= 2000,
            message="the replay and the live stream")
    replayed = seqs_by_producer(ws.messages(1))
    assert replayed == {"before": list(range(1, 51)), "during": list(range(1, 2001))}
    assert [m["id"] for m in ws.messages(1)[:50]] == list(range(1, 51))  # stored: with ids
    assert seqs_by_producer(ws.messages(0))["during"] == list(range(1, 2001))
    assert any(f["type"] == "stream_live" and f["stream"] == 1 for f in ws.frames)

    # Publishing: each reply comes once the writer stored the message.
    ids = [ws.send("publish", topic="orders.web", payload=f"m{i}") for i in range(100)]
    ws.wait(lambda: len([m for m in ws.messages(0) if m["topic"] == "orders.web"]) >= 1)
    (producer,) = {m["producer"] for m in ws.messages(0) if m["topic"] == "orders.web"}
    assert producer.startswith("gw/anonymous/ws-")
    for request_id in ids:
        reply = ws.reply(request_id)
        assert reply["ok"], reply
        # Acknowledged means stored: the seq answered is in the database now.
        assert stored(bus, producer, reply["result"]["seq"])
    assert sorted(ws.replies) == []
    binary = ws.request("publish", topic="orders.bin", payload="AP8=", encoding="base64")
    assert binary["ok"]
    ws.wait(lambda: any(m["topic"] == "orders.bin" for m in ws.messages(0)))
    delivered = next(m for m in ws.messages(0) if m["topic"] == "orders.bin")
    assert (delivered["payload"], delivered["encoding"]) == ("AP8=", "base64")  # not UTF-8

    # Refusals come back with the writer's (or the library's) reason.
    refusals = {
        "reserved_topic": ws.request("publish", topic="$bus.ack.x", payload="x"),
        "topic_too_long": ws.request("publish", topic="orders." + "x" * 300, payload="x"),
        "message_too_large": ws.request("publish", topic="orders.big",
                                        payload="x" * (1 << 20)),
        "bad_request": ws.request("publish", topic="orders.x", payload="@@",
                                  encoding="base64"),
    }
    assert {code: reply["error"]["code"] for code, reply in refusals.items()} == \
        {code: code for code in refusals}

    # A durable consumer: what it acknowledged is where a new connection resumes.
    assert ws.request("consume", stream=2, consumer="audit", prefixes=["orders.a"],
                      after_id=0)["ok"]
    ws.wait(lambda: len(ws.messages(2)) == 50)
    thirtieth = ws.messages(2)[29]["id"]
    # Two acks at once: the second comes within the 0.2 s between two stores
    # of a position, and must still reach the writer while the stream is open.
    assert ws.request("ack", stream=2, last_id=2**63 - 1)["error"]["code"] == "bad_request"
    assert ws.request("ack", stream=2, last_id=thirtieth - 1)["ok"]
    assert ws.request("ack", stream=2, last_id=thirtieth)["result"]["acked_id"] == thirtieth
    # ... and reaches the writer while the stream goes on, not only when it closes.
    wait_for(lambda: bus.request("BUS_CONTROL_ENDPOINT", "consumer_get",
                                 {"consumer": "audit"})["last_id"] == thirtieth,
             message="the position stored with the writer")
    ws.close()
    with gw.connect() as again:
        assert again.request("consume", stream=5, consumer="audit",
                             prefixes=["orders.a"])["ok"]
        again.wait(lambda: len(again.messages(5)) == 20)
        assert [m["seq"] for m in again.messages(5)] == list(range(31, 51))


def tokens_for(bus: Bus, directory: Path, specs: dict[str, list[str]]) -> dict[str, str]:
    """Each token generated with `bus-cli tokens generate` (its flags)."""
    made = {}
    for name, flags in specs.items():
        out = bus.cli("tokens", "generate", str(directory), name, *flags)
        assert out.returncode == 0, out.stderr
        made[name] = out.stdout.split()[1]
    return made


# The rights of each token, as an operator would write them down: what it may
# read, what it may publish to. The expected outcomes below are written out
# by hand from this, not computed by the code under test.
TOKEN_SPECS = {
    "reader": ["--list", "readers", "--read", "orders."],
    "writer": ["--list", "publishers", "--publish", "orders."],
    "both": ["--list", "publishers", "--list", "readers", "--publish", "prices.",
             "--read", "prices.", "--read", "orders.eu."],
    "admin": ["--list", "admins", "--publish", "", "--read", ""],
    "capped": ["--list", "readers", "--read", "x.", "--connections", "2"],
}
READ_PREFIXES = ["orders.", "orders.eu.", "prices.", ""]
TOPICS = ["orders.x", "prices.x", "misc"]
ALLOWED = {
    ("reader", "read", "orders."), ("reader", "read", "orders.eu."),
    ("writer", "publish", "orders.x"),
    ("both", "read", "orders.eu."), ("both", "read", "prices."),
    ("both", "publish", "prices.x"),
    *{("admin", "read", p) for p in READ_PREFIXES},
    *{("admin", "publish", t) for t in TOPICS}, ("admin", "stats", ""),
}


def test_each_token_may_do_what_its_lists_and_prefixes_say(bus: Bus, tmp_path: Path) -> None:
    directory = tmp_path / "tokens"
    made = tokens_for(bus, directory, TOKEN_SPECS)
    gw = Gateway(bus, BUS_GATEWAY_TOKENS_DIR=directory,
                 BUS_GATEWAY_ORIGINS="https://desk.example")
    outcomes: dict[tuple[str, str, str, str], bool] = {}
    for name in ("reader", "writer", "both", "admin"):
        with gw.connect(made[name], binary=name == "both") as ws:
            assert ws.auth is not None and ws.auth["result"]["token"] == name
            stream = 0
            for prefix in READ_PREFIXES:
                for op in ("subscribe", "replay", "consume"):
                    stream += 1
                    args: dict[str, Any] = {"prefixes": [prefix]}
                    if op != "subscribe":
                        args.update(stream=stream, after_id=0)
                    if op == "consume":
                        args["consumer"] = f"c{stream}"
                    reply = ws.request(op, **args)
                    outcomes[(name, op, "read", prefix)] = reply["ok"]
                    if not reply["ok"]:
                        assert reply["error"]["code"] == "forbidden", reply
                    elif op != "subscribe":
                        assert ws.request("close", stream=stream)["ok"]
            for topic in TOPICS:
                reply = ws.request("publish", topic=topic, payload="x")
                outcomes[(name, "publish", "publish", topic)] = reply["ok"]
                if not reply["ok"]:
                    assert reply["error"]["code"] == "forbidden", reply
            reply = ws.request("stats")
            outcomes[(name, "stats", "stats", "")] = reply["ok"]
    expected = {key: (key[0], key[2], key[3]) in ALLOWED for key in outcomes}
    assert outcomes == expected
    assert len(outcomes) == 4 * (4 * 3 + 3 + 1)

    # A token in a header (a client that can set one) instead of the first frame.
    with gw.connect(made["reader"], header=True) as ws:
        assert ws.request("subscribe", prefixes=["orders."])["ok"]
        # One token a connection: another's is refused, the connection keeps its own.
        assert ws.request("auth", token=made["admin"])["error"]["code"] == "bad_request"
        assert ws.request("auth")["result"]["token"] == "reader"
        assert ws.request("stats")["error"]["code"] == "forbidden"
    # No token, a wrong one: closed with 1008.
    with gw.connect() as ws:
        ws.send("subscribe", prefixes=["orders."])
        assert ws.closed() == (1008, "no token")
    with gw.connect() as ws:
        ws.send("auth", token="bus_" + "A" * 43)
        assert ws.closed() == (1008, "bad token")
    # Before its token a connection sends small frames only (an auth is a few
    # hundred bytes; 600 of them sending 1.4 MB each held 887 MB), and at
    # most 128 connections wait for their token: the rest get HTTP 503.
    with gw.connect() as ws:
        ws.conn.send("x" * 10_000)
        assert ws.closed()[0] == 1009
    waiting = [RawWs(gw.port) for _ in range(128)]
    with pytest.raises(AssertionError, match="HTTP/1.1 503"):
        RawWs(gw.port)
    for raw in waiting:
        raw.close()
    wait_for(lambda: gw.stats(made["admin"])["connections"]["open"] == 1,
             message="the waiting connections gone")
    # A page of another site cannot use a browser's connection; a listed
    # origin and the gateway's own (its console) can.
    with pytest.raises(InvalidStatus) as refused:
        gw.connect(made["reader"], origin="https://evil.example")
    assert refused.value.response.status_code == 403
    for origin in ("https://desk.example", f"http://127.0.0.1:{gw.port}"):
        with gw.connect(made["reader"], origin=origin) as ws:
            assert ws.request("ping")["result"] == "pong"
    # A producer name another connection holds is refused (two would fence
    # each other); the default one is random, nobody else's.
    with gw.connect(made["writer"]) as one, gw.connect(made["writer"]) as two:
        assert one.request("publish", topic="orders.x", payload="1", producer="till")["ok"]
        assert two.request("publish", topic="orders.x", payload="2",
                           producer="till")["error"]["code"] == "busy"
        assert one.request("publish", topic="orders.x", payload="3", producer="till")["ok"]
    # A token's own connection cap.
    first, second = gw.connect(made["capped"]), gw.connect(made["capped"])
    with gw.connect() as third:
        third.send("auth", token=made["capped"])
        assert third.closed() == (1008, "too many for token")
    first.close()
    second.close()

    # Its rights narrowed in its file: what it opened under the old ones goes
    # (the connection is closed), and a new connection has the new rights.
    ws = gw.connect(made["both"])
    assert ws.request("subscribe", prefixes=["prices."])["ok"]
    token_file = directory / "both.json"
    data = json.loads(token_file.read_text())
    token_file.write_text(json.dumps({**data, "read": ["orders.eu."]}))
    assert ws.closed() == (1008, "token changed")
    with gw.connect(made["both"]) as again:
        assert again.request("subscribe", prefixes=["prices."])["error"]["code"] == "forbidden"
    # Revoked without a restart: its connection is closed, a new one refused.
    ws = gw.connect(made["reader"])
    assert ws.request("subscribe", prefixes=["orders."])["ok"]
    revoked = bus.cli("tokens", "revoke", str(directory), "reader")
    assert revoked.returncode == 0, revoked.stderr
    assert ws.closed() == (1008, "revoked")
    with gw.connect() as again:
        again.send("auth", token=made["reader"])
        assert again.closed() == (1008, "bad token")
    closed = gw.stats(made["admin"])["connections"]["closed"]
    assert (closed["revoked"], closed["no_token"], closed["too_many_for_token"]) == (1, 1, 1)
    assert closed["too_many_connections"] == 1
    assert (closed["bad_token"], closed["bad_origin"]) == (2, 1)
    assert any(e.get("event") == "origin_refused" and e["origin"] == "https://evil.example"
               for e in gw.proc.log_events())
    # Token files hold hashes, readable by the gateway's own user; one it
    # cannot take is said in its log (else an operator sees only "bad token").
    assert all((directory / f"{name}.json").stat().st_mode & 0o777 == 0o644
               for name in ("admin", "writer"))
    (directory / "broken.json").write_text("{not json")
    wait_for(lambda: any(e.get("event") == "token_file_not_taken" and e["file"] == "broken.json"
                         for e in gw.proc.log_events()), message="the broken file said")
    listed = bus.cli("tokens", "ls", str(directory), "--json")
    entries = json.loads(listed.stdout)
    assert sorted(t["name"] for t in entries if "name" in t) == ["admin", "both", "capped",
                                                                  "writer"]
    assert [t["file"] for t in entries if "problem" in t] == ["broken.json"]


class RawWs:
    """A WebSocket client written by hand on a plain socket: it sends what it
    is told (any frame, masked or not) and reads only when asked, so it can
    be as slow, or as wrong, as a test needs."""

    def __init__(self, port: int, receive_buffer: int = 0) -> None:
        self.sock = socket.socket()
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(10)
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, payload: bytes, opcode: int = 1, masked: bool = True,
             length: int | None = None) -> None:
        """One frame; `length` claims another length than the payload's."""
        size = len(payload) if length is None else length
        mask_bit = 0x80 if masked else 0
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, mask_bit | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, size)
        self.sock.sendall(head + (b"\0\0\0\0" if masked else b"") + payload)  # mask 0: as is

    def close_code(self, timeout: float = 10) -> int | None:
        """Read until the gateway's close frame (its code), or the end."""
        self.sock.settimeout(timeout)
        data = b""
        try:
            while chunk := self.sock.recv(1 << 16):
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        at = data.rfind(b"\x88")
        return struct.unpack("!H", data[at + 2:at + 4])[0] if at >= 0 and \
            len(data) >= at + 4 else None

    def close(self) -> None:
        self.sock.close()


# A publisher in a process of its own (the test's reader keeps the GIL to itself).
FLOOD = """
import sys
from bus.client import Publisher
count, size = int(sys.argv[1]), int(sys.argv[2])
with Publisher(producer_id="flood", connect_timeout=5) as pub:
    for i in range(count):
        pub.publish("flood.x", bytes([65 + i % 26]) * size)
    pub.flush(timeout=60)
"""


def test_a_slow_consumer_is_cut_off_and_the_gateway_stays_within_its_memory(
        bus: Bus, tmp_path: Path) -> None:
    """A client that stops reading is closed (1008, "slow consumer") once
    what waits for it passes BUS_GATEWAY_SEND_BUFFER_BYTES; the others get
    every message; the gateway's peak RSS stays under its bound."""
    made = tokens_for(bus, tmp_path / "tokens", {"admin": ["--list", "admins", "--read", ""]})
    gw = Gateway(bus, BUS_GATEWAY_TOKENS_DIR=tmp_path / "tokens")
    slow = RawWs(gw.port, receive_buffer=4096)
    slow.send(json.dumps({"op": "auth", "token": made["admin"]}).encode())
    slow.send(json.dumps({"op": "subscribe", "prefixes": ["flood."]}).encode())
    good = gw.connect(made["admin"], max_queue=None)  # reads as fast as it comes
    assert good.request("subscribe", prefixes=["flood."])["ok"]
    before = gw.peak_rss()
    count, size = 6000, 8 << 10  # 48 MB through the gateway, from another process
    flood = bus.spawn([sys.executable, "-c", FLOOD, str(count), str(size)])
    assert flood.wait(timeout=60) == 0, flood.stderr.collect()
    good.wait(lambda: len(good.messages(0)) == count, timeout=60, message="every message")
    assert [m["seq"] for m in good.messages(0)] == list(range(1, count + 1))
    closed = good.request("stats")["result"]["connections"]["closed"]
    assert closed["slow_consumer"] == 1
    assert slow.close_code() == 1008
    peak = gw.peak_rss()
    # Each connection may hold 1 MiB (BUS_GATEWAY_SEND_BUFFER_BYTES), libzmq
    # 1,000 messages (8 MB here) for the gateway; holding the flood for the
    # slow one would be 48 MB.
    assert peak - before < 32 << 20, (before, peak)
    good.close()
    slow.close()


def test_hostile_frames_get_an_error_and_cost_nothing_else(bus: Bus) -> None:
    """Frames no client library would send: each is answered bad_request (or
    the connection closed with the RFC's code, where the frame breaks
    WebSocket itself); a well-behaved connection beside them goes on."""
    gw = Gateway(bus, BUS_MAX_MESSAGE_BYTES=64 << 10)
    good = gw.connect()
    assert good.request("subscribe", prefixes=["ok."])["ok"]
    bad_text = ["", "{", "[]", "42", "null", '"op"', '{"op": 1}',
                '{"op": "subscribe", "id": 18446744073709551616, "prefixes": ["a"]}',
                '{"op": "subscribe", "id": {"a": 1}, "prefixes": ["a"]}',
                "[" * 30_000 + "]" * 30_000, '{"op": "x", "a": ' + "[" * 300 + "]" * 300 + "}"]
    with gw.connect() as ws:
        for text in bad_text:
            ws.conn.send(text)
            reply = ws.reply(None)
            assert reply["error"]["code"] == "bad_request", (text[:40], reply)
        ws.conn.send('{"id": 1}')  # an id that can be read is the reply's
        assert ws.reply(1)["error"]["code"] == "bad_request"
        ws.conn.send(msgpack.packb({"op": "ping", "id": 2, b"k": 1}))  # a key of bytes
        assert ws.reply(2)["error"]["reason"] == "map keys must be strings"
        for data in (b"", b"\xc1", b"\x91\x01", b"\xdd\xff\xff\xff\xff", b"\x81\xa2op\xc0"):
            ws.conn.send(data)
            assert ws.reply(None)["error"]["code"] == "bad_request", data
        not_stream_ids = [0, -1, 2**31, 2**63, -(2**63) - 1, 1.5, "1", True, None]
        not_ids = [-1, 2**63, 2**64, -(2**63) - 1, 1.5, "1", True, [1]]
        cases = [("replay", {"stream": v, "prefixes": ["a"]}) for v in not_stream_ids] + \
            [("ack", {"stream": v, "last_id": 1}) for v in not_stream_ids] + \
            [("replay", {"stream": 1, "prefixes": ["a"], "after_id": v}) for v in not_ids] + \
            [("consume", {"stream": 1, "prefixes": ["a"], "consumer": "c", "since_ns": v})
             for v in not_ids] + \
            [("consume", {"stream": 1, "prefixes": ["a"], "consumer": c})
             for c in ("", "x" * 129, "a\nb", 7)]
        for op, args in cases:
            reply = ws.request(op, **args)
            assert not reply["ok"] and reply["error"]["code"] == "bad_request", (op, args, reply)
        for args in ({"prefixes": "a"}, {"prefixes": []}, {"prefixes": [1]},
                     {"prefixes": ["a\x00"]}, {"prefixes": ["p"] * 65}, {"prefixes": ["a"], "x": 1}):
            assert ws.request("subscribe", **args)["error"]["code"] == "bad_request", args
        assert ws.request("subscribe", prefixes=["$bus."])["error"]["code"] == "forbidden"
        assert ws.request("nope")["error"]["code"] == "unknown_command"
        for args in ({"topic": "ok.t", "payload": "\ud800"}, {"topic": "", "payload": "x"},
                     {"topic": "ok.t", "payload": 5}, {"topic": "ok.t", "payload": "x",
                                                        "headers": {"a": 1}},
                     {"topic": "ok.t", "payload": "x", "encoding": "rot13"},
                     {"topic": "ok.t", "payload": "x", "producer": ""}):
            assert ws.request("publish", **args)["error"]["code"] == "bad_request", args
        # A frame over the largest request (a publish of the largest message):
        # closed with 1009, as RFC 6455 says.
        ws.conn.send("x" * (200 << 10))
        assert ws.closed()[0] == 1009
    # Frames that break WebSocket itself: an unmasked client frame (1002), a
    # length of 2^63 - 1 (1009), a reserved opcode (1002), a peer that
    # vanishes mid-frame.
    for frame, code in ((dict(payload=b"{}", masked=False), 1002),
                        (dict(payload=b"", length=2**63 - 1), 1009),
                        (dict(payload=b"{}", opcode=3), 1002)):
        raw = RawWs(gw.port)
        raw.send(**frame)
        assert raw.close_code() == code, frame
        raw.close()
    raw = RawWs(gw.port)
    raw.send(b"x" * 10, length=1000)  # and gone
    raw.close()
    # A local publisher going round the client library: meta values no JSON
    # can carry (a header of bytes, a NaN). The writer refuses them now; the
    # gateway skips what it cannot encode (it once stopped all live delivery).
    with RawProducer(bus, "raw", session=False) as raw:
        raw.send_frames([b"ok.poison", b"1", msgpack.packb({"headers": {"k": b"\x00"}})],
                        [b"ok.poison", b"2", msgpack.packb({"headers": {"k": float("nan")}})],
                        [b"ok.poison", b"3", msgpack.packb({"content_type": 7})])
    wait_for(lambda: bus.writer_stats()["ingest"]["rejected"].get("meta_bad_value", 0) >= 3,
             message="the writer refusing the three")
    # Nothing else was lost: the good connection still gets what it asked for.
    with Publisher(bus.config(), producer_id="after", connect_timeout=5) as pub:
        pub.publish("ok.t", b"still")
        pub.flush(timeout=10)
    good.wait(lambda: [m["payload"] for m in good.messages(0)][-1:] == ["still"])
    # They are not valid messages (protocol.decode_meta, as the writer checks them).
    assert [m for m in good.messages(0) if m["topic"] == "ok.poison"] == []
    assert good.request("ping")["result"] == "pong"
    # Requests whose replies are never read: a slow consumer too (the replies
    # once grew the gateway past its memory limit).
    reader_of_nothing = RawWs(gw.port, receive_buffer=4096)
    request = json.dumps({"op": "stats"}).encode()
    try:
        for _ in range(20_000):
            reader_of_nothing.send(request)
    except OSError:
        pass  # closed by then
    assert reader_of_nothing.close_code() == 1008
    reader_of_nothing.close()
    assert good.request("ping")["result"] == "pong"
    good.close()
    assert gw.proc.popen.poll() is None


def test_sigterm_closes_every_connection_with_1001_and_exits_0(bus: Bus) -> None:
    gw = Gateway(bus)
    clients = [gw.connect() for _ in range(3)]
    for ws in clients:
        assert ws.request("subscribe", prefixes=["x."])["ok"]
    assert clients[0].request("publish", topic="x.t", payload="before")["ok"]
    assert clients[1].request("replay", stream=1, prefixes=["x."], after_id=0)["ok"]
    in_flight = [clients[2].send("publish", topic="x.t", payload=f"p{i}") for i in range(200)]
    gw.proc.send_signal(signal.SIGTERM)
    for ws in clients:
        assert ws.closed() == (1001, "going away")
    # Every publish in flight was answered before the close: stored, or not.
    answered = [clients[2].replies.pop(i) for i in in_flight if i in clients[2].replies]
    assert len(answered) == 200
    stored_ok = sum(1 for reply in answered if reply["ok"])
    assert all(r["ok"] or r["error"]["code"] == "unavailable" for r in answered)
    assert query(bus.db, "SELECT count(*) FROM messages WHERE topic = 'x.t'")[0][0] >= \
        stored_ok + 1
    assert gw.proc.wait(timeout=15) == 0
    events = [e["event"] for e in gw.proc.log_events()]
    assert events[-2:] == ["stopping", "stopped"]


def test_socket_activated_the_port_stays_held_across_a_kill_9(bus: Bus) -> None:
    """bus-gateway.socket's listening socket, passed as systemd passes it: a
    kill -9 leaves the port bound (nothing else can take it and collect
    browsers' tokens), the restarted gateway serves on it, and a socket that
    listens elsewhere is refused (exit 78)."""
    from tests.test_restarts import activated, kill_9
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as systemd does
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    env = {"BUS_GATEWAY_LISTEN": f"127.0.0.1:{port}"}
    bus.env.update(env)
    try:
        gateway = activated(bus, {"gateway": listener}, BUS_CLI, "gateway")
        url = f"ws://127.0.0.1:{port}/"

        def answers() -> bool:
            assert gateway.popen.poll() is None, gateway.stderr.collect()
            try:
                with connect(url, open_timeout=1) as ws:
                    ws.send('{"op": "ping", "id": 1}')
                    return "pong" in ws.recv(timeout=2)
            except (OSError, TimeoutError):
                return False
        wait_for(answers, message="the socket-activated gateway")
        kill_9(gateway)
        squatter = socket.socket()
        with pytest.raises(OSError):
            squatter.bind(("127.0.0.1", port))
        squatter.close()
        gateway = activated(bus, {"gateway": listener}, BUS_CLI, "gateway")
        wait_for(answers, message="the restarted gateway")
        bus.env["BUS_GATEWAY_LISTEN"] = f"127.0.0.1:{free_port()}"
        elsewhere = activated(bus, {"gateway": listener}, BUS_CLI, "gateway")
        assert elsewhere.wait(timeout=15) == 78
    finally:
        listener.close()


def test_with_curve_the_gateway_is_a_client_with_its_key_and_serves_tls(
        make_bus: Any, tmp_path: Path) -> None:
    """With CURVE the gateway reaches the bus with its own key (in publishers/
    and readers/), as any client; a gateway whose key the bus does not list
    gets nothing from it, and says so. wss:// with BUS_GATEWAY_TLS_CERT/KEY."""
    import ssl
    import zmq.auth
    curve, clients = tmp_path / "curve", tmp_path / "clients"
    for directory in (curve, clients, curve / "publishers", curve / "readers",
                      curve / "admins"):
        directory.mkdir()
    for name in ("server", "proxy"):
        zmq.auth.create_certificates(curve, name)
    for name in ("gw", "admin1", "stranger"):
        zmq.auth.create_certificates(clients, name)
    for listed in ("publishers", "readers"):
        (curve / listed / "gw.key").write_bytes((clients / "gw.key").read_bytes())
    (curve / "admins" / "admin1.key").write_bytes((clients / "admin1.key").read_bytes())
    bus = make_bus(BUS_CURVE_DIR=curve, BUS_CURVE_KEY=clients / "admin1.key_secret",
                   BUS_REQUEST_TIMEOUT_MS=1000).start()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=30)
    gw = Gateway(bus, BUS_CURVE_KEY=clients / "gw.key_secret",
                 BUS_GATEWAY_TLS_CERT=tmp_path / "cert.pem",
                 BUS_GATEWAY_TLS_KEY=tmp_path / "key.pem")
    trust = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    url = f"wss://127.0.0.1:{gw.port}/"
    with Ws(connect(url, ssl=trust, open_timeout=5).__enter__(), False) as ws:
        assert ws.request("subscribe", prefixes=["sec."])["ok"]
        assert ws.request("publish", topic="sec.t", payload="over tls")["ok"]
        ws.wait(lambda: [m["payload"] for m in ws.messages(0)] == ["over tls"])
        assert ws.request("replay", stream=1, prefixes=["sec."], after_id=0)["ok"]
        ws.wait(lambda: [m["payload"] for m in ws.messages(1)] == ["over tls"])
    with pytest.raises(Exception):  # no plain WebSocket on a TLS port
        with connect(gw.url, open_timeout=2):
            pass
    stranger = Gateway(bus, BUS_CURVE_KEY=clients / "stranger.key_secret")
    with stranger.connect() as ws:
        refused = ws.request("publish", topic="sec.t", payload="x")
        assert refused["error"]["code"] == "unavailable", refused
