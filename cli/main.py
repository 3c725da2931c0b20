"""bus-cli: run the bus processes and talk to them.

    bus-cli up                      proxy + writer + reader in the foreground (development)
    bus-cli proxy | writer | reader one process each (what the systemd units run)
    bus-cli publish TOPIC [DATA]    publish DATA, or one message per stdin line
    bus-cli tail [PREFIX...]        print messages as they pass (--since, --durable)
    bus-cli history [PREFIX...]     print stored messages
    bus-cli stats                   writer/reader metrics and proxy counters
    bus-cli consumers | producers   durable consumers; producer ids (ls, info, rm)
    bus-cli keys                    CURVE keys: generate, ls, revoke
    bus-cli bench                   publish/acknowledge/subscribe rates and latencies
    bus-cli db migrate | copy       the schema; a copy to another engine (SQLite, PostgreSQL)
    bus-cli anchor [submit|proof|verify]  the anchor worker, and anchoring requests/proofs
    bus-cli utxo stats              the wallet's UTXO table and reservation counters

Every setting is a flag here, an environment variable, or a key of the config
file (see `bus.config.SETTINGS`); flags win.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import msgpack
import zmq.auth

from bus import protocol, security
from bus.client import BusError, ControlClient, HistoryClient, Publisher, Subscriber, since_to_ns
from bus.config import SETTINGS, BusConfig, http_address_problem, role_fields
import storage
from cli.anchoring import anchor, utxo
from cli.audit import audit
from cli.bench import bench
from cli.db import db
from cli.common import (CURVE_FIELDS, MAX_SECONDS, PROCESS_FIELDS, FiniteFloat, InputError, Liveness,
                        ask_all, build_config, jsonable, print_sections, setting_options,
                        stop_on_sigterm)

# What a Publisher talks to: the proxy, and the writer for its session and acknowledgements.
PUBLISHER_FIELDS = role_fields("publisher")
# The HTTP sides of the processes `up` runs.
HTTP_FIELDS = tuple(s.field for s in SETTINGS if s.form is http_address_problem
                    and set(s.roles) & {"writer", "proxy", "reader"})
SETTING_ENV = {s.field: s.env for s in SETTINGS}
WRITER_FIELDS = role_fields("writer")
PROXY_FIELDS = role_fields("proxy")
READER_FIELDS = role_fields("reader")


class BusCli(click.Group):
    """click's group, with the exits a shell expects: 130 after Ctrl-C
    (click says "Aborted!" and exits 1), quiet when the reader of standard
    output goes away (`bus-cli tail | head`), one line for a usage error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            sys.exit(130)
        except UnicodeEncodeError as exc:  # e.g. an argument of bytes that are not UTF-8
            click.echo(f"Error: text that is not valid UTF-8 (in an argument?): {exc.reason}",
                       err=True)
            sys.exit(2)
        except BrokenPipeError:
            # Python would complain again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)


@click.group(cls=BusCli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zmq-sqlite-bus", prog_name="bus-cli")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file [env BUS_CONFIG; default /etc/bus/bus.toml if present]")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """ZeroMQ message bus with a batching SQLite writer."""
    ctx.obj = {"config_path": config_path}


# --- processes ---------------------------------------------------------------

@main.command("config", short_help="Every setting's value and where it came from.")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@setting_options(*(s.field for s in SETTINGS))
@click.pass_context
def show_config(ctx: click.Context, as_json: bool, **flags: Any) -> None:
    """Print every setting's effective value and where it came from (flag,
    environment, config file, default); secrets as ***."""
    cfg = build_config(ctx, flags)
    public = cfg.public()
    if as_json:
        click.echo(json.dumps({s.env: {"value": public[s.env], "from": cfg.origins[s.field]}
                               for s in SETTINGS}, indent=2))
        return
    width = max(len(s.env) for s in SETTINGS)
    for s in SETTINGS:
        click.echo(f"{s.env:<{width}}  {public[s.env]!s:<28}  {cfg.origins[s.field]}")


@main.command(short_help='Run the proxy (what bus-proxy.service runs).')
@setting_options(*PROXY_FIELDS)
@click.pass_context
def proxy(ctx: click.Context, **flags: Any) -> None:
    """Run the proxy (publishers in, subscribers out) with its capture pipe to the writer."""
    from proxy.service import Proxy
    from bus.runner import run_role
    sys.exit(run_role(Proxy(build_config(ctx, flags, "proxy"))))


@main.command()
@setting_options(*WRITER_FIELDS)
@click.pass_context
def writer(ctx: click.Context, **flags: Any) -> None:
    """Run the batching SQLite writer."""
    from bus.runner import run_role
    from writer.service import Writer
    sys.exit(run_role(Writer(build_config(ctx, flags, "writer"))))


@main.command()
@setting_options(*READER_FIELDS)
@click.pass_context
def reader(ctx: click.Context, **flags: Any) -> None:
    """Serve history pages from a read-only database connection."""
    from bus.runner import run_role
    from reader.service import Reader
    sys.exit(run_role(Reader(build_config(ctx, flags, "reader"))))


