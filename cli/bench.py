"""bus-cli bench: publish, subscribe and acknowledgement rates and latencies
of a running bus, measured the way an application sees them (like `nats bench`).

Publishers and subscribers are separate processes (spawned, so that each has a
core of its own where the machine has one, and no ZeroMQ context crosses a
fork). Before the publishers start, every subscriber must have seen a probe
message pass the proxy: a subscription still on its way would otherwise count
as lost messages. Everything is bounded by --timeout; a publisher or subscriber
that fails ends the run with its error, and no child outlives the command.

The messages are real: the writer stores them like any others, under
TOPIC.data (probes under TOPIC.ready).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import queue
import signal
import time
import uuid
from array import array
from typing import Any

import click
import setproctitle

from bus import protocol
from bus.client import BusError, Publisher, Subscriber
from bus.config import BusConfig, role_fields
from cli.common import MAX_SECONDS, FiniteFloat, build_config, setting_options

# Latencies kept per child: beyond this many messages, every k-th one is sampled.
MAX_SAMPLES = 200_000
PERCENTILES = (50, 90, 99, 99.9)
# How long a subscriber waits for more once the publishers are done.
SUBSCRIBER_GRACE_S = 2.0
PROBE_INTERVAL_S = 0.1
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A child notes how far it is every this many messages (a store to shared memory).
COUNT_EVERY = 256
# At a fixed rate, a publisher reads its acknowledgements at most this often:
# each read costs two polls (3-5 us), which at 50,000 msg/s was a fifth of the
# publisher's CPU, and a latency sample is late by no more than this.
ACK_READ_INTERVAL_S = 0.0001
# The progress line on stderr at most this often.
PROGRESS_EVERY_S = 1.0

_SPAWN = multiprocessing.get_context("spawn")


def percentiles(samples: list[float]) -> dict[str, float]:
    """{p50, p90, p99, p99.9, max} of `samples` (seconds) in milliseconds."""
    if not samples:
        return {}
    ordered = sorted(samples)
    last = len(ordered) - 1
    result = {f"p{q:g}": ordered[min(last, int(q / 100 * len(ordered)))] * 1e3
              for q in PERCENTILES}
    result["max"] = ordered[-1] * 1e3
    return result


def _child_setup(title: str) -> None:
    # The parent owns Ctrl-C and SIGTERM: it stops the children. Should the
    # parent die without doing so (SIGKILL), the kernel sends SIGTERM
    # (PR_SET_PDEATHSIG), so that no child waits forever for a parent gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the line above
        os._exit(1)
    setproctitle.setproctitle(title)


def publisher_main(cfg: BusConfig, index: int, producer_id: str, topic: str, count: int,
                   size: int, rate: float, acked: bool, timeout: float,
                   go: Any, counts: Counts, results: Any) -> None:
    """Publish `count` messages of `size` bytes once `go` is set; with `acked`,
    time each sampled message from publish() until its acknowledgement.
    How far it is goes into `counts` (sent, acknowledged) now and then."""
    _child_setup(f"bus-bench publisher {index + 1} {topic}")
    try:
        payload = os.urandom(size)
        stride = max(1, -(-count // MAX_SAMPLES))
        sent_at = array("d", bytes(8 * (count // stride + 1)))
        ack_latency = array("d")
        noted = 0  # acknowledgements up to this seq (counted from this run's first) are timed

        def note_acks(acked_seq: int) -> None:
            nonlocal noted
            if acked_seq > noted:
                now = time.perf_counter()
                first = (noted // stride + 1) * stride  # the next sampled seq
                for seq in range(first, acked_seq + 1, stride):
                    ack_latency.append(now - sent_at[seq // stride])
                noted = acked_seq
                counts.acknowledged[index] = acked_seq

        pub = Publisher(cfg, producer_id=producer_id, linger_ms=int(timeout * 1000),
                        send_timeout=timeout)
        pub.connect()
        base = pub.last_seq  # a producer id used before continues its sequence
        results.put(("connected", f"publisher:{index}", None))
        if not go.wait(timeout):
            return
        started = read_at = time.perf_counter()
        for i in range(count):
            if rate:
                delay = started + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            seq = pub.publish(topic, payload, content_type=protocol.CONTENT_BYTES)
            if i % COUNT_EVERY == 0:
                counts.sent[index] = i
            if acked:
                now = time.perf_counter()
                if (seq - base) % stride == 0:
                    sent_at[(seq - base) // stride] = now
                # Reading acknowledgements costs two polls: at full speed every
                # 16th message is enough, at a fixed rate every ACK_READ_INTERVAL_S.
                if now - read_at >= ACK_READ_INTERVAL_S if rate else i % 16 == 0:
                    read_at = now
                    note_acks(pub.read_acks() - base)
        published = time.perf_counter()
        counts.sent[index] = count
        if acked:
            deadline = published + timeout
            while pub.acked_seq < pub.last_seq and time.perf_counter() < deadline:
                note_acks(pub.read_acks(0.005) - base)
            pub.flush(max(0.001, deadline - time.perf_counter()))  # re-sends; raises refusals
            note_acks(pub.acked_seq - base)
        done = time.perf_counter()
        pub.close()
        results.put(("done", f"publisher:{index}",
                     {"count": count, "started": started, "published": published, "done": done,
                      "latency": ack_latency.tolist()}))
    except (BusError, protocol.ProtocolError, OSError) as exc:
        results.put(("failed", f"publisher:{index}", f"publisher {index + 1}: {exc}"))


def subscriber_main(cfg: BusConfig, index: int, prefix: str, data_topic: str, expected: int,
                    ready: Any, stop: Any, counts: Counts, results: Any) -> None:
    """Count the messages of `data_topic` until `expected` arrived, or `stop` is
    set and nothing came for SUBSCRIBER_GRACE_S; time each sampled one from
    its meta time_ns (the publisher's clock: same machine, or synchronised)."""
    _child_setup(f"bus-bench subscriber {index + 1} {data_topic}")
    try:
        stride = max(1, -(-expected // MAX_SAMPLES))
        latency = array("d")
        received = 0
        first = last = 0.0
        stopped_at = None  # when this subscriber saw that the publishers were done
        with Subscriber([prefix], cfg) as sub:
            results.put(("connected", f"subscriber:{index}", None))
            while received < expected:
                msg = sub.receive(timeout=0.2)
                now = time.perf_counter()
                if msg is None:
                    if stopped_at is None and stop.is_set():
                        stopped_at = now
                    if stopped_at is not None and now - max(last, stopped_at) > \
                            SUBSCRIBER_GRACE_S:
                        break
                    continue
                if msg.topic != data_topic:
                    ready.set()  # a probe: this subscription reaches the proxy
                    continue
                if not received:
                    first = now
                received += 1
                last = now
                if received % COUNT_EVERY == 0:
                    counts.received[index] = received
                if received % stride == 0 and msg.time_ns:
                    latency.append((time.time_ns() - msg.time_ns) / 1e9)
        counts.received[index] = received
        results.put(("done", f"subscriber:{index}",
                     {"count": received, "started": first, "done": last,
                      "latency": latency.tolist()}))
    except (BusError, OSError) as exc:
        results.put(("failed", f"subscriber:{index}", f"subscriber {index + 1}: {exc}"))


class BenchFailed(click.ClickException):
    pass


class Terminated(Exception):
    """SIGTERM: stop the children and exit 143, with no figures."""


def _terminate(*_: Any) -> None:
    raise Terminated


class Counts:
    """How far each child is, in memory shared with it: messages sent and
    acknowledged per publisher, received per subscriber. Written without a
    lock (each slot by one child), read by the parent for its progress line."""

    def __init__(self, publishers: int, subscribers: int) -> None:
        self.sent = _SPAWN.Array("q", publishers, lock=False)
        self.acknowledged = _SPAWN.Array("q", publishers, lock=False)
        self.received = _SPAWN.Array("q", max(subscribers, 1), lock=False)


class Progress:
    """What the run is doing and how far it is, on stderr (never stdout, which
    is the figures) at most once a second, so that a long run is not a
    silent one. Always: a run in a script or CI shows where it stands in its
    log; on a terminal the line is rewritten in place and erased at the end."""

    def __init__(self, messages: int, acked: bool, subscribers: int) -> None:
        self.messages, self.acked, self.subscribers = messages, acked, subscribers
        self.counts: Counts | None = None
        self.doing = "starting"
        self.started = time.monotonic()
        self.shown_at: float | None = None
        self.terminal = click.get_text_stream("stderr").isatty()
        self.width = 0

    def phase(self, doing: str) -> None:
        self.doing = doing
        self.tick(force=self.shown_at is None)

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self.shown_at is not None and now - self.shown_at < PROGRESS_EVERY_S:
            return
        self.shown_at = now
        line = f"bench: {self.doing}, {now - self.started:.0f}s"
        if self.counts is not None:
            line += f"; sent {sum(self.counts.sent):,} of {self.messages:,}"
            if self.acked:
                line += f", acknowledged {sum(self.counts.acknowledged):,}"
            if self.subscribers:
                line += (f", received {sum(self.counts.received):,} of "
                         f"{self.messages * self.subscribers:,}")
        if self.terminal:
            click.echo("\r" + line.ljust(self.width), nl=False, err=True)
            self.width = len(line)
        else:
            click.echo(line, err=True)

    def clear(self) -> None:
        if self.terminal and self.width:
            click.echo("\r" + " " * self.width + "\r", nl=False, err=True)
            self.width = 0


class Run:
    """The children of one bench run and the queue they report on."""

    def __init__(self, timeout: float, progress: Progress | None = None) -> None:
        self.deadline = time.monotonic() + timeout
        self.results = _SPAWN.Queue()
        self.children: dict[str, Any] = {}
        self.reports: dict[tuple[str, str], Any] = {}  # (kind, "role:index") -> value
        self.progress = progress

    def start(self, role: str, index: int, target: Any, *args: Any) -> None:
        proc = _SPAWN.Process(target=target, args=(*args, self.results), daemon=True,
                              name=f"bus-bench-{role}-{index + 1}")
        proc.start()
        self.children[f"{role}:{index}"] = proc

    def collect(self, role: str, kind: str, count: int, what: str) -> dict[int, Any]:
        """Wait for `count` reports of `kind` from the `role` children (reports
        of others that arrive meanwhile are kept for their own collect)."""
        while True:
            got = {int(name.partition(":")[2]): value
                   for (report, name), value in self.reports.items()
                   if report == kind and name.startswith(f"{role}:")}
            if len(got) >= count:
                return got
            if self.progress is not None:
                self.progress.tick()
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise BenchFailed(f"timed out waiting for {count - len(got)} {role}s to "
                                  f"{what} (is the bus running? bus-cli health says)")
            try:
                report, name, value = self.results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                self._check_alive()
                continue
            if report == "failed":
                raise BenchFailed(value)
            self.reports[(report, name)] = value

    def _check_alive(self) -> None:
        for name, proc in self.children.items():
            if proc.exitcode not in (None, 0):
                role, index = name.split(":")
                raise BenchFailed(f"{role} {int(index) + 1} exited with status {proc.exitcode}")

    def close(self) -> None:
        children, self.children = self.children, {}
        for proc in children.values():
            if proc.is_alive():
                proc.terminate()
        for proc in children.values():
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(1)


def probe_until_ready(cfg: BusConfig, topic: str, producer_id: str, ready: list[Any], run: Run,
                      timeout: float) -> None:
    """Publish probes until every subscriber has seen one."""
    deadline = min(run.deadline, time.monotonic() + timeout)
    with Publisher(cfg, producer_id=producer_id) as probe:
        while not all(event.is_set() for event in ready):
            if time.monotonic() > deadline:
                waiting = sum(not event.is_set() for event in ready)
                raise BenchFailed(f"{waiting} subscriber{'s' if waiting != 1 else ''} saw "
                                  f"nothing through the proxy at {cfg.sub_endpoint} within "
                                  f"{timeout:g}s (is that the proxy's subscriber endpoint?)")
            probe.publish(topic, b"probe")
            run._check_alive()
            if run.progress is not None:
                run.progress.tick()
            for event in ready:
                event.wait(PROBE_INTERVAL_S)
                if not event.is_set():
                    break


def spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` counts that differ by at most one."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def summarize(reports: dict[int, dict[str, Any]], size: int, key: str) -> dict[str, Any]:
    """Aggregate rate over the whole span, each client's rate, and latencies."""
    if not reports:
        return {}
    count = sum(r["count"] for r in reports.values())
    ends = [r[key] for r in reports.values() if r["count"]]
    starts = [r["started"] for r in reports.values() if r["count"]]
    span = (max(ends) - min(starts)) if ends else 0.0
    rates = [r["count"] / (r[key] - r["started"]) for r in reports.values()
             if r["count"] and r[key] > r["started"]]
    samples = [x for r in reports.values() for x in r["latency"]]
    return {"messages": count, "seconds": round(span, 6),
            "msg_per_s": round(count / span, 1) if span > 0 else None,
            "mb_per_s": round(count * size / span / 1e6, 3) if span > 0 else None,
            "per_client_msg_per_s": {"min": round(min(rates), 1), "avg":
                                     round(sum(rates) / len(rates), 1),
                                     "max": round(max(rates), 1)} if rates else {},
            "latency_ms": {k: round(v, 3) for k, v in percentiles(samples).items()}}


@click.command("bench")
@click.argument("topic", required=False)
@click.option("--pub", "publishers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="publisher processes")
@click.option("--sub", "subscribers", type=click.IntRange(0, 64), default=0, show_default=True,
              help="subscriber processes (each receives every message)")
@click.option("--msgs", "-n", "messages", type=click.IntRange(1, 100_000_000), default=100_000,
              show_default=True, help="messages in all, split between the publishers")
@click.option("--size", type=click.IntRange(0, 64 * 1024 * 1024), default=128,
              show_default=True, help="payload bytes")
@click.option("--acked", is_flag=True,
              help="publishers wait for the writer's acknowledgements: acknowledged rate and "
                   "acknowledgement latency (publish to ack seen)")
@click.option("--rate", type=FiniteFloat(min=0, max=1e7), default=0.0, show_default=True,
              help="messages per second in all (0: as fast as possible); latencies at a "
                   "fixed rate are the ones to compare")
@click.option("--timeout", type=FiniteFloat(min=1, max=MAX_SECONDS), default=300.0,
              show_default=True,
              help="seconds the whole run may take")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@setting_options(*role_fields("publisher", "subscriber", "curve"))
@click.pass_context
def bench(ctx: click.Context, topic: str | None, publishers: int, subscribers: int,
          messages: int, size: int, acked: bool, rate: float, timeout: float, as_json: bool,
          **flags: Any) -> None:
    """Rates and latencies of the running bus, like nats bench.

    The publish rate is how fast publish() returns (into the socket's queue;
    the writer's acknowledgements hold it back only past 100,000
    unacknowledged); with --acked, the acknowledged rate and the latency from
    publish() to the acknowledgement; with --sub, the rate of all the
    subscribers' deliveries together and the end-to-end latency. Messages go
    to TOPIC.data (default: a new bench.<id> each run), probes to TOPIC.ready;
    the writer stores both like any others."""
    cfg = build_config(ctx, flags, "bench")
    if topic == "":
        raise click.BadParameter("must not be empty", param_hint="TOPIC")
    run_id = uuid.uuid4().hex[:12]
    topic = topic or f"bench.{run_id}"
    data_topic, probe_topic = f"{topic}.data", f"{topic}.ready"
    try:
        protocol.encode_topic(probe_topic, cfg.max_topic_bytes)  # the longer of the two
    except protocol.ProtocolError as exc:
        raise click.BadParameter(f"{exc} (with .ready appended)", param_hint="TOPIC") from None
    if size + len(data_topic) + 256 > cfg.max_message_bytes:
        raise click.BadParameter(f"{size} bytes leave no room for topic and meta under "
                                 f"BUS_MAX_MESSAGE_BYTES={cfg.max_message_bytes}",
                                 param_hint="--size")
    progress = Progress(messages, acked, subscribers)
    counts = Counts(publishers, subscribers)
    run = Run(timeout, progress)
    per_publisher_rate = rate / publishers
    stop = _SPAWN.Event()
    producer_ids = [f"bench-{run_id}-{i + 1}" for i in range(publishers)]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        ready = [_SPAWN.Event() for _ in range(subscribers)]
        if subscribers:
            progress.phase(f"starting {subscribers} subscriber{'s' * (subscribers != 1)}")
        for i in range(subscribers):
            run.start("subscriber", i, subscriber_main, cfg, i, f"{topic}.", data_topic,
                      messages, ready[i], stop, counts)
        run.collect("subscriber", "connected", subscribers, "connect")
        if subscribers:
            progress.phase("waiting for the subscriptions to reach the proxy")
            probe_until_ready(cfg, probe_topic, f"bench-{run_id}-probe", ready, run,
                              max(1.0, cfg.request_timeout_ms / 1000))
        go = _SPAWN.Event()
        progress.phase(f"starting {publishers} publisher{'s' * (publishers != 1)}")
        for i, count in enumerate(spread(messages, publishers)):
            run.start("publisher", i, publisher_main, cfg, i, producer_ids[i], data_topic,
                      count, size, per_publisher_rate, acked, timeout, go, counts)
        run.collect("publisher", "connected", publishers, "connect")
        progress.counts = counts
        progress.phase("publishing")
        go.set()
        published = run.collect("publisher", "done", publishers, "finish")
        stop.set()
        if subscribers:
            progress.phase("subscribers receiving the last messages")
        received = run.collect("subscriber", "done", subscribers, "finish")
    except Terminated:
        progress.clear()
        run.close()
        click.echo("stopped by SIGTERM before the run finished: no figures", err=True)
        raise SystemExit(143) from None
    finally:  # Ctrl-C too: BusCli says "interrupted" and exits 130
        progress.clear()
        run.close()
    result = {"topic": data_topic, "producers": producer_ids, "messages": messages, "size": size,
              "publishers": publishers, "subscribers": subscribers, "acked": acked,
              "rate": rate or None,
              "publish": summarize(published, size, "published"),
              "acknowledged": summarize(published, size, "done") if acked else None,
              "subscribe": summarize(received, size, "done") if subscribers else None}
    if subscribers:
        counts = [r["count"] for r in received.values()]
        result["subscribe"]["received_min"] = min(counts)
        result["subscribe"]["messages"] = sum(counts)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        print_bench(result)


def print_bench(result: dict[str, Any]) -> None:
    n, pubs, subs = result["messages"], result["publishers"], result["subscribers"]
    click.echo(f"bench {result['topic']}: {n:,} messages of {result['size']:,} B, "
               f"{pubs} publisher{'s' * (pubs != 1)}, {subs} subscriber{'s' * (subs != 1)}"
               + (", acknowledged" if result["acked"] else "")
               + (f", at {result['rate']:,.0f} msg/s" if result["rate"] else ""))
    rows = [("publish", result["publish"], pubs, "")]
    if result["acknowledged"]:
        rows.append(("acknowledged", result["acknowledged"], pubs,
                     "acknowledgement latency"))
    if result["subscribe"]:
        rows.append(("subscribe", result["subscribe"], subs, "end-to-end latency"))
    for name, stats, clients, latency_name in rows:
        rate = stats["msg_per_s"]
        line = (f"  {name:<13}{rate:>12,.0f} msg/s {stats['mb_per_s']:>9,.2f} MB/s"
                if rate else f"  {name:<13}{'-':>12}")
        per = stats["per_client_msg_per_s"]
        if clients > 1 and per:
            line += f"   (each: min {per['min']:,.0f} avg {per['avg']:,.0f} max {per['max']:,.0f})"
        click.echo(line)
        if name == "subscribe" and stats["received_min"] < n:
            click.echo(f"  {'':<13}a subscriber received only {stats['received_min']:,} of "
                       f"{n:,}: live delivery drops what a subscriber's queue cannot hold "
                       f"(BUS_SUB_HWM) and stops while the proxy does ({SUBSCRIBER_GRACE_S:g} s "
                       "without a message ends a subscriber)")
        lat = stats["latency_ms"]
        if latency_name and lat:
            click.echo(f"  {'':<13}{latency_name}: "
                       + "  ".join(f"{k} {v:,.2f} ms" for k, v in lat.items()))
