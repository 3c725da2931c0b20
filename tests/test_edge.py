"""Edge proxies (issue 27): `bus-cli proxy --upstream` runs a proxy whose
subscriber side is fed by another proxy's, so that subscribers on many hosts
share one upstream stream. Real processes: a bus (writer, proxy, reader) and
an edge proxy beside it; subscribers, `tail` and the history+live join
through the edge; subscriptions propagating upstream; CURVE between the two;
an edge that meets something else at its upstream's port while the upstream
restarts; what a hostile subscriber of an edge sends. The netns tests (tests/test_cluster.py) put the edge on a host of
its own."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bus.client import ControlClient, Publisher, Subscriber
from bus.config import with_overrides
from tests.conftest import BUS_CLI, Bus, Proc, free_port, ping, wait_for
from tests.test_auth import keys  # noqa: F401,F811 (a fixture)
from tests.test_restarts import kill_9, met, squat


class Edge:
    """An edge proxy fed by `bus`'s proxy, with endpoints of its own."""

    def __init__(self, bus: Bus, **env: Any) -> None:
        self.bus = bus
        self.env = {"BUS_SUB_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
                    "BUS_PROXY_CONTROL_ENDPOINT": f"tcp://127.0.0.1:{free_port()}",
                    **{k: str(v) for k, v in env.items()}}
        self.proc: Proc = bus.spawn([BUS_CLI, "proxy", "--upstream", bus["BUS_SUB_ENDPOINT"]],
                                    env=self.env)
        wait_for(lambda: ping(self.env["BUS_PROXY_CONTROL_ENDPOINT"], bus.curve())
                 or self.proc.popen.poll() is not None, message="the edge's ping")
        assert self.proc.popen.poll() is None, self.proc.stderr.collect()

    def stats(self) -> dict[str, Any]:
        with ControlClient(self.env["BUS_PROXY_CONTROL_ENDPOINT"], timeout_ms=3000,
                           curve=self.bus.curve()) as client:
            return client.request("stats")

    def connected(self) -> bool:
        return self.stats()["upstream"]["connected"]

    def config(self) -> Any:
        """A client's config that subscribes through the edge."""
        return with_overrides(self.bus.config(), sub_endpoint=self.env["BUS_SUB_ENDPOINT"],
                              proxy_control_endpoint=self.env["BUS_PROXY_CONTROL_ENDPOINT"])


def delivered_through(pub: Publisher, sub: Subscriber, topic: str) -> None:
    """Publish probes on `topic` until one comes out of `sub` (a subscription
    goes up an edge to its upstream before anything comes down)."""
    def arrives() -> bool:
        pub.publish(topic, b"probe")
        msg = sub.receive(timeout=0.1)
        return msg is not None and msg.topic == topic
    wait_for(arrives, message=f"a probe on {topic} through the edge")


def drain(sub: Subscriber, seconds: float = 0.5) -> list[Any]:
    got = []
    while (msg := sub.receive(timeout=seconds)) is not None:
        got.append(msg)
    return got


def test_an_edge_serves_its_subscribers_and_stores_nothing(bus: Bus) -> None:
    """Subscribers of the edge get every message of their prefix, in order;
    the edge takes the whole stream (its subscriptions stay with it) and
    every message is stored once (the edge captures nothing: the writer has
    one capture connection, the main proxy's)."""
    edge = Edge(bus)
    wait_for(edge.connected, message="the edge's upstream handshake")
    cfg = bus.config()
    with Subscriber(["edge.a."], edge.config()) as sub, \
            Publisher(cfg, producer_id="edge-pub") as pub:
        delivered_through(pub, sub, "edge.a.probe")
        pub.flush(timeout=10)
        drain(sub, 0.3)
        before = edge.stats()
        for i in range(300):
            pub.publish("edge.a.t" if i % 3 == 0 else "edge.b.t", b"%d" % i)
        pub.flush(timeout=30)
        got = drain(sub)
        assert [(m.topic, int(m.payload)) for m in got] == \
            [("edge.a.t", i) for i in range(0, 300, 3)]
        taken_in = edge.stats()["frontend_frames_in"] - before["frontend_frames_in"]
    assert taken_in % 300 == 0 and taken_in >= 600, taken_in  # all 300, whole
    assert bus.count("edge.") == 300 + bus.count("edge.a.probe")
    assert bus.writer_stats()["connections"]["capture"]["open"] == 1
    stats = edge.stats()
    assert stats["capture"]["state"] == "none" and "pub" not in stats["endpoints"]
    assert stats["endpoints"]["upstream"] == bus["BUS_SUB_ENDPOINT"]