@main.command()
@setting_options(*role_fields("writer", "proxy", "reader"))
@click.pass_context
def up(ctx: click.Context, **flags: Any) -> None:
    """Run proxy + writer + reader in the foreground until Ctrl-C.

    Each child tells this process it is ready the way it tells systemd
    (sd_notify READY=1, on a socket of this process's own), so "up" means
    these three children serve, not that something answers on the ports.
    Their HTTP sides (/metrics, /healthz) are on, on free loopback ports,
    unless set. Ctrl-C stops the proxy first, so that everything it captured
    reaches the writer, then the writer, which flushes and closes the
    database, then the reader.
    """
    cfg = build_config(ctx, flags, "up")
    env = dict(os.environ)
    env.update({s.env: str(getattr(cfg, s.field)).lower() if s.type is bool
                else str(getattr(cfg, s.field)) for s in SETTINGS})
    for field in HTTP_FIELDS:
        if not getattr(cfg, field):
            env[SETTING_ENV[field]] = "127.0.0.1:0"
    cmd = [sys.executable, "-m", "cli.main"]
    if ctx.obj.get("config_path"):
        cmd += ["--config", ctx.obj["config_path"]]
    stopping = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    children: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory(prefix="bus-up-") as tmp:
        notify = {name: _notify_socket(Path(tmp, f"{name}.notify"))
                  for name in ("writer", "proxy", "reader")}
        try:
            ready: dict[str, dict[str, str]] | None = {}
            # The writer first: the reader would warn that the database it
            # creates is not there yet.
            for group in (("writer",), ("proxy", "reader")):
                for name in group:
                    # Own sessions: the terminal's Ctrl-C reaches only this
                    # process, which then stops the children in the safe order.
                    children[name] = subprocess.Popen(
                        cmd + [name],
                        env={**env, "NOTIFY_SOCKET": str(Path(tmp, f"{name}.notify"))},
                        start_new_session=True)
                started = _wait_ready({name: children[name] for name in group}, notify, stopping)
                if started is None:
                    ready = None
                    break
                ready.update(started)
            if ready is None:
                status = 1
                click.echo("the bus did not start; the lines above say why. An endpoint in use "
                           "is often another bus (bus-cli ping finds it): stop it, or give this "
                           "one other endpoints (--pub-endpoint ..., see bus-cli up --help, or "
                           "BUS_*_ENDPOINT) and the clients the same", err=True)
            else:
                http = {name: ready[name].get("BUS_HTTP", "off") for name in ready}
                click.echo(
                    f"bus is up: proxy pid {children['proxy'].pid}, writer pid "
                    f"{children['writer'].pid}, reader pid {children['reader'].pid}, database "
                    f"{describe_db(cfg.db)}\n"
                    f"  publishers connect to   {cfg.pub_endpoint}   (BUS_PUB_ENDPOINT)\n"
                    f"  subscribers connect to  {cfg.sub_endpoint}   (BUS_SUB_ENDPOINT)\n"
                    f"  writer capture (PULL)   {cfg.capture_endpoint}   (BUS_CAPTURE_ENDPOINT)\n"
                    f"  writer control (REP)    {cfg.control_endpoint}   (BUS_CONTROL_ENDPOINT)\n"
                    f"  proxy control (REP)     {cfg.proxy_control_endpoint}   "
                    f"(BUS_PROXY_CONTROL_ENDPOINT)\n"
                    f"  history reads (REP)     {cfg.read_endpoint}   (BUS_READ_ENDPOINT)\n"
                    f"  notifications (XPUB)    {cfg.notify_endpoint}   (BUS_NOTIFY_ENDPOINT)\n"
                    f"  writer /metrics /healthz  http://{http['writer']}   (BUS_WRITER_HTTP)\n"
                    f"  proxy /metrics /healthz   http://{http['proxy']}   (BUS_PROXY_HTTP)\n"
                    f"  reader /metrics /healthz  http://{http['reader']}   (BUS_READER_HTTP)\n"
                    "Ctrl-C stops all three.", err=False)
                sys.stdout.flush()
                while stopping["signal"] is None:
                    for name, proc in children.items():
                        if proc.poll() is not None:
                            click.echo(f"{name} exited with status {proc.returncode}", err=True)
                            status = 1
                            stopping["signal"] = signal.SIGTERM
                    for sock in notify.values():
                        _read_notifications(sock)  # keep their queues from filling
                    time.sleep(0.1)
        finally:
            timeout = cfg.shutdown_timeout_ms / 1000.0 + 5
            for name in ("proxy", "writer", "reader"):
                proc = children.get(name)
                if proc is None:
                    continue
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                if code != 0:
                    status = 1
            for sock in notify.values():
                sock.close()
    click.echo("bus stopped" + ("" if status == 0 else " with errors"), err=True)
    sys.exit(status)


def describe_db(db: str) -> str:
    """The database as a person reads it: the file's full path, or the URL
    without its password."""
    return storage.redact(db) if storage.is_url(db) else os.path.abspath(db)


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def _read_notifications(sock: socket.socket) -> dict[str, str]:
    """The NAME=VALUE lines waiting on a notify socket (the last of each name)."""
    lines: dict[str, str] = {}
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return lines
        for line in data.decode(errors="replace").splitlines():
            name, _, value = line.partition("=")
            lines[name] = value


def _wait_ready(children: dict[str, subprocess.Popen], notify: dict[str, socket.socket],
                stopping: dict) -> dict[str, dict[str, str]] | None:
    """Each child's READY=1 notification (with its other lines), or None if
    one exits first or they are not all ready within 15 s."""
    deadline = time.monotonic() + 15
    ready: dict[str, dict[str, str]] = {}
    while len(ready) < len(children) and stopping["signal"] is None:
        for name, proc in children.items():
            if name in ready:
                continue
            if proc.poll() is not None:
                click.echo(f"{name} exited with status {proc.returncode}", err=True)
                return None
            lines = _read_notifications(notify[name])
            if lines.get("READY") == "1":
                ready[name] = lines
        if time.monotonic() > deadline:
            click.echo(f"not ready within 15 s: "
                       f"{', '.join(sorted(set(children) - set(ready)))}", err=True)
            return None
        time.sleep(0.05)
    return ready if len(ready) == len(children) else None


# --- publish -------------------------------------------------------------------

