"""Each process's HTTP side, opt-in by one setting per process
(`BUS_WRITER_HTTP`, `BUS_PROXY_HTTP`, `BUS_READER_HTTP`, `BUS_ANCHOR_HTTP`:
host:port): `GET /metrics` in Prometheus' text format (prometheus_client),
`GET /healthz`, and pages of JSON a process adds (the writer's /metrics/batch
and /metrics/load, in the origin design's shapes).

The process's loop publishes a snapshot of its `stats` once a second; the
server's threads read only the last one, so a scrape never touches the
loop's sockets or database connection and costs the loop nothing but the
snapshot. A loop that stopped turning shows as a stale snapshot: /healthz
answers 503.
"""

from __future__ import annotations

import bisect
import errno
import json
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily,
                                    HistogramMetricFamily, Metric)

from bus import protocol
from bus.build import build_info
from bus.runner import StartupError

# How often the loop publishes its snapshot, and how old one may get before
# /healthz says the loop is stuck.
SNAPSHOT_INTERVAL_S = 1.0
STALE_AFTER_S = 10.0
# A client that sends nothing for this long is dropped (the server's threads
# are one per connection).
CLIENT_TIMEOUT_S = 5.0
# Scrapers and health checks served at once (a thread and a descriptor each);
# a connection above that is closed at once.
MAX_CLIENTS = 16
# How long the server waits after an accept failed for want of a descriptor.
ACCEPT_RETRY_S = 0.1

Stats = dict[str, Any]


@dataclass(frozen=True)
class Series:
    """One metric read from a stats snapshot: `read(stats)` is a number, or
    {label value: number} for a metric with one label."""
    name: str
    kind: str  # "counter" | "gauge"
    help: str
    read: Callable[[Stats], Any]
    label: str | None = None


def control_series() -> list[Series]:
    """The control endpoint's counters, the same in every process (bus/control.py)."""
    return [
        Series("control_requests", "counter", "control requests answered",
               lambda s: s["control"]["requests"]),
        Series("control_bad_requests", "counter", "control requests refused as malformed "
               "or unknown", lambda s: s["control"]["bad_requests"]),
        Series("control_forbidden", "counter", "control requests refused to their CURVE key",
               lambda s: s["control"]["forbidden"]),
        Series("control_internal_errors", "counter", "control requests that failed on a bug",
               lambda s: s["control"]["internal_errors"]),
        Series("control_failed", "counter", "control requests refused for another reason",
               lambda s: s["control"]["failed"], "code"),
        Series("control_unenveloped", "counter", "control messages without a REQ envelope "
               "(no empty delimiter frame), answered bad_request",
               lambda s: s["control"]["unenveloped"]),
    ]


def connection_series() -> list[Series]:
    """Each bound endpoint's connections (BUS_MAX_CONNECTIONS, bus/sockets.Connections),
    the same in every process: stats' `connections`, by endpoint."""
    def by_endpoint(key: str) -> Callable[[Stats], dict[str, int]]:
        return lambda s: {name: counts[key] for name, counts in s["connections"].items()}
    return [
        Series("connections_open", "gauge", "connections open on a bound endpoint",
               by_endpoint("open"), "endpoint"),
        Series("connections_refused", "counter", "connections cut at once: over "
               "BUS_MAX_CONNECTIONS on their endpoint", by_endpoint("refused"), "endpoint"),
    ]