def test_what_an_edge_s_subscribers_send_stays_at_the_edge(bus: Bus) -> None:
    """A local process that subscribes and unsubscribes in a loop through the
    edge, reconnecting each time, and sends data frames: with libzmq's
    XSUB/XPUB chain all of it went up the edge's one connection, whose bytes
    the upstream's subscription budget counts for good, and the upstream
    cut the edge off with every subscriber of it (the hostile review of
    the first version: a legitimate subscriber got 2,005 of 3,000 messages).
    Now the upstream sees nothing of it, and the edge's subscriber gets
    every message."""
    import zmq
    edge = Edge(bus)
    wait_for(edge.connected, message="the edge's upstream handshake")
    cfg = bus.config()
    ctx = zmq.Context()
    try:
        with Subscriber(["churn.ok."], edge.config()) as sub, \
                Publisher(cfg, producer_id="edge-churn") as pub:
            delivered_through(pub, sub, "churn.ok.probe")
            pub.flush(timeout=10)
            drain(sub, 0.3)
            before = bus.proxy_stats()["subscriptions"]
            for round_no in range(20):
                churner = ctx.socket(zmq.XSUB)
                churner.connect(edge.env["BUS_SUB_ENDPOINT"])
                for i in range(200):
                    churner.send(b"\x01churn.hostile.%d" % i)
                    churner.send(b"\x00churn.hostile.%d" % i)
                    churner.send(b"D" * 200)
                for i in range(5):
                    pub.publish("churn.ok.t", b"%d" % (round_no * 5 + i))
                churner.close(linger=1000)
            pub.flush(timeout=30)
            got = [int(m.payload) for m in drain(sub) if m.topic == "churn.ok.t"]
            after = bus.proxy_stats()["subscriptions"]
    finally:
        ctx.term()
    assert got == list(range(100))
    assert after["refused"] == before["refused"] and after["sent_bytes"] == before["sent_bytes"]
    assert edge.connected() and edge.stats()["upstream"]["wrong_peers"] == 0


def test_an_edge_passes_no_reserved_topic(bus: Bus) -> None:
    """Without CURVE anything can bind the upstream's port while it is away.
    A plain PUB there sending `$bus.ack...`: the edge's subscriber of `$bus.`
    gets nothing of it (the edge subscribes upstream to storable first
    bytes alone, as the main proxy's publisher side does), while a storable
    topic from it passes (the impostor is a working upstream)."""
    import zmq
    edge = Edge(bus)
    wait_for(edge.connected, message="the edge's upstream handshake")
    kill_9(bus.proxy)
    ctx = zmq.Context()
    impostor = ctx.socket(zmq.PUB)
    impostor.bind(bus["BUS_SUB_ENDPOINT"])
    received: list[list[bytes]] = []
    sub = ctx.socket(zmq.SUB)
    try:
        for prefix in (b"$bus.", b"fake."):
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
        sub.connect(edge.env["BUS_SUB_ENDPOINT"])

        def storable_passes() -> bool:
            impostor.send_multipart([b"$bus.ack.victim", b"\x81\xa3seq\x01"])
            impostor.send_multipart([b"fake.t", b"x"])
            while sub.poll(50):
                received.append(sub.recv_multipart())
            return any(frames[0] == b"fake.t" for frames in received)
        wait_for(storable_passes, message="a storable topic through the edge")
        for _ in range(20):
            impostor.send_multipart([b"$bus.ack.victim", b"\x81\xa3seq\x01"])
        while sub.poll(300):
            received.append(sub.recv_multipart())
    finally:
        sub.close(linger=0)
        impostor.close(linger=0)
        ctx.term()
    assert not [frames for frames in received if frames[0].startswith(b"$")]