def encode_payload(data: bytes, encoding: str, where: str) -> tuple[bytes, str]:
    """DATA, a line or a file as a payload; `where` names it in errors."""
    if encoding == "raw":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return data, protocol.CONTENT_BYTES
        return data, protocol.CONTENT_TEXT
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: --{encoding} needs JSON: {exc}") from None
    if encoding == "json":
        return json.dumps(value, separators=(",", ":")).encode("utf-8"), protocol.CONTENT_JSON
    return msgpack.packb(value), protocol.CONTENT_MSGPACK


def input_lines(stream: Any, encoding: str) -> Iterator[tuple[str, bytes, str]]:
    """(where, payload, content type) for each line of a binary stream."""
    for number, line in enumerate(stream, 1):
        where = f"line {number} of standard input"
        line = line.rstrip(b"\r\n")
        if encoding != "raw" and not line.strip():
            continue  # a blank line in JSON lines is no message (a raw empty line is)
        yield (where, *encode_payload(line, encoding, where))


@main.command(short_help="Publish DATA, a file, or standard input's lines.")
@click.argument("topic")
@click.argument("data", required=False)
@click.option("--file", "-f", "path", type=click.Path(exists=True, dir_okay=False, readable=True,
                                                      allow_dash=True),
              default=None, help="publish the whole file as one message (binary-safe; - for "
                                 "standard input)")
@click.option("--raw", "encoding", flag_value="raw", default=True,
              help="payload is DATA's bytes (default; text/plain if UTF-8, else "
                   "application/octet-stream)")
@click.option("--json", "encoding", flag_value="json", help="DATA is JSON; payload is JSON")
@click.option("--msgpack", "encoding", flag_value="msgpack",
              help="DATA is JSON; payload is its msgpack encoding")
@click.option("--count", "-c", type=click.IntRange(min=1), default=1,
              help="publish DATA this many times")
@click.option("--rate", "-r", type=FiniteFloat(min=0, max=1e7), default=0.0,
              help="messages per second with --count (0: as fast as possible)")
@click.option("--producer-id", default=None, help="producer id in meta (default: host-pid-random)")
@click.option("--header", "-H", multiple=True, help="KEY=VALUE header in meta (repeatable)")
@click.option("--wait", is_flag=True,
              help="exit 0 only once the writer has committed every message")
@click.option("--wait-timeout", type=FiniteFloat(min=0, min_open=True, max=MAX_SECONDS),
              default=10.0,
              show_default=True,
              help="seconds --wait waits for the commit acknowledgements")
@setting_options(*PUBLISHER_FIELDS, *CURVE_FIELDS)
@click.pass_context
def publish(ctx: click.Context, topic: str, data: str | None, path: str | None, encoding: str,
            count: int, rate: float, producer_id: str | None, header: tuple[str, ...],
            wait: bool, wait_timeout: float, **flags: Any) -> None:
    """Publish DATA to TOPIC, the file of --file, or one message per line of
    standard input.

    With --wait, unacknowledged messages are re-sent (same sequence numbers,
    stored once) until the writer acknowledges them all or --wait-timeout passes;
    the exit status is 1, naming the reason, if the writer refused any. Lines
    from standard input stop at the first one that cannot be published (not
    JSON with --json, too large, ...), named by its line number: the lines
    before it are published (and, with --wait, committed), the rest are not.
    """
    cfg = build_config(ctx, flags, "publish")
    headers = {}
    for item in header:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--header")
        headers[key] = value
    try:
        protocol.encode_topic(topic, cfg.max_topic_bytes)
    except protocol.ProtocolError as exc:
        raise click.BadParameter(str(exc), param_hint="TOPIC")
    if data is not None and path is not None:
        raise click.UsageError("give DATA or --file, not both")
    if data is None and count > 1:
        raise click.UsageError("--count needs DATA")
    if path is not None:
        with click.open_file(path, "rb") as source:
            payloads: Any = iter([(path, *encode_payload(source.read(), encoding, path))])
        total: int | None = 1
    elif data is not None:
        try:
            payload = encode_payload(data.encode("utf-8", "surrogateescape"), encoding, "DATA")
        except InputError as exc:
            raise click.BadParameter(exc.message, param_hint="DATA") from None
        payloads = itertools.repeat(("DATA", *payload), count)
        total = count
    else:
        if sys.stdin.isatty():
            click.echo(f"reading messages for {topic} from standard input, one a line "
                       "(Ctrl-D ends)", err=True)
        payloads = input_lines(sys.stdin.buffer, encoding)
        total = None
    sent = 0
    where = ""
    stopped = stop_on_sigterm()
    try:
        with Publisher(cfg, producer_id=producer_id) as pub, \
                click.progressbar(length=count, file=sys.stderr, label=f"publishing to {topic}",
                                  show_pos=True, hidden=count == 1) as bar:
            started = time.monotonic()
            try:
                for where, payload, content_type in payloads:
                    if stopped():
                        break
                    if rate > 0:
                        delay = started + sent / rate - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    pub.publish(topic, payload, content_type=content_type,
                                headers=headers or None)
                    sent += 1
                    if sent % 1000 == 0 or sent == total:
                        bar.update(sent - bar.pos)
            finally:  # what was published before a bad line is still flushed
                last = pub.last_seq
                if wait and sent:
                    pub.flush(wait_timeout)
    except BusError as exc:
        raise InputError(str(exc)) from None
    except protocol.ProtocolError as exc:  # a message the writer would refuse: not sent
        raise InputError(f"{where}: {exc} (after {sent} published)") from None
    except InputError as exc:
        raise InputError(f"{exc.message} (after {sent} published)") from None
    if not sent:
        click.echo(f"nothing to publish to {topic}: standard input was empty", err=True)
        return
    click.echo(("stopped by SIGTERM: " if stopped() else "")
               + f"published {sent} message{'s' if sent != 1 else ''} to {topic} "
               f"(producer {pub.producer_id}, seq {last - sent + 1}..{last})"
               + (", committed" if wait else ""), err=True)


