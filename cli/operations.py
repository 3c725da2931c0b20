"""bus-cli config | ping | health | stats: what the processes are set to and
how they are doing. The health rules are the processes' own (ROLE/health.py,
what their /healthz says), imported without the processes themselves."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from bus.config import SETTINGS, BusConfig, role_fields
from cli.common import (MAX_SECONDS, PROCESS_FIELDS, FiniteFloat, ask_all, build_config,
                        jsonable, print_sections, setting_options)
from cli.messages import terminal_safe


def processes_option(fn: Callable) -> Callable:
    return click.option("--anchor/--no-anchor", "with_anchor", default=False,
                        help="the anchor worker too (BUS_ANCHOR_CONTROL_ENDPOINT)")(fn)


@click.command("config", short_help="Every setting's value and where it came from.")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.option("--running", is_flag=True,
              help="the settings each running process uses (its `config`), not this shell's")
@processes_option
@setting_options(*(s.field for s in SETTINGS))
@click.pass_context
def show_config(ctx: click.Context, as_json: bool, running: bool, with_anchor: bool,
                **flags: Any) -> None:
    """Print every setting's effective value and where it came from (flag,
    environment, config file, default); secrets as ***. With --running, ask
    the writer, proxy and reader (--anchor: the anchor worker too) for the
    settings they run with, which may differ from this shell's: exit 1 if one
    does not answer."""
    cfg = build_config(ctx, flags, "config" if running else None)  # --running connects
    if running:
        show_running_config(cfg, ["writer", "proxy", "reader"] + ["anchor"] * with_anchor,
                            as_json)
        return
    public = cfg.public()
    if as_json:
        click.echo(json.dumps({s.env: {"value": public[s.env], "from": cfg.origins[s.field]}
                               for s in SETTINGS}, indent=2))
        return
    width = max(len(s.env) for s in SETTINGS)
    for s in SETTINGS:
        click.echo(f"{s.env:<{width}}  {public[s.env]!s:<28}  {cfg.origins[s.field]}")


def shown(value: Any) -> str:
    """What a process answered, as a line may show it: whoever bound the
    endpoint wrote it, so nothing in it may drive the terminal."""
    return terminal_safe(str(value))


def answered_json(answers: dict[str, Any]) -> str:
    """Answers as JSON, whatever types they hold (bytes as everywhere in
    bus-cli's JSON, anything else as its repr; a key that is no string, left
    out)."""
    return json.dumps(answers, indent=2, skipkeys=True,
                      default=lambda value: jsonable(value) if isinstance(value, bytes)
                      else repr(value))


def _config_answer(result: Any, error: str | None) -> tuple[Any, str | None]:
    """A `config` reply that is no map of settings maps (not a bus process's)
    counts as an error."""
    settings = result.get("settings") if isinstance(result, dict) else None
    if error is None and not (isinstance(settings, dict)
                              and all(isinstance(s, dict) for s in settings.values())):
        return None, "the answer is no map of settings (is a bus process at that endpoint?)"
    return result, error


def show_running_config(cfg: BusConfig, names: list[str], as_json: bool) -> None:
    """Each process's own settings and their origins, from its `config` command."""
    answers = {name: _config_answer(result, error) for name, (result, _seconds, error)
               in ask_all(cfg, names, "config", cfg.request_timeout_ms).items()}
    if as_json:
        click.echo(answered_json({name: {"error": error} if error else result
                                  for name, (result, error) in answers.items()}))
    else:
        for name, (result, error) in answers.items():
            click.echo(f"# {name}: " + (f"DOWN  {shown(error)}" if error else
                                        f"{shown(result.get('process'))}, from "
                                        f"{shown(result.get('source'))}"))
            settings = (result or {}).get("settings", {})
            width = max((len(shown(env)) for env in settings), default=0)
            for env, setting in settings.items():
                click.echo(f"{shown(env):<{width}}  {shown(setting.get('value')):<28}  "
                           f"{shown(setting.get('from'))}")
    sys.exit(1 if any(error for _, error in answers.values()) else 0)


@click.command()
@processes_option
@click.option("--timeout-ms", type=click.IntRange(min=1, max=60_000), default=1000,
              show_default=True, help="how long each process may take to answer")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@setting_options(*role_fields("prober", "curve"))
@click.pass_context
def ping(ctx: click.Context, with_anchor: bool, timeout_ms: int, as_json: bool,
         **flags: Any) -> None:
    """Ping every process at once, with the version and revision each runs;
    exit 1 if any does not answer."""
    cfg = build_config(ctx, flags, "ping")
    names = ["writer", "proxy", "reader"] + (["anchor"] if with_anchor else [])
    answers = ask_all(cfg, names, "ping", timeout_ms, {"about": True})
    if as_json:
        click.echo(answered_json({name: {"error": error} if error else
                                  {"ms": round(seconds * 1000, 3),
                                   **(result if isinstance(result, dict) else {})}
                                  for name, (result, seconds, error) in answers.items()}))
        sys.exit(1 if any(error for _, _, error in answers.values()) else 0)
    for name, (result, seconds, error) in answers.items():
        endpoint = getattr(cfg, PROCESS_FIELDS[name])
        # A process of a bus before `about` answers "pong" alone.
        built = (f"  {shown(result.get('version'))} {shown(str(result.get('revision'))[:12])}"
                 f"  pid {shown(result.get('pid'))}"
                 if isinstance(result, dict) else "  (version unknown: an older bus)")
        click.echo(f"{name:<7} {endpoint:<28} " + (f"ok  {seconds * 1000:.1f} ms{built}"
                                                   if error is None else f"DOWN  {shown(error)}"))
    sys.exit(1 if any(error for _, _, error in answers.values()) else 0)


@click.command(short_help='Is every process healthy? (what /healthz says)')
@processes_option
@click.option("--timeout-ms", type=click.IntRange(min=1, max=60_000), default=2000,
              show_default=True, help="how long each process may take to answer")
@click.option("--json", "as_json", is_flag=True,
              help='one JSON object: {process: {"healthy": bool, "reason": str or null}}')
@setting_options(*role_fields("prober", "curve"))
@click.pass_context
def health(ctx: click.Context, with_anchor: bool, timeout_ms: int, as_json: bool,
           **flags: Any) -> None:
    """What /healthz says, for every process at once, from their `stats`
    (no HTTP needed); exit 1 if any is down or unhealthy."""
    from anchor.health import anchor_health
    from proxy.health import proxy_health
    from reader.health import reader_health
    from writer.health import writer_health
    checks: dict[str, Callable[[dict[str, Any]], str | None]] = {
        "writer": writer_health, "proxy": proxy_health,
        "reader": reader_health, "anchor": anchor_health}
    cfg = build_config(ctx, flags, "health")
    names = ["writer", "proxy", "reader"] + (["anchor"] if with_anchor else [])
    answers = ask_all(cfg, names, "stats", timeout_ms)
    reasons: dict[str, str | None] = {}
    for name, (result, _seconds, error) in answers.items():
        try:
            reasons[name] = error or checks[name](result)
        except (KeyError, TypeError, AttributeError, ValueError):
            reasons[name] = f"what answered is not a bus {name}'s stats (another process " \
                            f"at {getattr(cfg, PROCESS_FIELDS[name])}?)"
    if as_json:
        click.echo(json.dumps({name: {"healthy": reason is None, "reason": reason}
                               for name, reason in reasons.items()}, indent=2, default=str))
    else:
        for name, reason in reasons.items():
            click.echo(f"{name:<7} " + ("ok" if reason is None else
                                        f"UNHEALTHY  {shown(reason)}"))
    sys.exit(1 if any(reason is not None for reason in reasons.values()) else 0)


@click.command(short_help="Every process's metrics (--watch: rates).")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", "-w", "interval", type=FiniteFloat(min=0.1, max=MAX_SECONDS),
              default=None, is_flag=False, flag_value=1.0, metavar="[SECONDS]",
              help="a line of rolling figures every SECONDS (1), like redis-cli --stat")
@setting_options(*role_fields("writer_client", "proxy_client", "reader_client", "curve"))
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
    failed = {name: error or (None if isinstance(answer, dict) else
                              "what answered is not a stats map (another process at "
                              f"{getattr(cfg, PROCESS_FIELDS[name])}?)")
              for name, (answer, _seconds, error) in answers.items()}
    result = {name: answer if failed[name] is None else {"error": failed[name]}
              for name, (answer, _seconds, _error) in answers.items()}
    if as_json:
        click.echo(answered_json(result))
    else:
        print_sections(printable(result), as_json=False)
    sys.exit(1 if any(failed.values()) else 0)


def printable(value: Any) -> Any:
    """What processes answered, fit for a terminal: every string and key made
    safe (whoever bound an endpoint wrote it)."""
    if isinstance(value, dict):
        return {shown(key): printable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [printable(item) for item in value]
    if isinstance(value, (str, bytes)):
        return shown(value)
    return value


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