def test_tail_and_the_history_and_live_join_work_through_an_edge(bus: Bus) -> None:
    """`bus-cli tail --since` pointed at the edge prints what was stored
    before it started, then live, with no gap or duplicate; `tail` alone
    prints live messages."""
    edge = Edge(bus)
    wait_for(edge.connected, message="the edge's upstream handshake")
    cfg = bus.config()
    with Publisher(cfg, producer_id="edge-join") as pub:
        for i in range(200):
            pub.publish("join.t", b"%d" % i)
        pub.flush(timeout=30)
        env = {**bus.env, **edge.env}
        since = subprocess.Popen([BUS_CLI, "tail", "join.", "--since", "1h", "--json",
                                  "-n", "400", "--timeout", "60"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        live = subprocess.Popen([BUS_CLI, "tail", "live.", "--json", "-n", "1",
                                 "--timeout", "60"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        # Live messages published while the first page is read and after:
        # until the live tail saw one, its subscription is on its way up.
        i = 200
        deadline = time.monotonic() + 60
        while live.poll() is None and time.monotonic() < deadline:
            pub.publish("live.t", b"x")
            if i < 400:
                pub.publish("join.t", b"%d" % i)
                i += 1
            time.sleep(0.01)
        while i < 400:
            pub.publish("join.t", b"%d" % i)
            i += 1
        pub.flush(timeout=30)
        out, err = since.communicate(timeout=90)
        live_out, live_err = live.communicate(timeout=30)
    assert since.returncode == 0, err[-2000:]
    payloads = [int(json.loads(line)["payload"]) for line in out.splitlines()]
    assert payloads == list(range(400)), (len(payloads), payloads[:5], payloads[-5:])
    assert live.returncode == 0 and json.loads(live_out.splitlines()[0])["topic"] == "live.t", \
        live_err[-2000:]


def test_an_edge_authenticates_with_curve_and_comes_back_after_a_squatter(
        make_bus, keys: Path) -> None:  # noqa: F811 (the fixture)
    """With CURVE on, the edge is a reader of its upstream (its BUS_CURVE_KEY).
    While the upstream proxy restarts, a NULL listener binds its port: the
    edge's handshake fails there, and libzmq 4.3 never connects that
    endpoint again by itself. The edge connects it again (backing off) and is
    fed again once the upstream is back; its /healthz says why meanwhile.
    Before the edge redialed, it stayed deaf for good."""
    bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret",
                   BUS_REQUEST_TIMEOUT_MS=1000).start()
    edge = Edge(bus, BUS_CURVE_KEY=keys / "clients" / "reader1.key_secret")
    wait_for(edge.connected, message="the edge's CURVE handshake upstream")
    cfg = bus.config()
    with Subscriber(["sq."], edge.config()) as sub, Publisher(cfg, producer_id="edge-sq") as pub:
        delivered_through(pub, sub, "sq.before")
        kill_9(bus.proxy)
        squatter = squat(bus, bus["BUS_SUB_ENDPOINT"])
        met(squatter)  # the edge reconnected to it, and failed its handshake
        wait_for(lambda: edge.stats()["upstream"]["wrong_peers"] >= 1,
                 message="the edge's failed handshake")
        assert not edge.connected()
        assert squatter.wait(timeout=40) == 0
        bus.start_proxy()
        delivered_through(pub, sub, "sq.after")
        pub.flush(timeout=30)
    # Its monitor's events are read once a pass of its loop: a stats asked
    # at once may come before the new handshake's event.
    wait_for(edge.connected, message="the edge's new handshake in its stats")
    stats = edge.stats()
    assert stats["upstream"]["redials"] >= 1
    assert stats["forwarding"] == "running"
    events = [e["event"] for e in edge.proc.log_events()]
    assert "upstream_wrong_peer" in events


def test_an_edge_with_a_key_its_upstream_does_not_let_in_says_so(
        make_bus, keys: Path) -> None:  # noqa: F811 (the fixture)
    """A publisher's key is not a reader's: the upstream refuses the edge,
    and the edge's stats and /healthz say it has no upstream."""
    bus = make_bus(BUS_CURVE_DIR=keys / "curve",
                   BUS_CURVE_KEY=keys / "clients" / "admin1.key_secret").start()
    http = f"127.0.0.1:{free_port()}"
    edge = Edge(bus, BUS_CURVE_KEY=keys / "clients" / "pub1.key_secret",
                BUS_PROXY_HTTP=http)
    wait_for(lambda: bus.proxy_stats()["security"].get("connections_refused", {}).get("sub"),
             message="the upstream refusing the edge's key")
    assert not edge.connected()
    try:
        urllib.request.urlopen(f"http://{http}/healthz", timeout=5)
        raise AssertionError("/healthz answered 200 with no upstream")
    except urllib.error.HTTPError as exc:
        assert exc.code == 503 and "no upstream" in exc.read().decode()