# --- tail ----------------------------------------------------------------------

def decode_payload(msg: protocol.Message) -> tuple[str, Any]:
    """('value', x) for msgpack/JSON payloads, ('text', s) for UTF-8, ('base64', s) otherwise."""
    content_type = msg.meta.get(protocol.META_CONTENT_TYPE, "")
    if protocol.is_reserved(msg.topic):  # the writer's notifications: msgpack maps
        content_type = protocol.CONTENT_MSGPACK
    try:
        if content_type == protocol.CONTENT_MSGPACK:
            return "value", msgpack.unpackb(msg.payload, raw=False, strict_map_key=False)
        if content_type == protocol.CONTENT_JSON:
            return "value", json.loads(msg.payload)
    except Exception:
        pass
    try:
        return "text", msg.payload.decode("utf-8")
    except UnicodeDecodeError:
        return "base64", base64.b64encode(msg.payload).decode("ascii")


def format_line(msg: protocol.Message) -> str:
    ts = msg.time_ns or msg.committed_ns or time.time_ns()
    when = dt.datetime.fromtimestamp(ts / 1e9, dt.timezone.utc).isoformat(timespec="milliseconds")
    kind, value = decode_payload(msg)
    shown = json.dumps(value, default=jsonable) if kind == "value" else \
        (value if kind == "text" else f"base64:{value}")
    origin = f" {msg.producer}#{msg.seq}" if msg.producer else ""
    stored = f" [{msg.id}]" if msg.id is not None else ""
    return f"{when.replace('+00:00', 'Z')}{stored} {msg.topic}{origin} {shown}"


def format_json(msg: protocol.Message) -> str:
    kind, value = decode_payload(msg)
    record: dict[str, Any] = {"topic": msg.topic, "meta": msg.meta,
                              ("payload" if kind != "base64" else "payload_base64"): value}
    if msg.id is not None:
        record.update(id=msg.id, committed_ns=msg.committed_ns)
    return json.dumps(record, default=jsonable, separators=(",", ":"))


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> dt.datetime | dt.timedelta:
    """'10m', '30s', '2h', '1d', '500ms' ago, or an ISO 8601 time (UTC if no zone)."""
    match = _DURATION.match(text.strip())
    if match:
        try:
            return dt.timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
        except OverflowError:
            raise click.BadParameter(f"{text!r} is longer ago than any stored message could "
                                     "be", param_hint="--since") from None
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a duration like 10m, 30s, 2h, 1d "
                                 "or an ISO 8601 time", param_hint="--since") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def print_messages(messages: Iterator[protocol.Message | None], as_json: bool,
                   limit: int | None, stop: Callable[[], bool] = lambda: False,
                   printed: Callable[[protocol.Message], None] = lambda msg: None) -> int:
    """Print messages until `limit`, `stop()` or the end; None items are waits.
    `printed(msg)` follows each line that reached standard output: a durable
    tail acknowledges there, so a message taken but not written (Ctrl-C, a
    closed pipe) is not acknowledged. The limit is checked before the next
    message is taken."""
    fmt = format_json if as_json else format_line
    shown = 0
    try:
        while not stop() and (limit is None or shown < limit):
            msg = next(messages, False)
            if msg is False:
                break
            if msg is None:
                continue
            sys.stdout.write(fmt(msg) + "\n")
            sys.stdout.flush()
            shown += 1
            printed(msg)
    except BrokenPipeError:  # `| head` has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return shown


