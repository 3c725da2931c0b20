"""Every setting of every bus process, declared once.

Each setting is one field of `BusConfig` below, declared with `setting(...)`:
its environment variable (also its config file key), default, help, the roles
that use it and its bounds; its type is the field's annotation. Everything
else is generated from those declarations: `SETTINGS`, the checks of a value,
every command's flags (`role_fields`, cli/common.setting_options), the rows
of `bus-cli config`. Adding a setting is adding one field (and its row in the
README's table, if it belongs there).

Values flow one way: defaults < config file < environment < command-line flags.
`load_config` builds one frozen `BusConfig`; no other module reads the
environment. The config file is TOML whose keys are the environment variable
names (`BATCH_SIZE = 500`), so one name means one setting everywhere; an
unknown key is refused, and an unknown BUS_* variable named by
`unknown_variables` (every bus-cli command logs it, with the closest name).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
import urllib.parse
from collections.abc import Callable, Mapping
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


# What each setting's `form` may check: the shape of a value, as one problem
# (after the setting's name) or None.

def endpoint_problem(value: str) -> str | None:
    match = _ENDPOINT.fullmatch(value)
    if match is None:
        return f"must be tcp://HOST:PORT, ipc://PATH or inproc://NAME, not {value!r}"
    if match.group(3) and not 0 < int(match.group(3)) <= 65535:
        return f"has port {match.group(3)}: ports are 1-65535"
    return None


def endpoints_of(value: str) -> list[str]:
    """The endpoints of a setting that may list several, comma-separated (the
    writer's: BUS_CAPTURE_ENDPOINT, BUS_CONTROL_ENDPOINT, BUS_NOTIFY_ENDPOINT).
    The writer binds the first; the proxy and the clients connect to each, so
    that they reach whichever writer holds the lock (writer/standby.py)."""
    return value.split(",")


def writer_endpoints_problem(value: str) -> str | None:
    """One endpoint, or several separated by commas (endpoints_of)."""
    if any(c.isspace() for c in value):
        return f"has white space: {value!r} (a list is separated by commas alone)"
    endpoints = endpoints_of(value)
    if len(set(endpoints)) != len(endpoints):
        return f"lists an endpoint twice: {value!r}"
    if len(endpoints) > 1 and not all(e.startswith("tcp://") for e in endpoints):
        return (f"lists several endpoints, not all tcp:// ones: {value!r} (a list names "
                "writers on several hosts)")
    for endpoint in endpoints:
        if (problem := endpoint_problem(endpoint)) is not None:
            return problem
    return None


def connect_problem(value: str) -> str | None:
    """What keeps a client from connecting to endpoint `value` (a valid one, or
    a list of them): a wildcard host is for the process that binds it, and
    libzmq cannot connect to it (it refused, or waited for ever)."""
    for endpoint in endpoints_of(value):
        match = _ENDPOINT.fullmatch(endpoint)
        if match is not None and match.group(2) == "*":
            return (f"is {endpoint!r}: * is for the process that binds it, to listen on "
                    f"every address; a client connects to one of them, e.g. "
                    f"tcp://127.0.0.1:{match.group(3)}")
    return None


def connect_endpoint_problem(value: str) -> str | None:
    """An endpoint of a program outside the bus (bitcoind's ZMQ), or empty: off."""
    return endpoint_problem(value) if value else None


def upstream_problem(value: str) -> str | None:
    """An edge proxy's upstream: another process's endpoint, or empty (off)."""
    if value.startswith("inproc://"):
        return f"is {value!r}: an upstream proxy is another process (tcp:// or ipc://)"
    return connect_endpoint_problem(value)


def rpc_url_problem(url: str) -> str | None:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or port == -1 or port == 0:
        return f"must be http://HOST:PORT[/wallet/NAME], not {url!r}"
    return None


def http_address_problem(address: str) -> str | None:
    host, colon, port = address.rpartition(":")
    if address and not (colon and host and port.isdigit() and 0 <= int(port) <= 65535):
        return f"must be host:port (127.0.0.1:9101; port 0: any free one), not {address!r}"
    return None


def memory_limit_problem(limit: int) -> str | None:
    if limit and limit < MEMORY_LIMIT_MIN:
        return (f"must be 0 (off) or at least {MEMORY_LIMIT_MIN} (the process alone takes "
                "40-60 MB)")
    return None


def prefixes_problem(prefixes: str) -> str | None:
    if prefixes and any(not p.strip() or "\x00" in p or "\n" in p for p in prefixes.split(",")):
        return "must be topic prefixes separated by commas, none empty"
    return None


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


# Who uses a setting: each process role (its flags: `bus-cli proxy --help`),
# then the clients, each named for what it talks to; a command's flags are the
# settings of the roles it is a client of (role_fields: `bus-cli tail` is a
# subscriber, a reader client and a proxy client, with CURVE keys).
PROCESS_ROLES = ("proxy", "writer", "reader", "anchor", "gateway")
CLIENT_ROLES: dict[str, str] = {
    "publisher": "what a bus.client.Publisher reads: the proxy, the writer's acks, the limits",
    "subscriber": "what a bus.client.Subscriber reads: the proxy, the writer's (durable) acks",
    "writer_client": "asks the writer (control endpoint)",
    "reader_client": "asks the reader (history, proofs)",
    "proxy_client": "asks the proxy (its control endpoint)",
    "anchor_client": "asks the anchor worker, and the writer about its durable consumer",
    "database": "opens the database itself (read-only or offline)",
    "bitcoind": "calls bitcoind's RPC, each call given bitcoind's own 30 s",
    "curve": "a client's CURVE keys: every command that talks to the bus takes them",
    # Three narrower ones, where a command takes less than the roles above
    # would give it (its flags are what they were):
    "prober": "pings each process's control endpoint with its own --timeout-ms (ping, health)",
    "anchor_requester": "publishes an anchor request (anchor submit): a Publisher without the "
                        "size limits (one topic, a 32-byte hash)",
    "bitcoind_deadline": "bounds each bitcoind call by BUS_REQUEST_TIMEOUT_MS (anchor verify)",
}
ROLES = (*PROCESS_ROLES, *CLIENT_ROLES)


@dataclass(frozen=True)
class Setting:
    """One setting as BusConfig declares it (`setting(...)` below): its field,
    variable, type, default and help, who uses it, and the bounds of a value."""

    field: str
    env: str
    type: type
    default: Any
    help: str
    roles: tuple[str, ...] = ()
    at_least: int | None = None      # 0 reads "must not be negative"
    positive: bool = False           # more than 0
    zero: str = ""                   # what 0 means, where 0 is allowed
    at_most: int | None = None
    at_most_why: str = ""
    choices: tuple[str, ...] = ()
    normalize: Callable[[str], str] | None = None  # applied to a loaded value (case)
    form: Callable[[Any], str | None] | None = None
    secret: bool = False             # "***" in stats, logs and `bus-cli config`
    bound_by: str = ""               # an endpoint: the process that binds it (the rest connect)
    comma_list: bool = False         # a TOML list is taken as the comma-separated string

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` alone, by this declaration (None: nothing)."""
        if self.at_least is not None and value < self.at_least:
            if self.at_least == 0:
                return "must not be negative" + (f" ({self.zero})" if self.zero else "")
            return f"must be at least {self.at_least}"
        if self.positive and value <= 0:
            return "must be positive"
        if self.at_most is not None and value > self.at_most:
            return (f"must be at most {self.at_most:,}: {self.at_most_why}" if self.at_most_why
                    else f"must be at most {self.at_most}")
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, not {value!r}"
        return None if self.form is None else self.form(value)


def setting(env: str, default: Any, help: str, *, roles: tuple[str, ...],
            **bounds: Any) -> Any:
    """Declare one BusConfig field: its variable (and config file key), default,
    help, the roles that use it (ROLES) and its bounds (Setting's fields)."""
    unknown = set(roles) - set(ROLES)
    if not roles or unknown:
        raise TypeError(f"{env}: roles must be some of {ROLES}, not {roles}")
    return dataclasses.field(default=default,
                             metadata={"setting": dict(env=env, help=help, roles=roles, **bounds)})


# The one table of settings: each field of BusConfig is a setting, declared
# once here (SETTINGS, the flags of every command, the bounds checked and the
# environment variables are generated from these declarations). Endpoint
# defaults stay on loopback: exposing the bus beyond the host is an explicit
# decision (`tcp://*:5550`).
@dataclass(frozen=True)
class BusConfig:
    pub_endpoint: str = setting(
        "BUS_PUB_ENDPOINT", "tcp://127.0.0.1:5550", "proxy SUB; publishers connect here",
        roles=("proxy", "anchor", "publisher", "anchor_requester"), form=endpoint_problem,
        bound_by="proxy")
    sub_endpoint: str = setting(
        "BUS_SUB_ENDPOINT", "tcp://127.0.0.1:5551", "proxy PUB; subscribers connect here",
        roles=("proxy", "anchor", "subscriber", "anchor_requester"), form=endpoint_problem,
        bound_by="proxy")
    capture_endpoint: str = setting(
        "BUS_CAPTURE_ENDPOINT", "tcp://127.0.0.1:5552",
        "writer PULL (bound); the proxy's capture PUSH connects here",
        roles=("proxy", "writer"), form=writer_endpoints_problem,
        bound_by="writer")
    control_endpoint: str = setting(
        "BUS_CONTROL_ENDPOINT", "tcp://127.0.0.1:5553",
        "writer control endpoint (ROUTER; REQ clients) for trusted commands (stats, flush)",
        roles=("writer", "anchor", "publisher", "subscriber", "writer_client", "prober",
               "anchor_requester"), form=writer_endpoints_problem,
        bound_by="writer")
    proxy_control_endpoint: str = setting(
        "BUS_PROXY_CONTROL_ENDPOINT", "tcp://127.0.0.1:5554",
        "proxy control endpoint (ROUTER) for stats",
        roles=("proxy", "proxy_client", "prober"), form=endpoint_problem,
        bound_by="proxy")
    upstream: str = setting(
        "BUS_PROXY_UPSTREAM", "",
        "run as an edge proxy: its subscriber side is fed by the proxy whose subscriber "
        "endpoint this is (tcp://HOST:PORT; it takes that stream whole and filters it for its "
        "own subscribers, captures nothing and binds no publisher endpoint); empty: the main "
        "proxy",
        roles=("proxy",), form=upstream_problem, bound_by="upstream proxy")
    read_endpoint: str = setting(
        "BUS_READ_ENDPOINT", "tcp://127.0.0.1:5555",
        "reader (ROUTER): history pages from a read-only connection",
        roles=("reader", "anchor", "reader_client", "prober"), form=endpoint_problem,
        bound_by="reader")
    notify_endpoint: str = setting(
        "BUS_NOTIFY_ENDPOINT", "tcp://127.0.0.1:5556",
        "writer XPUB: $bus.ack/nack/commit notifications; only the writer sends there",
        roles=("writer", "anchor", "publisher", "subscriber", "anchor_requester"),
        form=writer_endpoints_problem,
        bound_by="writer")
    anchor_control_endpoint: str = setting(
        "BUS_ANCHOR_CONTROL_ENDPOINT", "tcp://127.0.0.1:5557",
        "anchor worker control endpoint (ROUTER): ping, stats",
        roles=("anchor", "anchor_client", "prober"), form=endpoint_problem,
        bound_by="anchor")
    writer_http: str = setting(
        "BUS_WRITER_HTTP", "",
        "host:port of the writer's HTTP side: /metrics, /metrics/batch, /metrics/load, /healthz "
        "(empty: off)",
        roles=("writer",), form=http_address_problem)
    proxy_http: str = setting(
        "BUS_PROXY_HTTP", "", "host:port of the proxy's /metrics, /healthz (empty: off)",
        roles=("proxy",), form=http_address_problem)
    reader_http: str = setting(
        "BUS_READER_HTTP", "", "host:port of the reader's /metrics, /healthz (empty: off)",
        roles=("reader",), form=http_address_problem)
    reader_max_lag_s: float = setting(
        "BUS_READER_MAX_LAG_S", 30.0,
        "a reader on a PostgreSQL hot standby is unhealthy (/healthz 503, no watchdog ping) "
        "while the standby's newest replayed commit is older than this and more is to come, "
        "or while it receives nothing from its primary",
        roles=("reader",), at_least=0.1)
    gateway_listen: str = setting(
        "BUS_GATEWAY_LISTEN", "127.0.0.1:5560",
        "host:port where the gateway serves WebSocket clients (and its console at /)",
        roles=("gateway",), form=http_address_problem)
    gateway_http: str = setting(
        "BUS_GATEWAY_HTTP", "", "host:port of the gateway's /metrics, /healthz (empty: off)",
        roles=("gateway",), form=http_address_problem)
    gateway_tokens_dir: str = setting(
        "BUS_GATEWAY_TOKENS_DIR", "",
        "the gateway's token directory (bus-cli tokens); empty: no token asked, every "
        "connection may do everything (read, publish, the console: as every local process may "
        "with CURVE off)",
        roles=("gateway",))
    gateway_origins: str = setting(
        "BUS_GATEWAY_ORIGINS", "",
        "the web origins whose pages may connect (https://desk.example.com, comma-separated; "
        "* any); a request with no Origin (not a browser) is let in. Empty: the gateway's own "
        "pages alone (its console)",
        roles=("gateway",), comma_list=True)
    gateway_tls_cert: str = setting(
        "BUS_GATEWAY_TLS_CERT", "",
        "PEM certificate chain: the gateway serves wss:// and https:// (with "
        "BUS_GATEWAY_TLS_KEY); empty: plain, for loopback or behind a TLS reverse proxy",
        roles=("gateway",))
    gateway_tls_key: str = setting(
        "BUS_GATEWAY_TLS_KEY", "", "the PEM private key of BUS_GATEWAY_TLS_CERT",
        roles=("gateway",))
    gateway_max_connections: int = setting(
        "BUS_GATEWAY_MAX_CONNECTIONS", 2048,
        "WebSocket connections the gateway keeps in all; a new one above it is refused (HTTP "
        "503)",
        roles=("gateway",), at_least=1)
    gateway_max_connections_per_token: int = setting(
        "BUS_GATEWAY_MAX_CONNECTIONS_PER_TOKEN", 256,
        "connections one token may have open (a token's file may set its own)",
        roles=("gateway",), at_least=1)
    gateway_send_buffer_bytes: int = setting(
        "BUS_GATEWAY_SEND_BUFFER_BYTES", 1 << 20,
        "what the gateway holds for one slow connection (queued and in the kernel's send "
        "buffer); past it the connection is closed (1008, \"slow consumer\") and counted",
        roles=("gateway",), at_least=64 << 10)
    gateway_max_prefixes: int = setting(
        "BUS_GATEWAY_MAX_PREFIXES", 64,
        "topic prefixes one connection may subscribe to (live and in its streams)",
        roles=("gateway",), at_least=1)
    gateway_max_streams: int = setting(
        "BUS_GATEWAY_MAX_STREAMS", 8,
        "replays and durable consumers one connection may run at once",
        roles=("gateway",), at_least=1)
    gateway_max_producers: int = setting(
        "BUS_GATEWAY_MAX_PRODUCERS", 64,
        "producer sessions the gateway holds for its clients in all (a thread and three "
        "sockets each); one connection may hold 4",
        roles=("gateway",), at_least=1)
    gateway_max_unacked: int = setting(
        "BUS_GATEWAY_MAX_UNACKED", 1000,
        "publishes one connection may have waiting for the writer's acknowledgement; past it "
        "a publish is refused (busy)",
        roles=("gateway",), at_least=1)
    gateway_memory_limit_bytes: int = setting(
        "BUS_GATEWAY_MEMORY_LIMIT_BYTES", 512 << 20,
        "over this RSS the gateway closes the connections that hold most (1013), until it is "
        "back under (0: off)",
        roles=("gateway",), form=memory_limit_problem)
    anchor_http: str = setting(
        "BUS_ANCHOR_HTTP", "", "host:port of the anchor worker's /metrics, /healthz (empty: off)",
        roles=("anchor",), form=http_address_problem)
    curve_dir: str = setting(
        "BUS_CURVE_DIR", "",
        "CURVE key directory (server.key, proxy.key, publishers/ readers/ admins/); empty: no "
        "authentication",
        roles=("proxy", "writer", "reader", "anchor", "curve"))
    curve_key: str = setting(
        "BUS_CURVE_KEY", "",
        "this client's secret CURVE certificate (NAME.key_secret), with BUS_CURVE_DIR",
        roles=("proxy", "writer", "reader", "anchor", "curve"))
    db: str = setting(
        "BUS_DB", "bus.db",
        "SQLite database file (the writer creates it), or "
        "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        roles=("writer", "reader", "database"), form=database_problem)
    batch_write_enabled: bool = setting(
        "BATCH_WRITE_ENABLED", True, "false: one transaction per message (debug / comparison)",
        roles=("writer",))
    batch_size: int = setting(
        "BATCH_SIZE", 100, "rows per transaction when flushing by size",
        roles=("writer",), at_least=1)
    batch_flush_interval_ms: int = setting(
        "BATCH_FLUSH_INTERVAL_MS", 50, "oldest buffered row waits at most this long",
        roles=("writer",), at_least=0)
    batch_max_buffer_size: int = setting(
        "BATCH_MAX_BUFFER_SIZE", 10000,
        "rows held when flushes fail; the writer stops reading at this size",
        roles=("writer",), at_least=1)
    batch_max_buffer_bytes: int = setting(
        "BATCH_MAX_BUFFER_BYTES", 64 << 20,
        "bytes of messages held when flushes fail; the writer stops reading at this size too",
        roles=("writer",), at_least=1)
    batch_group_commit: bool = setting(
        "BATCH_GROUP_COMMIT", True,
        "commit what has arrived as soon as the capture runs dry (paced: commits take at most "
        "a third of the writer's time); false: by size, time and low load only",
        roles=("writer",))
    pg_overlap_commits: bool = setting(
        "BUS_PG_OVERLAP_COMMITS", True,
        "PostgreSQL: each batch commits on a thread of its own while the writer gathers the "
        "next one (one commit at a time, acknowledged once committed); false: the writer "
        "waits for each commit, with less CPU a message",
        roles=("writer",))
    standby: bool = setting(
        "BUS_STANDBY", False,
        "PostgreSQL: start as a standby writer, which binds nothing until it holds the writer's "
        "advisory lock (it tries every BUS_STANDBY_RETRY_MS), then serves as the writer: run "
        "one on each writer host, and the first takes the lock",
        roles=("writer",))
    standby_retry_ms: int = setting(
        "BUS_STANDBY_RETRY_MS", 500,
        "how often a standby writer tries to take the writer's lock (part of a takeover's time)",
        roles=("writer",), at_least=10)
    pg_session_timeout_s: int = setting(
        "BUS_PG_SESSION_TIMEOUT_S", 10,
        "PostgreSQL: how long the writer's session may go without a sign of life from the "
        "other side (TCP keepalives and tcp_user_timeout both ways, the server's "
        "idle_session_timeout against a writer that stopped turning) before that side ends "
        "it; its lock goes with it. The bound on a takeover after a writer's host is lost",
        roles=("writer",), at_least=2)
    batch_low_load_threshold: float = setting(
        "BATCH_LOW_LOAD_THRESHOLD", 100.0,
        "below this many messages/s the writer flushes as soon as it is idle",
        roles=("writer",))
    batch_load_window_seconds: float = setting(
        "BATCH_LOAD_WINDOW_SECONDS", 2.0, "window over which requests_per_second is measured",
        roles=("writer",), positive=True)
    sqlite_synchronous: str = setting(
        "BUS_SQLITE_SYNCHRONOUS", "NORMAL",
        "NORMAL (survives process crashes) or FULL (also power loss)",
        roles=("writer",), choices=("NORMAL", "FULL", "EXTRA", "OFF"), normalize=str.upper)
    sqlite_busy_timeout_ms: int = setting(
        "BUS_SQLITE_BUSY_TIMEOUT_MS", 200,
        "a commit waits this long for a lock held by another process, then keeps its rows and "
        "retries in 0.5 s (the writer answers requests meanwhile)",
        roles=("writer", "reader", "database"), at_least=0)
    retention_max_age_s: float = setting(
        "BUS_RETENTION_MAX_AGE_S", 0.0, "delete messages committed longer ago than this (0: keep)",
        roles=("writer",), at_least=0, zero="0 turns the limit off")
    retention_max_messages: int = setting(
        "BUS_RETENTION_MAX_MESSAGES", 0,
        "keep at most this many messages, deleting the oldest (0: no limit)",
        roles=("writer",), at_least=0, zero="0 turns the limit off")
    retention_chunk_rows: int = setting(
        "BUS_RETENTION_CHUNK_ROWS", 2000,
        "rows deleted per retention transaction (bounds the stall of ingest)",
        roles=("writer",), at_least=1)
    max_consumers: int = setting(
        "BUS_MAX_CONSUMERS", 10_000, "durable consumer positions the writer keeps",
        roles=("writer",), at_least=1)
    max_consumers_per_key: int = setting(
        "BUS_MAX_CONSUMERS_PER_KEY", 1000,
        "(CURVE) durable consumers one key may own (0: BUS_MAX_CONSUMERS alone)",
        roles=("writer",), at_least=0, zero="0 turns the limit off")
    max_producers_per_key: int = setting(
        "BUS_MAX_PRODUCERS_PER_KEY", 1000,
        "(CURVE) producer ids one key may own (0: no limit); `bus-cli producers rm` frees one",
        roles=("writer",), at_least=0, zero="0 turns the limit off")
    max_requests_per_key_s: int = setting(
        "BUS_MAX_REQUESTS_PER_KEY_S", 1000,
        "(CURVE) control requests a second one key may send the writer, a second's worth at once "
        "(0: no limit)",
        roles=("writer",), at_least=0, zero="0 turns the limit off")
    utxo_max_lease_s: float = setting(
        "BUS_UTXO_MAX_LEASE_S", 3600.0, "longest lease a UTXO reservation or renewal may ask for",
        roles=("writer",), positive=True)
    utxo_request_ttl_s: float = setting(
        "BUS_UTXO_REQUEST_TTL_S", 3600.0,
        "how long the writer keeps each utxo_* reply for retries of its request id",
        roles=("writer",), positive=True)
    bitcoind_rpc_url: str = setting(
        "BUS_BITCOIND_RPC_URL", "http://127.0.0.1:8332",
        "bitcoind JSON-RPC (add /wallet/NAME for a named wallet)",
        roles=("anchor", "bitcoind"), form=rpc_url_problem)
    bitcoind_rpc_user: str = setting(
        "BUS_BITCOIND_RPC_USER", "", "RPC user (rpcauth)",
        roles=("anchor", "bitcoind"))
    bitcoind_rpc_password: str = setting(
        "BUS_BITCOIND_RPC_PASSWORD", "", "RPC password",
        roles=("anchor", "bitcoind"), secret=True)
    bitcoind_rpc_cookie: str = setting(
        "BUS_BITCOIND_RPC_COOKIE", "", "bitcoind's .cookie file, instead of user and password",
        roles=("anchor", "bitcoind"))
    bitcoind_zmq_hashblock: str = setting(
        "BUS_BITCOIND_ZMQ_HASHBLOCK", "",
        "bitcoind's -zmqpubhashblock endpoint (empty: learn blocks by polling only)",
        roles=("anchor",), form=connect_endpoint_problem, bound_by="bitcoind")
    anchor_block_poll_s: float = setting(
        "BUS_ANCHOR_BLOCK_POLL_S", 30.0,
        "ask bitcoind for its best block this often (the fallback for ZMQ)",
        roles=("anchor",), positive=True)
    anchor_interval_s: float = setting(
        "BUS_ANCHOR_INTERVAL_S", 60.0,
        "anchor the collected documents this long after the first arrived",
        roles=("anchor",), positive=True)
    anchor_max_documents: int = setting(
        "BUS_ANCHOR_MAX_DOCUMENTS", 10_000,
        "documents per anchor transaction (anchored at once when reached; at most 49,990: one "
        "anchor_record request)",
        roles=("anchor",), at_least=1, at_most=ANCHOR_DOCUMENTS_MAX,
        at_most_why="one anchor_record request holds an array per document, and the writer "
                    "takes at most 50,000 maps and arrays a request")
    anchor_fee_rate_sat_vb: float = setting(
        "BUS_ANCHOR_FEE_RATE_SAT_VB", 0.0,
        "fee rate of anchor transactions (0: bitcoind's estimatesmartfee)",
        roles=("anchor",), at_least=0, zero="0: estimate")
    anchor_fallback_fee_rate_sat_vb: float = setting(
        "BUS_ANCHOR_FALLBACK_FEE_RATE_SAT_VB", 5.0,
        "fee rate when estimatesmartfee has no estimate",
        roles=("anchor",), positive=True)
    anchor_max_fee_rate_sat_vb: float = setting(
        "BUS_ANCHOR_MAX_FEE_RATE_SAT_VB", 200.0,
        "no anchor transaction, or fee bump, pays more than this",
        roles=("anchor",), positive=True)
    anchor_conf_target: int = setting(
        "BUS_ANCHOR_CONF_TARGET", 6, "estimatesmartfee's confirmation target, in blocks",
        roles=("anchor",), at_least=1)
    anchor_confirmations: int = setting(
        "BUS_ANCHOR_CONFIRMATIONS", 3,
        "anchor.confirmed is published after this many confirmations",
        roles=("anchor",), at_least=1)
    anchor_bump_after_blocks: int = setting(
        "BUS_ANCHOR_BUMP_AFTER_BLOCKS", 3,
        "an anchor transaction not mined after this many blocks is fee-bumped (RBF)",
        roles=("anchor",), at_least=1)
    anchor_lease_s: float = setting(
        "BUS_ANCHOR_LEASE_S", 600.0,
        "lease of the UTXO reserved for an anchoring (renewed while it is built; at most "
        "BUS_UTXO_MAX_LEASE_S)",
        roles=("anchor",), positive=True)
    anchor_utxo_min_confirmations: int = setting(
        "BUS_ANCHOR_UTXO_MIN_CONFIRMATIONS", 1,
        "an anchoring spends only UTXOs with this many confirmations",
        roles=("anchor",), at_least=0)
    anchor_consumer: str = setting(
        "BUS_ANCHOR_CONSUMER", "anchor",
        "durable consumer name under which anchor.request messages are read",
        roles=("anchor", "anchor_client"))
    anchor_sync_page: int = setting(
        "BUS_ANCHOR_SYNC_PAGE", 1000,
        "most wallet outputs the wallet sync holds at once (one listunspent page)",
        roles=("anchor",), at_least=1)
    anchor_retry_max_s: float = setting(
        "BUS_ANCHOR_RETRY_MAX_S", 30.0,
        "longest wait between retries when bitcoind or the writer is unavailable",
        roles=("anchor",), positive=True)
    audit_prefixes: str = setting(
        "BUS_AUDIT_PREFIXES", "",
        "sealed topic prefixes, comma-separated (docs/protocol.md, \"Audit seals\"): the anchor "
        "worker seals their stored messages; retention keeps the unsealed ones",
        roles=("writer", "anchor"), form=prefixes_problem, comma_list=True)
    audit_interval_s: float = setting(
        "BUS_AUDIT_INTERVAL_S", 60.0,
        "the anchor worker seals what was stored since the last seal this often",
        roles=("anchor",), positive=True)
    audit_max_messages: int = setting(
        "BUS_AUDIT_MAX_MESSAGES", 262_144,
        "most messages in one seal (a longer backlog is sealed in several)",
        roles=("anchor",), at_least=1)
    audit_max_rate: float = setting(
        "BUS_AUDIT_MAX_RATE", 20_000.0,
        "most messages a second the anchor worker seals (its share of the machine)",
        roles=("anchor",), positive=True)
    history_page_rows: int = setting(
        "BUS_HISTORY_PAGE_ROWS", 5000, "most messages in one history page",
        roles=("reader",), at_least=1)
    history_page_bytes: int = setting(
        "BUS_HISTORY_PAGE_BYTES", 4 << 20,
        "a history page stops growing past this many payload+meta bytes",
        roles=("reader",), at_least=1)
    history_scan_rows: int = setting(
        "BUS_HISTORY_SCAN_ROWS", 200_000,
        "rows one history request examines for a topic filter, at most",
        roles=("reader",), at_least=1)
    capture_hwm: int = setting(
        "BUS_CAPTURE_HWM", 1_000,
        "messages the proxy queues for a stopped or slow writer; past that they wait in each "
        "publisher's pipe, served in turn (a flood delays the others by at most this queue)",
        roles=("proxy",), at_least=1)
    capture_hwm_writer_down: int = setting(
        "BUS_CAPTURE_HWM_WRITER_DOWN", 1_000_000,
        "messages the proxy holds itself while no writer is connected (a restart): live delivery "
        "goes on, and the writer gets them in order once it is back",
        roles=("proxy",), at_least=1)
    capture_buffer_bytes: int = setting(
        "BUS_CAPTURE_BUFFER_BYTES", 16 << 10,
        "the kernel's socket buffer at each end of the capture connection, part of that same "
        "queue: more is a little more throughput at full load, less fairness",
        roles=("proxy", "writer"), at_least=1, at_most=2**31 - 1)
    sub_hwm: int = setting(
        "BUS_SUB_HWM", 100_000, "messages the proxy queues per subscriber before dropping for it",
        roles=("proxy",), at_least=1)
    pub_hwm: int = setting(
        "BUS_PUB_HWM", 100_000, "messages queued in the proxy per publisher and in each Publisher",
        roles=("proxy",), at_least=1)
    max_topic_bytes: int = setting(
        "BUS_MAX_TOPIC_BYTES", 256,
        "longest topic stored (at most 65,000, and BUS_MAX_MESSAGE_BYTES - 1024: room for a "
        "session's meta)",
        roles=("proxy", "writer", "publisher"), at_least=1, at_most=TOPIC_BYTES_MAX,
        at_most_why="a history request naming one such topic must fit in the reader's 64 KiB "
                    "request frame")
    max_message_bytes: int = setting(
        "BUS_MAX_MESSAGE_BYTES", 1_048_576,
        "largest message (all frames) stored (at most BUS_PROXY_MAX_FRAME_BYTES, less 33 with "
        "CURVE)",
        roles=("writer", "publisher"), at_least=1)
    proxy_max_frame_bytes: int = setting(
        "BUS_PROXY_MAX_FRAME_BYTES", 16_777_216,
        "the proxy disconnects a peer sending a larger frame (memory guard; at least "
        "BUS_MAX_MESSAGE_BYTES, + 33 with CURVE)",
        roles=("proxy",), at_least=1)
    proxy_memory_limit_bytes: int = setting(
        "BUS_PROXY_MEMORY_LIMIT_BYTES", 1 << 30,
        "over this RSS the proxy stops forwarding and cuts off the side that holds the memory, "
        "until it is back under (0: off; else at least 96 MiB + BUS_MAX_MESSAGE_BYTES)",
        roles=("proxy",), form=memory_limit_problem)
    proxy_subscription_bytes_per_connection: int = setting(
        "BUS_PROXY_SUBSCRIPTION_BYTES_PER_CONNECTION", 64 << 10,
        "the proxy cuts off a subscriber connection that sent more (its subscriptions, as bytes "
        "on the wire; 0: no budget)",
        roles=("proxy",), at_least=0, zero="0 turns the limit off")
    proxy_subscription_bytes: int = setting(
        "BUS_PROXY_SUBSCRIPTION_BYTES", 1 << 20,
        "what all subscriber connections may have sent together; over it the proxy cuts off the "
        "connection that sent most (0: no budget)",
        roles=("proxy",), at_least=0, zero="0 turns the limit off")
    reader_memory_limit_bytes: int = setting(
        "BUS_READER_MEMORY_LIMIT_BYTES", 128 << 20,
        "over this RSS the reader drops its clients' connections (an endless request; 0: off; "
        "else at least 96 MiB + BUS_HISTORY_PAGE_BYTES + BUS_MAX_MESSAGE_BYTES)",
        roles=("reader",), form=memory_limit_problem)
    anchor_memory_limit_bytes: int = setting(
        "BUS_ANCHOR_MEMORY_LIMIT_BYTES", 128 << 20,
        "over this RSS the anchor worker drops its control clients' connections (0: off)",
        roles=("anchor",), form=memory_limit_problem)
    writer_memory_limit_bytes: int = setting(
        "BUS_WRITER_MEMORY_LIMIT_BYTES", 384 << 20,
        "over this RSS the writer drops its capture and notify connections and what they queued "
        "(nothing acknowledged; 0: off; else at least 96 MiB + BUS_MAX_MESSAGE_BYTES)",
        roles=("writer",), form=memory_limit_problem)
    max_connections: int = setting(
        "BUS_MAX_CONNECTIONS", 1024,
        "connections each bound endpoint of a process keeps open; the newest above it is cut at "
        "once and counted. A process needs twice this a bound endpoint + 64 open files (the "
        "units' LimitNOFILE=); under a lower limit it lowers this to fit and says so",
        roles=("proxy", "writer", "reader"), at_least=1)
    shutdown_timeout_ms: int = setting(
        "BUS_SHUTDOWN_TIMEOUT_MS", 10_000,
        "longest a process spends draining and flushing when stopped",
        roles=("proxy", "writer", "reader", "anchor", "gateway"), at_least=0)
    drain_idle_ms: int = setting(
        "BUS_DRAIN_IDLE_MS", 200,
        "on stop, proxy and writer keep forwarding/storing until quiet this long (for at most 5 "
        "such periods)",
        roles=("proxy", "writer", "reader"), at_least=1)
    request_timeout_ms: int = setting(
        "BUS_REQUEST_TIMEOUT_MS", 3000,
        "client wait for a control reply or for the proxy's subscription",
        roles=("anchor", "publisher", "subscriber", "writer_client", "reader_client",
               "proxy_client", "anchor_client", "anchor_requester", "bitcoind_deadline"),
        at_least=1)
    log_level: str = setting(
        "BUS_LOG_LEVEL", "info", "debug, info, warning, error",
        roles=("proxy", "writer", "reader", "anchor", "gateway"),
        choices=("debug", "info", "warning", "error"), normalize=str.lower)
    log_format: str = setting(
        "BUS_LOG_FORMAT", "auto", "auto (JSON unless stderr is a terminal), json, console",
        roles=("proxy", "writer", "reader", "anchor", "gateway"), choices=("auto", "json", "console"))

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
        for setting in SETTINGS:
            if (problem := setting.problem(getattr(self, setting.field))) is not None:
                raise _invalid(setting.field, problem)
        self._check_together()

    def _check_together(self) -> None:
        """Refuse settings that are each valid but cannot work together: the
        bus would accept something it then cannot deliver, store or serve."""
        if self.batch_size > self.batch_max_buffer_size:
            raise _invalid("batch_size", "must not exceed BATCH_MAX_BUFFER_SIZE")
        if self.standby and not self.db.startswith(("postgresql://", "postgres://")):
            raise _conflict(("standby", "db"), (
                "BUS_STANDBY needs a PostgreSQL database (BUS_DB=postgresql://...): the "
                "writer's lock a standby waits for is PostgreSQL's (a SQLite file has one "
                "writer on one host)"))
        if self.upstream and self.upstream == self.sub_endpoint:
            raise _conflict(("upstream", "sub_endpoint"), (
                "BUS_PROXY_UPSTREAM is this proxy's own BUS_SUB_ENDPOINT: an edge proxy is fed "
                "by another proxy's subscriber endpoint"))
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


_TYPES = typing.get_type_hints(BusConfig)
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, type=_TYPES[f.name], default=f.default, **f.metadata["setting"])
    for f in dataclasses.fields(BusConfig) if "setting" in f.metadata)
_BY_FIELD = {s.field: s for s in SETTINGS}
_BY_ENV = {s.env: s for s in SETTINGS}
# Never shown in stats or logs.
SECRET_FIELDS = tuple(s.field for s in SETTINGS if s.secret)
# BUS_* variables that are no setting: the config file's path, and the test
# suite's own (BUS_TEST_BITCOIND, BUS_TEST_REQUIRE_BITCOIND: tests/regtest.py).
OTHER_VARIABLES = (CONFIG_PATH_ENV,)
TEST_VARIABLES_PREFIX = "BUS_TEST_"


def role_fields(*roles: str) -> tuple[str, ...]:
    """The settings any of `roles` uses, in the table's order: a command's flags."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"no role {', '.join(sorted(unknown))} (roles: {', '.join(ROLES)})")
    return tuple(s.field for s in SETTINGS if set(s.roles) & set(roles))


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the closest known name) for each BUS_* variable of `env` that
    names no setting: a misspelt one would otherwise be ignored in silence
    (an unknown key of the config file is refused, read_config_file)."""
    known = [*_BY_ENV, *OTHER_VARIABLES]
    return [(name, closest_setting(name, known))
            for name in sorted(env) if name.startswith(("BUS_", "BATCH_")) and name not in known
            and not name.startswith(TEST_VARIABLES_PREFIX)]


def closest_setting(name: str, known: list[str]) -> str:
    """The known name most like `name`, case aside (`batch_size` in a config
    file is BATCH_SIZE's, not BUS_DB's)."""
    return difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.0)[0]


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
    if isinstance(value, list) and setting.comma_list and \
            all(isinstance(item, str) for item in value):
        return ",".join(value)  # a TOML list of prefixes, as the comma-separated string
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{setting.env}: expected a string, got {value!r}", setting.field)
    text = str(value)
    try:  # bytes that are not UTF-8 (a flag or variable, as surrogates) fail later, at use
        text.encode()
    except UnicodeEncodeError:
        raise ConfigError(f"{setting.env}: not valid UTF-8: {text!r}", setting.field) from None
    return text


def read_config_file(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - set(_BY_ENV))
    if unknown:
        raise ConfigError(f"{path}: unknown settings " + ", ".join(
            f"{name} (closest: {closest_setting(str(name), list(_BY_ENV))})"
            for name in unknown))
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
        origins.update(dict.fromkeys(from_file, f"config file {path.absolute()}"))
        sources.append(str(path.absolute()))

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
        for setting in SETTINGS:
            if setting.normalize is not None:
                typed[setting.field] = setting.normalize(typed[setting.field])
        return BusConfig(**typed, source=" < ".join(sources), origins=origins)
    except ConfigError as exc:
        given = [origins[name] for name in (exc.field, *exc.others)
                 if name is not None and origins[name] != "default"]
        if not given:
            raise
        raise ConfigError(f"{exc} (from {', '.join(given)})", exc.field, exc.others) from None


def with_overrides(config: BusConfig, **changes: Any) -> BusConfig:
    return dataclasses.replace(config, **changes)