class Buckets:
    """A histogram the loop fills without a lock (one bisect and two adds per
    observation; prometheus_client's Histogram takes a lock and walks its
    buckets): `HttpSide.collect` exposes it as a Prometheus histogram. Read
    from the server's thread while the loop writes, a scrape may see one
    observation in the count and not yet in its bucket: off by one, once."""

    def __init__(self, name: str, help: str, bounds: Iterable[float]) -> None:  # noqa: A002
        self.name = name
        self.help = help
        self.bounds = sorted(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, process: str) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            total += count
            cumulative.append((bound, total))
        return HistogramMetricFamily(f"bus_{process}_{self.name}", self.help,
                                     buckets=cumulative, sum_value=self.sum)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread a connection, at most MAX_CLIENTS at once: a client above
    that is closed at once (`refused`), so idle connections cannot take the
    process's descriptors or threads. An accept that fails for want of a
    descriptor (EMFILE) is counted and waited out, not retried in a busy loop."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64  # listen(2)'s backlog: socketserver's 5 dropped bursts' SYNs

    def server_activate(self) -> None:
        self.active = 0
        self.refused = 0
        self.accept_failures = 0
        self.client_errors = 0
        self._count_lock = threading.Lock()
        super().server_activate()

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as exc:  # the caller (serve_forever) skips this accept
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.accept_failures += 1
                time.sleep(ACCEPT_RETRY_S)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            if self.active >= MAX_CLIENTS:
                self.refused += 1
                self.shutdown_request(request)
                return
            self.active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (none to spare): it ends nothing
            with self._count_lock:
                self.active -= 1
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that sent no request within CLIENT_TIMEOUT_S, or went away:
        counted, not a traceback on stderr for each (idle connections would
        flood the journal)."""
        if isinstance(sys.exc_info()[1], OSError):
            self.client_errors += 1
            return
        super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self.active -= 1


class _QuietHandler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        pass  # scrapes every few seconds would flood the journal


class HttpSide:
    """The HTTP server of one process (see the module's doc)."""

    def __init__(self, process: str, address: str, series: Iterable[Series],
                 health: Callable[[Stats], str | None],
                 pages: dict[str, Callable[[Stats], Any]] | None = None) -> None:
        self.process = process
        self.series = list(series)
        self.histograms: list[Buckets] = []
        self.health = health
        self.pages = pages or {}
        self._snapshot: Stats | None = None
        self._snapshot_at = 0.0
        self._next_publish = 0.0
        self.registry = CollectorRegistry()
        self.registry.register(self)
        ProcessCollector(registry=self.registry)
        self._metrics_app = make_wsgi_app(self.registry)
        host, _, port = address.rpartition(":")
        try:
            self._server = make_server(host.strip("[]"), int(port), self._app,
                                       server_class=_Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise StartupError(f"HTTP {address}: {exc.strerror or exc}") from None
        self.address = f"{host}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        daemon=True)
        self._thread.start()

    # --- the loop's side --------------------------------------------------------

    def histogram(self, name: str, help: str, bounds: Iterable[float]) -> Buckets:  # noqa: A002
        buckets = Buckets(name, help, bounds)
        self.histograms.append(buckets)
        return buckets

    def due(self, now: float) -> bool:
        return now >= self._next_publish

    def publish(self, snapshot: Stats, now: float) -> None:
        self._snapshot, self._snapshot_at = snapshot, now
        self._next_publish = now + SNAPSHOT_INTERVAL_S

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the server's side ------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector hook: the metrics of the last snapshot."""
        for histogram in self.histograms:
            yield histogram.family(self.process)
        yield CounterMetricFamily(f"bus_{self.process}_http_refused", "HTTP connections "
                                  f"closed at once: {MAX_CLIENTS} served already",
                                  value=self._server.refused)
        yield CounterMetricFamily(f"bus_{self.process}_http_accept_failures", "HTTP accepts "
                                  "that failed for want of a descriptor (EMFILE)",
                                  value=self._server.accept_failures)
        # Which code this process runs (bus/build.py), as Prometheus' own
        # *_build_info: value 1, the versions as labels.
        yield InfoMetricFamily("bus_build", "the version and revision this process runs, and "
                               "its Python's, pyzmq's and libzmq's",
                               value={"process": self.process, **build_info()})
        stats = self._snapshot
        if stats is None:
            return
        for series in self.series:
            try:
                value = series.read(stats)
            except (KeyError, TypeError):
                continue  # not in this snapshot (a section the process has not filled yet)
            if value is None:
                continue
            name = f"bus_{self.process}_{series.name}"
            family_type = CounterMetricFamily if series.kind == "counter" else GaugeMetricFamily
            if series.label is None:
                yield family_type(name, series.help, value=value)
                continue
            family = family_type(name, series.help, labels=[series.label])
            for label_value, number in value.items():
                family.add_metric([str(label_value)], number)
            yield family

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json(start_response, "405 Method Not Allowed", {"error": "GET only"})
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            reason = self._unhealthy()
            if reason is not None:
                return _json(start_response, "503 Service Unavailable",
                             {"status": protocol.UNAVAILABLE, "reason": reason})
            return _json(start_response, "200 OK", {"status": "ok"})
        page = self.pages.get(path)
        if page is not None and self._snapshot is not None:
            return _json(start_response, "200 OK", page(self._snapshot))
        return _json(start_response, "404 Not Found",
                     {"error": f"no page {path}", "pages": ["/metrics", "/healthz",
                                                            *self.pages]})

    def _unhealthy(self) -> str | None:
        if self._snapshot is None:
            return "starting"
        age = time.monotonic() - self._snapshot_at
        if age > STALE_AFTER_S:
            return f"the {self.process}'s loop has not turned for {age:.0f} s"
        return self.health(self._snapshot)


def _json(start_response: Callable[..., Any], status: str, body: Any) -> list[bytes]:
    data = json.dumps(body, default=str).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(data)))])
    return [data]