@main.command(short_help='Print messages as they pass (--since: stored first).')
@click.argument("prefixes", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.option("-n", "limit", type=click.IntRange(min=1), default=None,
              help="stop after this many messages")
@click.option("--fail-fast", is_flag=True,
              help="exit 1 when a process tail needs does not answer, instead of waiting")
@click.option("--since", "since", default=None,
              help="first print what was stored since then (10m, 2h, ISO time), then live")
@click.option("--from-id", type=click.IntRange(min=1), default=None,
              help="first print stored messages from this id on, then live")
@click.option("--durable", default=None, metavar="NAME",
              help="resume after the last message NAME printed, across restarts")
@setting_options("sub_endpoint", "read_endpoint", "control_endpoint", "notify_endpoint",
                 "proxy_control_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def tail(ctx: click.Context, prefixes: tuple[str, ...], as_json: bool, limit: int | None,
         fail_fast: bool, since: str | None, from_id: int | None, durable: str | None,
         **flags: Any) -> None:
    """Print messages whose topic starts with one of PREFIXES (all if none).

    With --since or --from-id, stored messages come first, then live ones,
    with no gap or duplicate between them for messages with producer meta.
    With --durable NAME, each printed message is acknowledged for NAME and a
    later `tail --durable NAME` resumes after it (a new NAME starts now, or at
    --since / --from-id).
    """
    cfg = build_config(ctx, flags, "tail")
    if since is not None and from_id is not None:
        raise click.UsageError("give --since or --from-id, not both")
    stopped = stop_on_sigterm()
    needed = ["proxy"] + (["reader"] if since or from_id or durable else []) \
        + (["writer"] if durable else [])
    liveness = Liveness(cfg, needed)
    liveness.wait(fail_fast, stopped)
    if stopped():  # SIGTERM while waiting: a clean stop
        return
    try:
        # A durable tail acknowledges a message once its line is written, not
        # when the next one is taken (auto_ack): that one may never be printed.
        sub = Subscriber(prefixes or ("",), cfg, durable=durable, auto_ack=False,
                         since=parse_since(since) if since else None,
                         after_id=from_id - 1 if from_id else None)
    except (BusError, ValueError) as exc:
        raise InputError(str(exc)) from None

    def receive() -> protocol.Message | None:
        if liveness.check() and fail_fast:
            raise InputError(f"not answering: {', '.join(liveness.down)}")
        return sub.receive(timeout=0.2)

    with sub:
        print_messages(iter(receive, False), as_json, limit, stopped, sub.ack)


@main.command(short_help='Print stored messages, oldest first.')
@click.argument("prefixes", nargs=-1)
@click.option("--since", "since", default=None, help="stored since then (10m, 2h, ISO time)")
@click.option("--from-id", type=click.IntRange(min=1), default=None,
              help="stored messages from this id on")
@click.option("--limit", "-n", "limit", type=click.IntRange(min=1), default=None,
              help="print at most this many (default: all, up to the newest)")
@click.option("--last", type=click.IntRange(min=1, max=100_000), default=None,
              help="the newest N matching messages (oldest of them first)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@setting_options("read_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def history(ctx: click.Context, prefixes: tuple[str, ...], since: str | None,
            from_id: int | None, limit: int | None, last: int | None, as_json: bool,
            **flags: Any) -> None:
    """Print stored messages whose topic starts with one of PREFIXES, oldest first.

    From the oldest kept message, or --since / --from-id, to the newest one
    stored when the command reached it, or the --last N; each line shows the
    stored [id].
    """
    cfg = build_config(ctx, flags, "history")
    if sum(option is not None for option in (since, from_id, last)) > 1:
        raise click.UsageError("give one of --since, --from-id and --last")
    if last is not None and limit is not None:
        raise click.UsageError("--last N already says how many: no --limit with it")
    since_ns = since_to_ns(parse_since(since)) if since else None
    with HistoryClient(cfg) as client:
        try:
            after_id = from_id - 1 if from_id else None
            if last is not None:
                after_id = last_window(client, prefixes or ("",), last)
            messages = client.messages(prefixes or ("",), since_ns=since_ns, after_id=after_id,
                                       limit=limit)
            if last is not None:
                messages = iter(collections.deque(messages, maxlen=last))
            if not print_messages(messages, as_json, limit):
                click.echo("no stored message matches"
                           + (f" (prefixes: {', '.join(prefixes)})" if prefixes else ""), err=True)
        except BusError as exc:
            raise InputError(str(exc)) from None


def last_window(client: HistoryClient, prefixes: tuple[str, ...], count: int) -> int:
    """An id after which at least `count` messages match `prefixes` (or 0):
    the window grows back from the newest id until it holds them. The reader
    serves pages forward only."""
    last_id = client.page(("",), limit=1).last_id or 0
    window = count
    while True:
        after_id = max(last_id - window, 0)
        if after_id == 0 or prefixes == ("",):
            return after_id
        found = sum(1 for _ in client.messages(prefixes, after_id=after_id, limit=count))
        if found >= count:
            return after_id
        window *= 4


def request_once(cfg: BusConfig, endpoint: str, cmd: str, args: dict[str, Any] | None = None
                 ) -> Any:
    """One control request; what went wrong as the command's one-line error."""
    with ControlClient(endpoint, timeout_ms=cfg.request_timeout_ms,
                       curve=security.client_keys(cfg)) as client:
        try:
            return client.request(cmd, args)
        except BusError as exc:
            raise InputError(str(exc)) from None


@main.command(short_help='Messages and last activity per topic prefix.')
@click.option("--depth", "-d", type=click.IntRange(1, 16), default=2, show_default=True,
              help="group topics by their first DEPTH dot-separated parts")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@setting_options("read_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def topics(ctx: click.Context, depth: int, as_json: bool, **flags: Any) -> None:
    """Messages and last activity per topic prefix, among the newest
    BUS_HISTORY_SCAN_ROWS stored messages (the reader bounds the scan)."""
    cfg = build_config(ctx, flags, "topics")
    found = request_once(cfg, cfg.read_endpoint, "topics", {"depth": depth})
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'topic prefix':<40} {'messages':>10} {'last id':>12}  last stored")
    for name, count, last_id, last_ns in found["topics"]:
        stored = dt.datetime.fromtimestamp(last_ns / 1e9, dt.timezone.utc)
        click.echo(f"{name:<40} {count:>10,} {last_id:>12,}  {stored:%Y-%m-%d %H:%M:%S}Z")
    if not found["last_id"]:
        counted = "no messages stored"
    elif not found["after_id"]:
        counted = "counted: every stored message"
    else:
        counted = (f"counted: the newest {found['last_id'] - found['after_id']:,} messages, ids "
                   f"{found['after_id'] + 1:,}..{found['last_id']:,} (BUS_HISTORY_SCAN_ROWS)")
    click.echo(counted + (" (the 1,000 most recent prefixes)" if found["truncated"] else ""),
               err=True)


# --- consumers -----------------------------------------------------------------

@main.group(short_help='Durable consumers: list, show, remove.')
def consumers() -> None:
    """Durable consumers: their positions and lag (like `nats consumer`)."""


@consumers.command("ls")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@setting_options("control_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def consumers_ls(ctx: click.Context, as_json: bool, **flags: Any) -> None:
    """Every durable consumer (the 100 most behind), with its position and lag."""
    cfg = build_config(ctx, flags, "consumers")
    reply = request_once(cfg, cfg.control_endpoint, "stats")
    summary = reply.get("consumers") if isinstance(reply, dict) else None
    if not isinstance(summary, dict):
        raise InputError(f"{cfg.control_endpoint} answered, but not as the writer does (is it "
                         "the writer's BUS_CONTROL_ENDPOINT?)")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{'consumer':<32} {'last_id':>12} {'lag':>10}  acknowledged")
    for name, position in summary["positions"].items():
        updated = dt.datetime.fromtimestamp(position["updated_ns"] / 1e9, dt.timezone.utc)
        click.echo(f"{name:<32} {position['last_id']:>12,} {position['lag']:>10,}  "
                   f"{updated:%Y-%m-%d %H:%M:%S}Z")
    click.echo(f"{summary['count']} consumer{'s' if summary['count'] != 1 else ''}", err=True)


@consumers.command("info")
@click.argument("name")
@setting_options("control_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def consumers_info(ctx: click.Context, name: str, **flags: Any) -> None:
    """One consumer's position (JSON); exit 1 if there is none of that name."""
    cfg = build_config(ctx, flags, "consumers")
    found = request_once(cfg, cfg.control_endpoint, "consumer_get", {"consumer": name})
    if not isinstance(found, dict) or found.get("last_id") is None:
        raise InputError(f"no consumer {name!r}")
    click.echo(json.dumps(found, indent=2))


@consumers.command("rm")
@click.argument("name")
@setting_options("control_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def consumers_rm(ctx: click.Context, name: str, **flags: Any) -> None:
    """Delete a consumer's position (with CURVE: an admin key); exit 1 if none."""
    cfg = build_config(ctx, flags, "consumers")
    deleted = request_once(cfg, cfg.control_endpoint, "consumer_delete",
                           {"consumer": name})["deleted"]
    if not deleted:
        raise InputError(f"no consumer {name!r}")
    click.echo(f"deleted consumer {name}", err=True)


# --- producers -----------------------------------------------------------------

# Producers asked for per producers_list request (the writer answers 1000 at most).
PRODUCERS_PAGE = 1000


@main.group(short_help='Producer ids: list, show, free (admins).')
def producers() -> None:
    """Producer ids the writer knows: the key that owns each (CURVE), its
    session (epoch) and sequence numbers. With CURVE, these commands need an
    admin key."""


def key_names(cfg: BusConfig) -> dict[str, list[str]]:
    """public key (z85) -> the list entries it is, e.g. ["publishers/pub1"],
    where this machine's BUS_CURVE_DIR has the lists (else none)."""
    names: dict[str, list[str]] = collections.defaultdict(list)
    if cfg.curve_dir:
        for key in security.listed_keys(cfg.curve_dir):
            if key.public is not None:
                names[key.public].append(f"{key.role}/{key.name}")
    return names


def format_ns(ns: int | None) -> str:
    if not ns:
        return "-"
    return f"{dt.datetime.fromtimestamp(ns / 1e9, dt.timezone.utc):%Y-%m-%d %H:%M:%S}Z"


@producers.command("ls")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@setting_options("control_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def producers_ls(ctx: click.Context, as_json: bool, **flags: Any) -> None:
    """Every producer id, in id order: owner key (its list and name where
    BUS_CURVE_DIR has the lists), epoch, sequence numbers, last seen."""
    cfg = build_config(ctx, flags, "producers")
    listed: list[dict[str, Any]] = []
    after, total = "", 0
    with ControlClient(cfg.control_endpoint, timeout_ms=cfg.request_timeout_ms,
                       curve=security.client_keys(cfg)) as client:
        for _page in range(1_000_000):  # a bound, far above any writer's producers
            try:
                page = client.request("producers_list", {"after": after,
                                                         "limit": PRODUCERS_PAGE})
            except BusError as exc:
                raise InputError(str(exc)) from None
            listed.extend(page["producers"])
            total = page["total"]
            if not page["more"] or not page["producers"]:
                break
            after = page["producers"][-1]["producer"]
    if as_json:
        click.echo(json.dumps({"producers": listed, "total": total}, indent=2))
        return
    names = key_names(cfg)
    click.echo(f"{'producer':<32} {'owner':<40} {'epoch':>6} {'contiguous':>12} "
               f"{'max_seq':>12}  last seen")
    for producer in listed:
        owner = producer["owner"]
        shown = ",".join(names.get(owner, [])) or owner or "-"
        click.echo(f"{producer['producer']:<32} {shown:<40} {producer['epoch']:>6} "
                   f"{producer['contiguous_seq']:>12,} {producer['max_seq']:>12,}  "
                   f"{format_ns(producer['last_seen_ns'])}")
    click.echo(f"{len(listed)} producer{'s' if len(listed) != 1 else ''}"
               + (f" (the writer knows {total})" if total != len(listed) else ""), err=True)


@producers.command("info")
@click.argument("producer")
@setting_options("control_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def producers_info(ctx: click.Context, producer: str, **flags: Any) -> None:
    """One producer id (JSON); exit 1 if the writer knows none of that id."""
    cfg = build_config(ctx, flags, "producers")
    found = request_once(cfg, cfg.control_endpoint, "producer_info", {"producer": producer})
    if not isinstance(found, dict):
        raise InputError(f"no producer {producer!r}")
    if found.get("owner") in (names := key_names(cfg)):
        found["owner_listed_as"] = names[found["owner"]]
    click.echo(json.dumps(found, indent=2))


@producers.command("rm")
@click.argument("producer")
@setting_options("control_endpoint", "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def producers_rm(ctx: click.Context, producer: str, **flags: Any) -> None:
    """Free a producer id for any key (with CURVE: an admin key); exit 1 if
    the writer knows none of that id. Its current session is fenced (a
    Publisher still using it gets ProducerFenced); the id keeps its epoch and
    sequence numbers, so whoever opens it next goes on after them."""
    cfg = build_config(ctx, flags, "producers")
    removed = request_once(cfg, cfg.control_endpoint, "producer_remove", {"producer": producer})
    if not removed.get("removed"):
        raise InputError(f"no producer {producer!r}")
    owner = f"owned by {removed['owner']}" if removed["owner"] else "owned by no key"
    click.echo(f"freed producer {producer} ({owner}): sessions up to epoch {removed['epoch']} "
               f"are fenced; the next producer_open goes on after seq {removed['max_seq']}",
               err=True)


# --- stats ---------------------------------------------------------------------

def processes_option(fn: Callable) -> Callable:
    return click.option("--anchor/--no-anchor", "with_anchor", default=False,
                        help="the anchor worker too (BUS_ANCHOR_CONTROL_ENDPOINT)")(fn)


@main.command()
@processes_option
@click.option("--timeout-ms", type=click.IntRange(min=1, max=60_000), default=1000,
              show_default=True, help="how long each process may take to answer")
@setting_options(*PROCESS_FIELDS.values(), *CURVE_FIELDS)
@click.pass_context
def ping(ctx: click.Context, with_anchor: bool, timeout_ms: int, **flags: Any) -> None:
    """Ping every process at once; exit 1 if any does not answer."""
    cfg = build_config(ctx, flags, "ping")
    names = ["writer", "proxy", "reader"] + (["anchor"] if with_anchor else [])
    answers = ask_all(cfg, names, "ping", timeout_ms)
    for name, (_result, seconds, error) in answers.items():
        endpoint = getattr(cfg, PROCESS_FIELDS[name])
        click.echo(f"{name:<7} {endpoint:<28} " + (f"ok  {seconds * 1000:.1f} ms" if error is None
                                                   else f"DOWN  {error}"))
    sys.exit(1 if any(error for _, _, error in answers.values()) else 0)


@main.command(short_help='Is every process healthy? (what /healthz says)')
@processes_option
@click.option("--timeout-ms", type=click.IntRange(min=1, max=60_000), default=2000,
              show_default=True, help="how long each process may take to answer")
@setting_options(*PROCESS_FIELDS.values(), *CURVE_FIELDS)
@click.pass_context
def health(ctx: click.Context, with_anchor: bool, timeout_ms: int, **flags: Any) -> None:
    """What /healthz says, for every process at once, from their `stats`
    (no HTTP needed); exit 1 if any is down or unhealthy."""
    from anchor.worker import anchor_health
    from proxy.service import proxy_health
    from reader.service import reader_health
    from writer.service import writer_health
    checks: dict[str, Callable[[dict[str, Any]], str | None]] = {
        "writer": writer_health, "proxy": proxy_health,
        "reader": reader_health, "anchor": anchor_health}
    cfg = build_config(ctx, flags, "health")
    names = ["writer", "proxy", "reader"] + (["anchor"] if with_anchor else [])
    answers = ask_all(cfg, names, "stats", timeout_ms)
    bad = False
    for name, (result, _seconds, error) in answers.items():
        reason = error or checks[name](result)
        bad |= reason is not None
        click.echo(f"{name:<7} " + ("ok" if reason is None else f"UNHEALTHY  {reason}"))
    sys.exit(1 if bad else 0)


@main.command(short_help="Every process's metrics (--watch: rates).")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", "-w", "interval", type=FiniteFloat(min=0.1, max=MAX_SECONDS),
              default=None, is_flag=False, flag_value=1.0, metavar="[SECONDS]",
              help="a line of rolling figures every SECONDS (1), like redis-cli --stat")
@setting_options("control_endpoint", "proxy_control_endpoint", "read_endpoint",
                 "request_timeout_ms", *CURVE_FIELDS)
@click.pass_context
def stats(ctx: click.Context, as_json: bool, interval: float | None, **flags: Any) -> None:
    """Show the writer's batch, load, producer and consumer metrics, the
    reader's and the proxy's counters; with --watch, rates every interval
    until Ctrl-C."""
    cfg = build_config(ctx, flags, "stats")
    if interval is not None and as_json:
        raise click.UsageError("--watch prints a table of rates; --json gives one snapshot")
    if interval is not None:
        watch_stats(cfg, interval)
        return
    answers = ask_all(cfg, ["writer", "proxy", "reader"], "stats", cfg.request_timeout_ms)
    result = {name: answer if error is None else {"error": error}
              for name, (answer, _seconds, error) in answers.items()}
    print_sections(result, as_json)
    sys.exit(1 if any(error for _, _, error in answers.values()) else 0)


# (header, width, value from this and the previous answers over `seconds`)
WATCH_COLUMNS: list[tuple[str, int, Callable[[dict, dict, float], str]]] = [
    ("stored/s", 10, lambda a, b, dt: _rate(a, b, dt, "writer", "batch", "total_writes")),
    ("in/s", 9, lambda a, b, dt: _rate(a, b, dt, "writer", "ingest", "messages_received")),
    ("refused/s", 9, lambda a, b, dt: _rate(a, b, dt, "writer", "ingest", "rejected_total")),
    ("buffered", 9, lambda a, b, dt: _value(a, "writer", "batch", "db_queue_size")),
    ("commit_ms", 9, lambda a, b, dt: _value(a, "writer", "batch", "last_flush_ms")),
    ("wal_MB", 7, lambda a, b, dt: _value(a, "writer", "wal", "bytes", scale=1 << 20)),
    # The proxy counts frames (a message is 3), not messages: libzmq's counters.
    ("frames_in/s", 11, lambda a, b, dt: _rate(a, b, dt, "proxy", "frontend_frames_in")),
    ("frames_out/s", 12, lambda a, b, dt: _rate(a, b, dt, "proxy", "backend_frames_out")),
    ("proxy_rss_MB", 12, lambda a, b, dt: _value(a, "proxy", "memory", "rss_bytes",
                                                 scale=1 << 20)),
    ("pages/s", 8, lambda a, b, dt: _rate(a, b, dt, "reader", "requests")),
]


def _dig(answers: dict, *path: str) -> Any:
    value: Any = answers
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _value(answers: dict, *path: str, scale: int = 1) -> str:
    value = _dig(answers, *path)
    return "-" if value is None else f"{value / scale:,.0f}" if scale > 1 else f"{value:,}"


def _rate(now: dict, before: dict, seconds: float, *path: str) -> str:
    a, b = _dig(now, *path), _dig(before, *path)
    return "-" if a is None or b is None else f"{(a - b) / seconds:,.0f}"


def watch_stats(cfg: BusConfig, interval: float) -> None:
    """One line every `interval` until Ctrl-C; "-" for a process that did not
    answer (the line says which)."""
    def sample() -> tuple[dict[str, Any], list[str]]:
        answers = ask_all(cfg, ["writer", "proxy", "reader"], "stats",
                          min(cfg.request_timeout_ms, int(interval * 1000)))
        return ({name: answer for name, (answer, _s, error) in answers.items() if error is None},
                [name for name, (_a, _s, error) in answers.items() if error is not None])

    header = "  ".join(f"{title:>{width}}" for title, width, _ in WATCH_COLUMNS)
    before, _down = sample()
    taken = time.monotonic()
    for line_number in itertools.count():
        time.sleep(max(0.0, taken + interval - time.monotonic()))
        now, down = sample()
        seconds, taken = time.monotonic() - taken, time.monotonic()
        if line_number % 20 == 0:
            click.echo(header)
        click.echo("  ".join(f"{read(now, before, seconds):>{width}}"
                             for _title, width, read in WATCH_COLUMNS)
                   + (f"  (not answering: {', '.join(down)})" if down else ""))
        before = now


# --- keys ----------------------------------------------------------------------

@main.group()
def keys() -> None:
    """CURVE key pairs, in the certificate format of pyzmq's zmq.auth."""


KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_key_name(name: str) -> None:
    if not KEY_NAME.fullmatch(name):
        raise click.BadParameter("letters, digits, '.', '_' and '-' (at most 64)",
                                 param_hint="NAME")


@keys.command("generate")
@click.argument("directory", type=click.Path())
@click.argument("name")
def keys_generate(directory: str, name: str) -> None:
    """Write DIRECTORY/NAME.key (the public key: copy it into the bus's
    publishers/, readers/ or admins/ list) and DIRECTORY/NAME.key_secret (the
    pair: keep it where the client runs; readable by its owner only).

    The bus's own pairs are named `server` and `proxy` in BUS_CURVE_DIR."""
    check_key_name(name)
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise InputError(f"{directory} is not a directory")
    existing = [p for p in (target / f"{name}.key", target / f"{name}.key_secret") if p.exists()]
    if existing:
        click.echo(f"error: {existing[0]} exists; a key is never overwritten", err=True)
        sys.exit(1)
    old_umask = os.umask(0o077)  # the secret file is never readable by others, even briefly
    try:
        target.mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.create_certificates(target, name)
        os.chmod(public, 0o644)
    except OSError as exc:
        raise InputError(f"cannot write keys in {directory}: "
                         f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
                         ) from None
    finally:
        os.umask(old_umask)
    click.echo(f"public key  {public}\nsecret pair {secret}")


@keys.command("ls")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def keys_ls(directory: str, as_json: bool) -> None:
    """Each key of the lists of DIRECTORY (a BUS_CURVE_DIR): admins/,
    publishers/, readers/, by list and name, with its public key."""
    if not Path(directory).is_dir():
        raise InputError(f"{directory} is not a directory (a BUS_CURVE_DIR)")
    listed = security.listed_keys(directory)
    if as_json:
        click.echo(json.dumps([{"list": key.role, "name": key.name, "public_key": key.public,
                                "problem": key.problem} for key in listed], indent=2))
        return
    for key in listed:
        click.echo(f"{key.role:<11} {key.name:<32} {key.public or 'UNREADABLE: ' + str(key.problem)}")
    if not listed:
        click.echo(f"no keys in {directory}/{{{','.join(security.ROLES)}}}/", err=True)


@keys.command("revoke")
@click.argument("directory", type=click.Path())
@click.argument("name")
@click.option("--list", "lists", type=click.Choice(security.ROLES), multiple=True,
              help="only from this list (repeatable; default: every list)")
def keys_revoke(directory: str, name: str, lists: tuple[str, ...]) -> None:
    """Remove NAME.key from the lists of DIRECTORY (a BUS_CURVE_DIR). Running
    bus processes read the lists again within about a second: from then on
    they refuse the key's new connections and answer its requests on the
    connections it has `forbidden` (docs/protocol.md, "Authentication")."""
    check_key_name(name)
    if not Path(directory).is_dir():
        raise InputError(f"{directory} is not a directory (a BUS_CURVE_DIR)")
    removed = []
    roles = lists or security.ROLES
    listed = list(security.listed_keys(directory))
    revoked = {key.public for key in listed
               if key.role in roles and key.name == name and key.public}
    # The key itself is what the lists admit, whatever its file is called: a
    # copy of NAME.key under another name goes too.
    for key in listed:
        if key.role not in roles or not (key.name == name or key.public in revoked):
            continue
        path = Path(directory) / key.role / f"{key.name}.key"
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise InputError(f"cannot remove {path}: {exc.strerror or exc}") from None
        removed.append(key.role)
        click.echo(f"removed {path}" + (f" (public key {key.public})" if key.public else "")
                   + (f": the same key as {name}.key" if key.name != name else ""))
    for role in roles:  # a NAME.key the listing could not read is removed all the same
        path = Path(directory) / role / f"{name}.key"
        if path.exists():
            try:
                path.unlink()
            except OSError as exc:
                raise InputError(f"cannot remove {path}: {exc.strerror or exc}") from None
            removed.append(role)
            click.echo(f"removed {path}")
    if not removed:
        raise InputError(f"no {name}.key in {directory}/"
                         f"{{{','.join(roles)}}}/")


main.add_command(anchor)
main.add_command(audit)
main.add_command(bench)
main.add_command(db)
main.add_command(utxo)

if __name__ == "__main__":
    main()
