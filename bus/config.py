"""Every setting of every bus process, defined once.

Values flow one way: defaults < config file < environment < command-line flags.
`load_config` builds one frozen `BusConfig`; no other module reads the
environment. The config file is TOML whose keys are the environment variable
names (`BATCH_SIZE = 500`), so one name means one setting everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus import pgurl

DEFAULT_CONFIG_PATH = Path("/etc/bus/bus.toml")
CONFIG_PATH_ENV = "BUS_CONFIG"


# On stop, the proxy and the writer forward/store until quiet for drain_idle_ms,
# but for at most this many such periods: under steady load it is never quiet,
# and what stays queued is not lost (see docs/architecture.md, "Shutdown").
DRAIN_WINDOW_IDLES = 5


class ConfigError(ValueError):
    """A setting has a value of the wrong type or out of range; `field` names it
    when one setting is at fault (load_config then says where its value came
    from: a flag, the environment, the config file)."""

    def __init__(self, message: str, field: str | None = None,
                 others: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.others = others  # the other settings of a pair that cannot work together


def _invalid(name: str, problem: str) -> ConfigError:
    return ConfigError(f"{_BY_FIELD[name].env} {problem}", name)


def _conflict(names: tuple[str, ...], problem: str) -> ConfigError:
    """Settings that each have a valid value but cannot work together."""
    return ConfigError(problem, names[0], names[1:])


# A ZeroMQ endpoint the bus binds or connects: tcp://HOST:PORT (HOST may be *
# or [IPv6] to bind), ipc://PATH (@NAME: abstract), inproc://NAME.
_ENDPOINT = re.compile(r"(tcp://(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})"
                       r"|ipc://\S+|inproc://\S+)")


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    type: type
    default: Any
    help: str


# The one table of settings. Endpoint defaults stay on loopback: exposing the
# bus beyond the host is an explicit decision (`tcp://*:5550`).
SETTINGS: tuple[Setting, ...] = (
    Setting("pub_endpoint", "BUS_PUB_ENDPOINT", str, "tcp://127.0.0.1:5550",
            "proxy SUB; publishers connect here"),
    Setting("sub_endpoint", "BUS_SUB_ENDPOINT", str, "tcp://127.0.0.1:5551",
            "proxy PUB; subscribers connect here"),
    Setting("capture_endpoint", "BUS_CAPTURE_ENDPOINT", str, "tcp://127.0.0.1:5552",
            "writer PULL (bound); the proxy's capture PUSH connects here"),
    Setting("control_endpoint", "BUS_CONTROL_ENDPOINT", str, "tcp://127.0.0.1:5553",
            "writer REP for trusted commands (stats, flush)"),
    Setting("proxy_control_endpoint", "BUS_PROXY_CONTROL_ENDPOINT", str, "tcp://127.0.0.1:5554",
            "proxy REP for stats"),
    Setting("read_endpoint", "BUS_READ_ENDPOINT", str, "tcp://127.0.0.1:5555",
            "reader REP: history pages from a read-only connection"),
    Setting("notify_endpoint", "BUS_NOTIFY_ENDPOINT", str, "tcp://127.0.0.1:5556",
            "writer XPUB: $bus.ack/nack/commit notifications; only the writer sends there"),
    Setting("anchor_control_endpoint", "BUS_ANCHOR_CONTROL_ENDPOINT", str,
            "tcp://127.0.0.1:5557", "anchor worker REP: ping, stats"),
    Setting("writer_http", "BUS_WRITER_HTTP", str, "",
            "host:port of the writer's HTTP side: /metrics, /metrics/batch, /metrics/load, "
            "/healthz (empty: off)"),
    Setting("proxy_http", "BUS_PROXY_HTTP", str, "", "host:port of the proxy's /metrics, "
            "/healthz (empty: off)"),
    Setting("reader_http", "BUS_READER_HTTP", str, "", "host:port of the reader's /metrics, "
            "/healthz (empty: off)"),
    Setting("anchor_http", "BUS_ANCHOR_HTTP", str, "", "host:port of the anchor worker's "
            "/metrics, /healthz (empty: off)"),
    Setting("curve_dir", "BUS_CURVE_DIR", str, "",
            "CURVE key directory (server.key, proxy.key, publishers/ readers/ admins/); "
            "empty: no authentication"),
    Setting("curve_key", "BUS_CURVE_KEY", str, "",
            "this client's secret CURVE certificate (NAME.key_secret), with BUS_CURVE_DIR"),
    Setting("db", "BUS_DB", str, "bus.db", "SQLite database file (the writer creates it), or "
            "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"),
    Setting("batch_write_enabled", "BATCH_WRITE_ENABLED", bool, True,
            "false: one transaction per message (debug / comparison)"),
    Setting("batch_size", "BATCH_SIZE", int, 100, "rows per transaction when flushing by size"),
    Setting("batch_flush_interval_ms", "BATCH_FLUSH_INTERVAL_MS", int, 50,
            "oldest buffered row waits at most this long"),
    Setting("batch_max_buffer_size", "BATCH_MAX_BUFFER_SIZE", int, 10000,
            "rows held when flushes fail; the writer stops reading at this size"),
    Setting("batch_max_buffer_bytes", "BATCH_MAX_BUFFER_BYTES", int, 64 << 20,
            "bytes of messages held when flushes fail; the writer stops reading at this "
            "size too"),
    Setting("batch_low_load_threshold", "BATCH_LOW_LOAD_THRESHOLD", float, 100.0,
            "below this many messages/s the writer flushes as soon as it is idle"),
    Setting("batch_load_window_seconds", "BATCH_LOAD_WINDOW_SECONDS", float, 2.0,
            "window over which requests_per_second is measured"),
    Setting("sqlite_synchronous", "BUS_SQLITE_SYNCHRONOUS", str, "NORMAL",
            "NORMAL (survives process crashes) or FULL (also power loss)"),
    Setting("sqlite_busy_timeout_ms", "BUS_SQLITE_BUSY_TIMEOUT_MS", int, 200,
            "a commit waits this long for a lock held by another process, then "
            "keeps its rows and retries in 0.5 s (the writer answers requests meanwhile)"),
    Setting("retention_max_age_s", "BUS_RETENTION_MAX_AGE_S", float, 0.0,
            "delete messages committed longer ago than this (0: keep)"),
    Setting("retention_max_messages", "BUS_RETENTION_MAX_MESSAGES", int, 0,
            "keep at most this many messages, deleting the oldest (0: no limit)"),
    Setting("retention_chunk_rows", "BUS_RETENTION_CHUNK_ROWS", int, 2000,
            "rows deleted per retention transaction (bounds the stall of ingest)"),
    Setting("max_consumers", "BUS_MAX_CONSUMERS", int, 10_000,
            "durable consumer positions the writer keeps"),
    Setting("max_consumers_per_key", "BUS_MAX_CONSUMERS_PER_KEY", int, 1000,
            "(CURVE) durable consumers one key may own (0: BUS_MAX_CONSUMERS alone)"),
    Setting("max_producers_per_key", "BUS_MAX_PRODUCERS_PER_KEY", int, 1000,
            "(CURVE) producer ids one key may own (0: no limit); `bus-cli producers rm` "
            "frees one"),
    Setting("max_requests_per_key_s", "BUS_MAX_REQUESTS_PER_KEY_S", int, 1000,
            "(CURVE) control requests a second one key may send the writer, a second's worth "
            "at once (0: no limit)"),
    Setting("utxo_max_lease_s", "BUS_UTXO_MAX_LEASE_S", float, 3600.0,
            "longest lease a UTXO reservation or renewal may ask for"),
    Setting("utxo_request_ttl_s", "BUS_UTXO_REQUEST_TTL_S", float, 3600.0,
            "how long the writer keeps each utxo_* reply for retries of its request id"),
    Setting("bitcoind_rpc_url", "BUS_BITCOIND_RPC_URL", str, "http://127.0.0.1:8332",
            "bitcoind JSON-RPC (add /wallet/NAME for a named wallet)"),
    Setting("bitcoind_rpc_user", "BUS_BITCOIND_RPC_USER", str, "", "RPC user (rpcauth)"),
    Setting("bitcoind_rpc_password", "BUS_BITCOIND_RPC_PASSWORD", str, "", "RPC password"),
    Setting("bitcoind_rpc_cookie", "BUS_BITCOIND_RPC_COOKIE", str, "",
            "bitcoind's .cookie file, instead of user and password"),
    Setting("bitcoind_zmq_hashblock", "BUS_BITCOIND_ZMQ_HASHBLOCK", str, "",
            "bitcoind's -zmqpubhashblock endpoint (empty: learn blocks by polling only)"),
    Setting("anchor_block_poll_s", "BUS_ANCHOR_BLOCK_POLL_S", float, 30.0,
            "ask bitcoind for its best block this often (the fallback for ZMQ)"),
    Setting("anchor_interval_s", "BUS_ANCHOR_INTERVAL_S", float, 60.0,
            "anchor the collected documents this long after the first arrived"),
    Setting("anchor_max_documents", "BUS_ANCHOR_MAX_DOCUMENTS", int, 10_000,
            "documents per anchor transaction (anchored at once when reached; at most "
            "49,990: one anchor_record request)"),
    Setting("anchor_fee_rate_sat_vb", "BUS_ANCHOR_FEE_RATE_SAT_VB", float, 0.0,
            "fee rate of anchor transactions (0: bitcoind's estimatesmartfee)"),
    Setting("anchor_fallback_fee_rate_sat_vb", "BUS_ANCHOR_FALLBACK_FEE_RATE_SAT_VB", float, 5.0,
            "fee rate when estimatesmartfee has no estimate"),
    Setting("anchor_max_fee_rate_sat_vb", "BUS_ANCHOR_MAX_FEE_RATE_SAT_VB", float, 200.0,
            "no anchor transaction, or fee bump, pays more than this"),
    Setting("anchor_conf_target", "BUS_ANCHOR_CONF_TARGET", int, 6,
            "estimatesmartfee's confirmation target, in blocks"),
    Setting("anchor_confirmations", "BUS_ANCHOR_CONFIRMATIONS", int, 3,
            "anchor.confirmed is published after this many confirmations"),
    Setting("anchor_bump_after_blocks", "BUS_ANCHOR_BUMP_AFTER_BLOCKS", int, 3,
            "an anchor transaction not mined after this many blocks is fee-bumped (RBF)"),
    Setting("anchor_lease_s", "BUS_ANCHOR_LEASE_S", float, 600.0,
            "lease of the UTXO reserved for an anchoring (renewed while it is built; at most "
            "BUS_UTXO_MAX_LEASE_S)"),
    Setting("anchor_utxo_min_confirmations", "BUS_ANCHOR_UTXO_MIN_CONFIRMATIONS", int, 1,
            "an anchoring spends only UTXOs with this many confirmations"),
    Setting("anchor_consumer", "BUS_ANCHOR_CONSUMER", str, "anchor",
            "durable consumer name under which anchor.request messages are read"),
    Setting("anchor_sync_page", "BUS_ANCHOR_SYNC_PAGE", int, 1000,
            "most wallet outputs the wallet sync holds at once (one listunspent page)"),
    Setting("anchor_retry_max_s", "BUS_ANCHOR_RETRY_MAX_S", float, 30.0,
            "longest wait between retries when bitcoind or the writer is unavailable"),
    Setting("audit_prefixes", "BUS_AUDIT_PREFIXES", str, "",
            "sealed topic prefixes, comma-separated (docs/protocol.md, \"Audit seals\"): the "
            "anchor worker seals their stored messages; retention keeps the unsealed ones"),
    Setting("audit_interval_s", "BUS_AUDIT_INTERVAL_S", float, 60.0,
            "the anchor worker seals what was stored since the last seal this often"),
    Setting("audit_max_messages", "BUS_AUDIT_MAX_MESSAGES", int, 262_144,
            "most messages in one seal (a longer backlog is sealed in several)"),
    Setting("audit_max_rate", "BUS_AUDIT_MAX_RATE", float, 20_000.0,
            "most messages a second the anchor worker seals (its share of the machine)"),
    Setting("history_page_rows", "BUS_HISTORY_PAGE_ROWS", int, 5000,
            "most messages in one history page"),
    Setting("history_page_bytes", "BUS_HISTORY_PAGE_BYTES", int, 4 << 20,
            "a history page stops growing past this many payload+meta bytes"),
    Setting("history_scan_rows", "BUS_HISTORY_SCAN_ROWS", int, 200_000,
            "rows one history request examines for a topic filter, at most"),
    Setting("capture_hwm", "BUS_CAPTURE_HWM", int, 1_000,
            "messages the proxy queues for a stopped or slow writer; past that they wait in "
            "each publisher's pipe, served in turn (a flood delays the others by at most "
            "this queue)"),
    Setting("capture_hwm_writer_down", "BUS_CAPTURE_HWM_WRITER_DOWN", int, 1_000_000,
            "messages the proxy holds itself while no writer is connected (a restart): "
            "live delivery goes on, and the writer gets them in order once it is back"),
    Setting("capture_buffer_bytes", "BUS_CAPTURE_BUFFER_BYTES", int, 16 << 10,
            "the kernel's socket buffer at each end of the capture connection, part of that "
            "same queue: more is a little more throughput at full load, less fairness"),
    Setting("sub_hwm", "BUS_SUB_HWM", int, 100_000,
            "messages the proxy queues per subscriber before dropping for it"),
    Setting("pub_hwm", "BUS_PUB_HWM", int, 100_000,
            "messages queued in the proxy per publisher and in each Publisher"),
    Setting("max_topic_bytes", "BUS_MAX_TOPIC_BYTES", int, 256, "longest topic stored (at "
            "most 65,000, and BUS_MAX_MESSAGE_BYTES - 1024: room for a session's meta)"),
    Setting("max_message_bytes", "BUS_MAX_MESSAGE_BYTES", int, 1_048_576,
            "largest message (all frames) stored (at most BUS_PROXY_MAX_FRAME_BYTES, less 33 "
            "with CURVE)"),
    Setting("proxy_max_frame_bytes", "BUS_PROXY_MAX_FRAME_BYTES", int, 16_777_216,
            "the proxy disconnects a peer sending a larger frame (memory guard; at least "
            "BUS_MAX_MESSAGE_BYTES, + 33 with CURVE)"),
    Setting("proxy_memory_limit_bytes", "BUS_PROXY_MEMORY_LIMIT_BYTES", int, 1 << 30,
            "over this RSS the proxy stops forwarding and cuts off the side that holds "
            "the memory, until it is back under (0: off; else at least 96 MiB + "
            "BUS_MAX_MESSAGE_BYTES)"),
    Setting("proxy_subscription_bytes_per_connection",
            "BUS_PROXY_SUBSCRIPTION_BYTES_PER_CONNECTION", int, 64 << 10,
            "the proxy cuts off a subscriber connection that sent more (its subscriptions, "
            "as bytes on the wire; 0: no budget)"),
    Setting("proxy_subscription_bytes", "BUS_PROXY_SUBSCRIPTION_BYTES", int, 1 << 20,
            "what all subscriber connections may have sent together; over it the proxy cuts "
            "off the connection that sent most (0: no budget)"),
    Setting("reader_memory_limit_bytes", "BUS_READER_MEMORY_LIMIT_BYTES", int, 128 << 20,
            "over this RSS the reader drops its clients' connections (an endless request; 0: "
            "off; else at least 96 MiB + BUS_HISTORY_PAGE_BYTES + BUS_MAX_MESSAGE_BYTES)"),
    Setting("anchor_memory_limit_bytes", "BUS_ANCHOR_MEMORY_LIMIT_BYTES", int, 128 << 20,
            "over this RSS the anchor worker drops its control clients' connections (0: off)"),
    Setting("writer_memory_limit_bytes", "BUS_WRITER_MEMORY_LIMIT_BYTES", int, 384 << 20,
            "over this RSS the writer drops its capture and notify connections and what "
            "they queued (nothing acknowledged; 0: off; else at least 96 MiB + "
            "BUS_MAX_MESSAGE_BYTES)"),
    Setting("max_connections", "BUS_MAX_CONNECTIONS", int, 1024,
            "connections each bound endpoint of a process keeps open; the newest above it "
            "is cut at once and counted. A process needs twice this a bound endpoint + 64 "
            "open files (the units' LimitNOFILE=); under a lower limit it lowers this to fit "
            "and says so"),
    Setting("shutdown_timeout_ms", "BUS_SHUTDOWN_TIMEOUT_MS", int, 10_000,
            "longest a process spends draining and flushing when stopped"),
    Setting("drain_idle_ms", "BUS_DRAIN_IDLE_MS", int, 200,
            "on stop, proxy and writer keep forwarding/storing until quiet this long "
            "(for at most 5 such periods)"),
    Setting("request_timeout_ms", "BUS_REQUEST_TIMEOUT_MS", int, 3000,
            "client wait for a control reply or for the proxy's subscription"),
    Setting("log_level", "BUS_LOG_LEVEL", str, "info", "debug, info, warning, error"),
    Setting("log_format", "BUS_LOG_FORMAT", str, "auto",
            "auto (JSON unless stderr is a terminal), json, console"),
)

_BY_FIELD = {s.field: s for s in SETTINGS}
# Never shown in stats or logs.
SECRET_FIELDS = ("bitcoind_rpc_password",)
_BY_ENV = {s.env: s for s in SETTINGS}


# A process's memory limit must leave room for the process itself (40-60 MB).
MEMORY_LIMIT_MIN = 96 << 20
# What libzmq's CURVE adds to each frame on the wire (its MESSAGE command: an
# 8-byte name, an 8-byte nonce, a 16-byte MAC and a flags byte), which the
# proxy's BUS_PROXY_MAX_FRAME_BYTES (libzmq's MAXMSGSIZE) counts too.
CURVE_FRAME_OVERHEAD_BYTES = 33
# A producer session's meta at most, without content_type and headers: the
# longest producer id (128 characters of up to 4 UTF-8 bytes), epoch, seq,
# time_ns, ack and the session MAC take about 600 bytes.
SESSION_META_MAX_BYTES = 1024
# The longest topic limit: a history request naming one such topic must fit
# in the reader's 64 KiB request frame (bus/sockets.MAX_SMALL_REQUEST_BYTES).
TOPIC_BYTES_MAX = 65_000
# The most documents one anchor_record can carry: one array each, and the
# writer decodes at most protocol.MAX_REQUEST_CONTAINERS (50,000) maps and
# arrays a request (the request, its args, the document list, the change).
ANCHOR_DOCUMENTS_MAX = 49_990


@dataclass(frozen=True)
class BusConfig:
    pub_endpoint: str
    sub_endpoint: str
    capture_endpoint: str
    control_endpoint: str
    proxy_control_endpoint: str
    read_endpoint: str
    notify_endpoint: str
    anchor_control_endpoint: str
    writer_http: str
    proxy_http: str
    reader_http: str
    anchor_http: str
    curve_dir: str
    curve_key: str
    db: str
    batch_write_enabled: bool
    batch_size: int
    batch_flush_interval_ms: int
    batch_max_buffer_size: int
    batch_max_buffer_bytes: int
    batch_low_load_threshold: float
    batch_load_window_seconds: float
    sqlite_synchronous: str
    sqlite_busy_timeout_ms: int
    retention_max_age_s: float
    retention_max_messages: int
    retention_chunk_rows: int
    max_consumers: int
    max_consumers_per_key: int
    max_producers_per_key: int
    max_requests_per_key_s: int
    utxo_max_lease_s: float
    utxo_request_ttl_s: float
    bitcoind_rpc_url: str
    bitcoind_rpc_user: str
    bitcoind_rpc_password: str
    bitcoind_rpc_cookie: str
    bitcoind_zmq_hashblock: str
    anchor_block_poll_s: float
    anchor_interval_s: float
    anchor_max_documents: int
    anchor_fee_rate_sat_vb: float
    anchor_fallback_fee_rate_sat_vb: float
    anchor_max_fee_rate_sat_vb: float
    anchor_conf_target: int
    anchor_confirmations: int
    anchor_bump_after_blocks: int
    anchor_lease_s: float
    anchor_utxo_min_confirmations: int
    anchor_consumer: str
    anchor_sync_page: int
    anchor_retry_max_s: float
    audit_prefixes: str
    audit_interval_s: float
    audit_max_messages: int
    audit_max_rate: float
    history_page_rows: int
    history_page_bytes: int
    history_scan_rows: int
    capture_hwm: int
    capture_buffer_bytes: int
    capture_hwm_writer_down: int
    sub_hwm: int
    pub_hwm: int
    max_topic_bytes: int
    max_message_bytes: int
    proxy_max_frame_bytes: int
    proxy_memory_limit_bytes: int
    proxy_subscription_bytes_per_connection: int
    proxy_subscription_bytes: int
    writer_memory_limit_bytes: int
    reader_memory_limit_bytes: int
    anchor_memory_limit_bytes: int
    max_connections: int
    shutdown_timeout_ms: int
    drain_idle_ms: int
    request_timeout_ms: int
    log_level: str
    log_format: str
    source: str = "defaults"
    # Where each setting's value came from ("default", "flag --db", "environment
    # BUS_DB", "config file /etc/bus/bus.toml"): `bus-cli config`, error messages.
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False,
                                                   repr=False)

    def __post_init__(self) -> None:
        for setting in SETTINGS:  # what C ints (libzmq options, poll timeouts) can hold
            limit = 2**62 if setting.field.endswith("_bytes") else 2**31 - 1
            if setting.type in (int, float) and abs(getattr(self, setting.field)) > limit:
                raise _invalid(setting.field, f"must be at most {limit}")
        for name in (s.field for s in SETTINGS if s.field.endswith("_endpoint")):
            value = getattr(self, name)
            match = _ENDPOINT.fullmatch(value)
            if match is None:
                raise _invalid(name, f"must be tcp://HOST:PORT, ipc://PATH or inproc://NAME, "
                                     f"not {value!r}")
            if match.group(3) and not 0 < int(match.group(3)) <= 65535:
                raise _invalid(name, f"has port {match.group(3)}: ports are 1-65535")
        for name in ("batch_size", "batch_max_buffer_size", "batch_max_buffer_bytes",
                     "max_topic_bytes", "max_message_bytes", "capture_hwm", "sub_hwm", "pub_hwm",
                     "retention_chunk_rows", "max_consumers", "history_page_rows",
                     "history_page_bytes", "history_scan_rows", "anchor_max_documents",
                     "anchor_confirmations", "anchor_bump_after_blocks", "anchor_sync_page",
                     "anchor_conf_target", "request_timeout_ms", "drain_idle_ms",
                     "proxy_max_frame_bytes", "audit_max_messages", "max_connections",
                     "capture_buffer_bytes", "capture_hwm_writer_down"):
            if getattr(self, name) < 1:
                raise _invalid(name, "must be at least 1")
        for name in ("batch_flush_interval_ms", "retention_max_age_s", "retention_max_messages",
                     "shutdown_timeout_ms", "sqlite_busy_timeout_ms",
                     "anchor_utxo_min_confirmations", "anchor_fee_rate_sat_vb",
                     "max_consumers_per_key", "max_producers_per_key", "max_requests_per_key_s",
                     "proxy_subscription_bytes_per_connection", "proxy_subscription_bytes"):
            if getattr(self, name) < 0:
                raise _invalid(name, "must not be negative" + (
                    " (0 turns the limit off)" if name.startswith(("retention", "max_",
                                                                   "proxy_subscription")) else
                    " (0: estimate)" if name == "anchor_fee_rate_sat_vb" else ""))
        if self.batch_size > self.batch_max_buffer_size:
            raise _invalid("batch_size", "must not exceed BATCH_MAX_BUFFER_SIZE")
        for name in ("utxo_max_lease_s", "utxo_request_ttl_s", "anchor_block_poll_s",
                     "anchor_interval_s", "anchor_lease_s", "anchor_retry_max_s",
                     "audit_interval_s", "audit_max_rate",
                     "anchor_fallback_fee_rate_sat_vb", "anchor_max_fee_rate_sat_vb",
                     "batch_load_window_seconds"):
            if getattr(self, name) <= 0:
                raise _invalid(name, "must be positive")
        for name in ("writer_http", "proxy_http", "reader_http", "anchor_http"):
            address = getattr(self, name)
            host, colon, port = address.rpartition(":")
            if address and not (colon and host and port.isdigit() and 0 <= int(port) <= 65535):
                raise _invalid(name, f"must be host:port (127.0.0.1:9101; port 0: any free "
                                     f"one), not {address!r}")
        for name in ("proxy_memory_limit_bytes", "writer_memory_limit_bytes",
                     "reader_memory_limit_bytes", "anchor_memory_limit_bytes"):
            if getattr(self, name) and getattr(self, name) < MEMORY_LIMIT_MIN:
                raise _invalid(name, f"must be 0 (off) or at least {MEMORY_LIMIT_MIN} (the "
                                     "process alone takes 40-60 MB)")
        if any(not p.strip() or "\x00" in p or "\n" in p for p in self.audit_prefixes.split(",")
               ) and self.audit_prefixes:
            raise _invalid("audit_prefixes", "must be topic prefixes separated by commas, none "
                                             "empty")
        if self.capture_buffer_bytes > 2**31 - 1:  # SO_SNDBUF/SO_RCVBUF are C ints
            raise _invalid("capture_buffer_bytes", f"must be at most {2**31 - 1}")
        if (problem := database_problem(self.db)) is not None:
            raise _invalid("db", problem)
        for name, most, why in (
                ("max_topic_bytes", TOPIC_BYTES_MAX, "a history request naming one such "
                 "topic must fit in the reader's 64 KiB request frame"),
                ("anchor_max_documents", ANCHOR_DOCUMENTS_MAX, "one anchor_record request "
                 "holds an array per document, and the writer takes at most 50,000 maps and "
                 "arrays a request")):
            if getattr(self, name) > most:
                raise _invalid(name, f"must be at most {most:,}: {why}")
        self._check_together()
        for name, allowed in (("sqlite_synchronous", ("NORMAL", "FULL", "EXTRA", "OFF")),
                              ("log_format", ("auto", "json", "console")),
                              ("log_level", ("debug", "info", "warning", "error"))):
            if getattr(self, name) not in allowed:
                raise _invalid(name, f"must be one of {', '.join(allowed)}, not "
                                     f"{getattr(self, name)!r}")

    def _check_together(self) -> None:
        """Refuse settings that are each valid but cannot work together: the
        bus would accept something it then cannot deliver, store or serve."""
        curve = CURVE_FRAME_OVERHEAD_BYTES if self.curve_dir else 0
        if self.max_message_bytes + curve > self.proxy_max_frame_bytes:
            raise _conflict(("max_message_bytes", "proxy_max_frame_bytes"), (
                f"BUS_MAX_MESSAGE_BYTES ({self.max_message_bytes}) must not exceed "
                f"BUS_PROXY_MAX_FRAME_BYTES ({self.proxy_max_frame_bytes})"
                + (f" less {curve} (CURVE's framing, with BUS_CURVE_DIR)" if curve else "")
                + ": the proxy drops the connection of a publisher sending a larger frame, "
                "so a message within the limit would get no nack and stall its acks"))
        if self.max_topic_bytes + SESSION_META_MAX_BYTES > self.max_message_bytes:
            raise _conflict(("max_topic_bytes", "max_message_bytes"), (
                f"BUS_MAX_TOPIC_BYTES ({self.max_topic_bytes}) + {SESSION_META_MAX_BYTES} (a "
                f"producer session's meta) must not exceed BUS_MAX_MESSAGE_BYTES "
                f"({self.max_message_bytes}): a message on a topic of the limit could not "
                "be stored"))
        held = {"proxy": (("max_message_bytes",), "one message makes it close the "
                          "publishers' side, and the publisher re-sends it for good"),
                "writer": (("max_message_bytes",), "one message makes it drop its capture "
                           "connection, and the publisher re-sends it for good"),
                "reader": (("history_page_bytes", "max_message_bytes"),
                           "a history page makes it drop the connection it answers, and the "
                           "client asks again for good")}
        for process, (sizes, why) in held.items():
            name = f"{process}_memory_limit_bytes"
            limit, need = getattr(self, name), MEMORY_LIMIT_MIN + sum(
                getattr(self, size) for size in sizes)
            if limit and limit < need:
                raise _conflict((name, *sizes), (
                    f"{_BY_FIELD[name].env} ({limit}) must be 0 (off) or at least {need}: "
                    f"{MEMORY_LIMIT_MIN} (the process) + "
                    + " + ".join(f"{_BY_FIELD[size].env} ({getattr(self, size)})"
                                 for size in sizes) + f"; {why}"))
        if self.anchor_lease_s > self.utxo_max_lease_s:
            raise _conflict(("anchor_lease_s", "utxo_max_lease_s"), (
                f"BUS_ANCHOR_LEASE_S ({self.anchor_lease_s:g}) must not exceed "
                f"BUS_UTXO_MAX_LEASE_S ({self.utxo_max_lease_s:g}): the writer refuses a "
                "longer lease, so no anchoring could reserve its UTXO"))

    @property
    def sealed_prefixes(self) -> list[str]:
        """BUS_AUDIT_PREFIXES as a list (empty: nothing is sealed)."""
        return [p.strip() for p in self.audit_prefixes.split(",") if p.strip()]

    def public(self) -> dict[str, Any]:
        """The settings as their environment names, for stats and start-up logs;
        secrets show as "***" when set, and so does a password in a URL."""
        return {s.env: "***" if s.field in SECRET_FIELDS and getattr(self, s.field)
                else redact_url(v) if isinstance(v := getattr(self, s.field), str)
                else v for s in SETTINGS}


def database_problem(db: str) -> str | None:
    """Why `db` names no database the bus can open (a libpq keyword string,
    another scheme's URL), or None: a postgresql:// URL or a SQLite path. Any
    other text would be taken as a file name and a new SQLite file created."""
    if db.startswith(("postgresql://", "postgres://", "sqlite:///")):
        return None
    if not db.strip():
        return "must name a database: a SQLite file or a postgresql:// URL"
    if re.match(r"\s*[A-Za-z_]+\s*=", db):  # not echoed: it may hold password=...
        return ("looks like a libpq keyword string (host=... dbname=...): write it as a URL, "
                "postgresql://USER@HOST:PORT/DBNAME")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", db):
        return (f"{redact_url(db)!r}: only postgresql:// URLs and SQLite files (a path, or "
                "sqlite:///PATH) are supported")
    return None


def redact_url(value: str) -> str:
    """A setting's value as logs, stats and errors may show it. A postgresql://
    URL as libpq reads it, with every option libpq keeps secret hidden (bus/
    pgurl.py: libpq decodes ?pass%77ord= and takes sslpassword=, which no
    pattern here would know); another URL without its password (user:PASSWORD@
    and ?password=, whatever the password holds); anything else as it is."""
    if value.startswith(pgurl.SCHEMES):
        return pgurl.redact(value)
    if "://" not in value:
        return value
    scheme, _, rest = value.partition("://")
    if "@" in rest:  # the user info ends at the last '@'
        userinfo, _, host = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        rest = f"{user}:***@{host}" if colon else rest
    rest = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", rest)
    return f"{scheme}://{rest}"


def _coerce(setting: Setting, value: Any) -> Any:
    if setting.type is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{setting.env}: expected true/false, got {value!r}", setting.field)
    if setting.type in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{setting.env}: expected a number, got {value!r}", setting.field)
        try:
            number = setting.type(str(value).replace("_", "")) if isinstance(value, str) \
                else setting.type(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{setting.env}: expected a number, got {value!r}",
                              setting.field) from None
        if number != number:  # NaN compares false with every bound
            raise ConfigError(f"{setting.env}: expected a number, got {value!r}", setting.field)
        return number
    if isinstance(value, list) and setting.field == "audit_prefixes" and \
            all(isinstance(item, str) for item in value):
        return ",".join(value)  # a TOML list of prefixes, as the comma-separated string
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{setting.env}: expected a string, got {value!r}", setting.field)
    return str(value)


def read_config_file(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - set(_BY_ENV))
    if unknown:
        raise ConfigError(f"{path}: unknown settings {', '.join(unknown)}")
    return {_BY_ENV[k].field: v for k, v in data.items()}


def load_config(overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None,
                config_path: str | os.PathLike | None = None) -> BusConfig:
    """Build the config: defaults < file < environment < overrides (flags).

    `overrides` is keyed by field name; None values mean "flag not given".
    The file is `config_path`, else $BUS_CONFIG, else /etc/bus/bus.toml if present.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {s.field: s.default for s in SETTINGS}
    origins = dict.fromkeys(values, "default")
    sources = ["defaults"]

    explicit = config_path or env.get(CONFIG_PATH_ENV)
    path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    if explicit or path.exists():
        try:
            from_file = read_config_file(path)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        values.update(from_file)
        origins.update(dict.fromkeys(from_file, f"config file {path}"))
        sources.append(str(path))

    from_env = {s.field: env[s.env] for s in SETTINGS if s.env in env}
    if from_env:
        values.update(from_env)
        origins.update({field: f"environment {_BY_FIELD[field].env}" for field in from_env})
        sources.append("environment")

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(_BY_FIELD))
    if unknown:
        raise ConfigError(f"unknown settings {', '.join(unknown)}")
    if given:
        values.update(given)
        origins.update({field: f"flag --{field.replace('_', '-')}" for field in given})
        sources.append("flags")

    try:
        typed = {field: _coerce(_BY_FIELD[field], v) for field, v in values.items()}
        typed["sqlite_synchronous"] = typed["sqlite_synchronous"].upper()
        typed["log_level"] = typed["log_level"].lower()
        return BusConfig(**typed, source=" < ".join(sources), origins=origins)
    except ConfigError as exc:
        given = [origins[name] for name in (exc.field, *exc.others)
                 if name is not None and origins[name] != "default"]
        if not given:
            raise
        raise ConfigError(f"{exc} (from {', '.join(given)})", exc.field, exc.others) from None


def with_overrides(config: BusConfig, **changes: Any) -> BusConfig:
    return dataclasses.replace(config, **changes)
