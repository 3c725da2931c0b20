"""bus-cli publish | tail | history | topics: messages in and out of the bus."""

from __future__ import annotations

import base64
import collections
import datetime as dt
import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click
import msgpack

from bus import protocol
from bus.client import BusError, HistoryClient, Publisher, Subscriber, since_to_ns
from bus.config import role_fields
from cli.common import (MAX_SECONDS, FiniteFloat, InputError, Liveness, build_config, jsonable,
                        request_once, setting_options, stop_on_sigterm)


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


ENCODINGS_GIVEN = "publish_encodings"


def _encoding_given(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--raw, --json, --msgpack: which were given (publish refuses two)."""
    if value:
        ctx.meta.setdefault(ENCODINGS_GIVEN, []).append(param.name)


def _producer_id_given(_ctx: click.Context, _param: click.Parameter, value: str | None
                       ) -> str | None:
    """A producer id the writer takes, or a usage error before anything is sent."""
    if value is not None and not protocol.is_producer_id(value):
        raise click.BadParameter(f"must be 1-{protocol.MAX_PRODUCER_CHARS} characters, no NUL "
                                 f"(given {len(value)})")
    return value


@click.command(short_help="Publish DATA, a file, or standard input's lines.")
@click.argument("topic")
@click.argument("data", required=False)
@click.option("--file", "-f", "path", type=click.Path(exists=True, dir_okay=False, readable=True,
                                                      allow_dash=True),
              default=None, help="publish the whole file as one message (binary-safe; - for "
                                 "standard input)")
@click.option("--raw", "raw", is_flag=True, expose_value=False, callback=_encoding_given,
              help="payload is DATA's bytes (default; text/plain if UTF-8, else "
                   "application/octet-stream)")
@click.option("--json", "json", is_flag=True, expose_value=False, callback=_encoding_given,
              help="DATA is JSON; payload is JSON")
@click.option("--msgpack", "msgpack", is_flag=True, expose_value=False, callback=_encoding_given,
              help="DATA is JSON; payload is its msgpack encoding")
@click.option("--count", "-c", type=click.IntRange(min=1), default=1,
              help="publish DATA this many times")
@click.option("--rate", "-r", type=FiniteFloat(min=0, max=1e7), default=0.0,
              help="messages per second with --count (0: as fast as possible)")
@click.option("--producer-id", default=None, callback=_producer_id_given,
              help=f"producer id in meta, 1-{protocol.MAX_PRODUCER_CHARS} characters "
                   "(default: host-pid-random)")
@click.option("--header", "-H", multiple=True, help="KEY=VALUE header in meta (repeatable)")
@click.option("--wait", is_flag=True,
              help="exit 0 only once the writer has committed every message")
@click.option("--wait-timeout", type=FiniteFloat(min=0, min_open=True, max=MAX_SECONDS),
              default=10.0,
              show_default=True,
              help="seconds --wait waits for the commit acknowledgements")
@setting_options(*role_fields("publisher", "curve"))
@click.pass_context
def publish(ctx: click.Context, topic: str, data: str | None, path: str | None,
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
    given = ctx.meta.get(ENCODINGS_GIVEN, [])
    if len(given) > 1:  # each was a flag_value of one option: the last won, silently
        raise click.UsageError(f"give one of --raw, --json and --msgpack, not "
                               f"{' and '.join('--' + name for name in given)}")
    encoding = given[0] if given else "raw"
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


# What a terminal would act on rather than show: C0 controls but tab (ESC
# starts the sequences that recolour, clear or retitle it; CR and newline
# overwrite or forge lines), DEL, the C1 controls (0x9b is an 8-bit CSI) and
# the bidirectional overrides that reorder what is shown.
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f"
                              "\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str) -> str:
    """`text` with every character a terminal would act on shown escaped
    (\\x1b, \\u202e) instead (issue 25: a published topic or payload cleared
    the screen of whoever ran history or tail)."""
    return _TERMINAL_UNSAFE.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def format_line(msg: protocol.Message, safe: bool = False) -> str:
    """One message as a line; `safe`: for a terminal (terminal_safe)."""
    ts = msg.time_ns or msg.committed_ns or time.time_ns()
    when = dt.datetime.fromtimestamp(ts / 1e9, dt.timezone.utc).isoformat(timespec="milliseconds")
    kind, value = decode_payload(msg)
    shown = json.dumps(value, default=jsonable) if kind == "value" else \
        (value if kind == "text" else f"base64:{value}")
    origin = f" {msg.producer}#{msg.seq}" if msg.producer else ""
    stored = f" [{msg.id}]" if msg.id is not None else ""
    line = f"{when.replace('+00:00', 'Z')}{stored} {msg.topic}{origin} {shown}"
    return terminal_safe(line) if safe else line


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
                   printed: Callable[[protocol.Message], None] = lambda msg: None,
                   raw: bool = False) -> int:
    """Print messages until `limit`, `stop()` or the end; None items are waits.
    `printed(msg)` follows each line that reached standard output: a durable
    tail acknowledges there, so a message taken but not written (Ctrl-C, a
    closed pipe) is not acknowledged. The limit is checked before the next
    message is taken. Lines to a terminal have their control characters
    escaped unless `raw` (JSON escapes them itself). A closed standard
    output (`| head`) ends the command with 141 (cli/main.BusCli)."""
    safe = not raw and sys.stdout.isatty()
    fmt = format_json if as_json else (lambda msg: format_line(msg, safe))
    shown = 0
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
    return shown


# tail's, history's and topics' --raw (what a terminal gets escaped: terminal_safe).
raw_option = click.option(
    "--raw", is_flag=True,
    help="print control characters of topics and payloads as they are (a terminal gets them "
         "escaped, \\x1b; a pipe gets them as they are)")


@click.command(short_help='Print messages as they pass (--since: stored first).')
@click.argument("prefixes", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.option("-n", "--count", "limit", type=click.IntRange(min=1), default=None,
              help="stop after this many messages")
@click.option("--fail-fast", is_flag=True,
              help="exit 1 when a process tail needs does not answer, instead of waiting")
@click.option("--timeout", type=FiniteFloat(min=0, max=MAX_SECONDS), default=None,
              metavar="SECONDS",
              help="stop after SECONDS (exit 0); with -n N, exit 1 if fewer than N came")
@click.option("--since", "since", default=None,
              help="first print what was stored since then (10m, 2h, ISO time), then live")
@click.option("--from-id", type=click.IntRange(min=1), default=None,
              help="first print stored messages from this id on, then live")
@click.option("--durable", default=None, metavar="NAME",
              help="resume after the last message NAME printed, across restarts")
@raw_option
@setting_options(*role_fields("subscriber", "reader_client", "proxy_client", "curve"))
@click.pass_context
def tail(ctx: click.Context, prefixes: tuple[str, ...], as_json: bool, limit: int | None,
         fail_fast: bool, timeout: float | None, since: str | None, from_id: int | None,
         durable: str | None, raw: bool, **flags: Any) -> None:
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
    asked_to_stop = stop_on_sigterm()
    deadline = None if timeout is None else time.monotonic() + timeout

    def stopped() -> bool:  # SIGTERM, or --timeout reached
        return asked_to_stop() or (deadline is not None and time.monotonic() >= deadline)

    needed = ["proxy"] + (["reader"] if since or from_id or durable else []) \
        + (["writer"] if durable else [])
    liveness = Liveness(cfg, needed)
    liveness.wait(fail_fast, stopped)
    if stopped():  # SIGTERM (or the timeout) while waiting: a clean stop
        missing_after_timeout(0, limit, timeout, asked_to_stop())
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
        shown = print_messages(iter(receive, False), as_json, limit, stopped, sub.ack, raw)
    missing_after_timeout(shown, limit, timeout, asked_to_stop())


def missing_after_timeout(shown: int, limit: int | None, timeout: float | None,
                          sigterm: bool) -> None:
    """tail --timeout with -n N: fewer than N messages is a failure (exit 1)."""
    if timeout is not None and limit is not None and shown < limit and not sigterm:
        raise InputError(f"{shown} of {limit} message{'s' if limit != 1 else ''} within "
                         f"--timeout {timeout:g}s")


@click.command(short_help='Print stored messages, oldest first.')
@click.argument("prefixes", nargs=-1)
@click.option("--since", "since", default=None, help="stored since then (10m, 2h, ISO time)")
@click.option("--from-id", type=click.IntRange(min=1), default=None,
              help="stored messages from this id on")
@click.option("--limit", "-n", "limit", type=click.IntRange(min=1), default=None,
              help="print at most this many (default: all, up to the newest)")
@click.option("--last", type=click.IntRange(min=1, max=100_000), default=None,
              help="the newest N matching messages (oldest of them first)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@raw_option
@setting_options(*role_fields("reader_client", "curve"))
@click.pass_context
def history(ctx: click.Context, prefixes: tuple[str, ...], since: str | None,
            from_id: int | None, limit: int | None, last: int | None, as_json: bool,
            raw: bool, **flags: Any) -> None:
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
            if not print_messages(messages, as_json, limit, raw=raw):
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


@click.command(short_help='Messages and last activity per topic prefix.')
@click.option("--depth", "-d", type=click.IntRange(1, 16), default=2, show_default=True,
              help="group topics by their first DEPTH dot-separated parts")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@raw_option
@setting_options(*role_fields("reader_client", "curve"))
@click.pass_context
def topics(ctx: click.Context, depth: int, as_json: bool, raw: bool, **flags: Any) -> None:
    """Messages and last activity per topic prefix, among the newest
    BUS_HISTORY_SCAN_ROWS stored messages (the reader bounds the scan)."""
    cfg = build_config(ctx, flags, "topics")
    found = request_once(cfg, cfg.read_endpoint, "topics", {"depth": depth})
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"{'topic prefix':<40} {'messages':>10} {'last id':>12}  last stored")
    safe = not raw and sys.stdout.isatty()  # a topic is the publisher's text (terminal_safe)
    for name, count, last_id, last_ns in found["topics"]:
        name = terminal_safe(name) if safe else name
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
