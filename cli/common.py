"""What every bus-cli command shares: one flag per setting, the config built
from flags, and printing of nested results."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click
import zmq

from bus import security, sockets
from bus.client import BusError, ControlClient
from bus.config import (SETTINGS, BusConfig, ConfigError, connect_problem, load_config,
                        unknown_variables)
from bus.logging import configure_logging, get_logger

_SETTING = {s.field: s for s in SETTINGS}
# The processes that only bind (their keys come from BUS_CURVE_DIR alone).
SERVER_PROCESSES = ("writer", "proxy", "reader")
# Each process's control endpoint, by the name commands give it.
PROCESS_FIELDS = {"writer": "control_endpoint", "proxy": "proxy_control_endpoint",
                  "reader": "read_endpoint", "anchor": "anchor_control_endpoint"}
PROCESS_TITLES = {"anchor": "anchor worker"}  # in sentences, where the name alone is unclear


def setting_options(*fields: str) -> Callable[[Callable], Callable]:
    """Add one flag per setting, named after the setting (`--pub-endpoint`)."""
    def decorate(fn: Callable) -> Callable:
        for name in reversed(fields):
            s = _SETTING[name]
            flag = name.replace("_", "-")
            decls = [f"--{flag}/--no-{flag}"] if s.type is bool else [f"--{flag}"]
            fn = click.option(*decls, name, default=None, type=s.type,
                              help=f"{s.help} [env {s.env}; default {s.default}]")(fn)
        return fn
    return decorate


def build_config(ctx: click.Context, flags: dict[str, Any], process: str | None = None,
                 client_of: bool = False) -> BusConfig:
    """The command's config from its flags, the environment and the config
    file; what cannot work as one usage error. `process` names the command in
    its logs; `client_of`: the command talks to that process (`anchor submit`
    logs as the anchor worker's part), so the process's own endpoints are
    connected to, not bound, and a wildcard in them is refused too."""
    own = "" if client_of else process
    try:
        cfg = load_config({k: v for k, v in flags.items() if k in _SETTING},
                          config_path=ctx.obj.get("config_path"))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if process not in (None, "up"):  # `config` shows the settings; `up` binds every endpoint
        for name in flags:
            declared = _SETTING.get(name)
            if declared is not None and declared.bound_by not in ("", own) and \
                    (problem := connect_problem(getattr(cfg, name))) is not None:
                raise click.UsageError(f"--{name.replace('_', '-')} ({declared.env}) {problem}")
    configure_logging(cfg.log_level, cfg.log_format, process=process)
    for variable, closest in unknown_variables(os.environ):
        # As an unknown key of the config file is refused; a variable may be
        # meant for something else, so it is named, not refused.
        get_logger("config").warning("unknown_setting", variable=variable, closest=closest)
    if cfg.curve_dir:
        try:  # what is wrong with the keys, as one line, before any socket is opened
            security.load_keyring(cfg.curve_dir)
            if process not in SERVER_PROCESSES:
                security.client_keys(cfg)
        except security.SecurityError as exc:
            raise click.UsageError(str(exc)) from None
    return cfg


@contextlib.contextmanager
def said_if_slow(what: str, after_s: float = 1.0) -> Iterator[threading.Timer]:
    """Say on stderr what the command waits for once it has waited `after_s`
    (a database on a host that does not answer: PostgreSQL's connect timeout):
    no command waits without saying so. Cancel what it yields once the wait
    is over and the block goes on."""
    timer = threading.Timer(after_s, lambda: click.echo(f"waiting for {what} ...", err=True))
    timer.daemon = True
    timer.start()
    try:
        yield timer
    finally:
        timer.cancel()


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def print_sections(result: dict[str, Any], as_json: bool) -> None:
    """{section: map} as indented text, or as JSON."""
    if as_json:
        click.echo(json.dumps(result, indent=2, default=jsonable))
        return
    for name, section in result.items():
        click.echo(f"[{name}]")
        _print_tree(section, "  ")


def _print_tree(data: dict[str, Any], indent: str) -> None:
    for key, value in data.items():
        if key == "config" and indent == "  ":
            continue  # a process's settings: bus-cli config --running shows them
        if isinstance(value, dict) and value:
            click.echo(f"{indent}{key}:")
            _print_tree(value, indent + "  ")
        else:
            click.echo(f"{indent}{key}: {value}")


class FiniteFloat(click.FloatRange):
    """click's FloatRange, refusing NaN (which passes every comparison) and
    the infinities: a timeout of nan waited forever, inf overflowed."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# The longest any timeout or interval may be: about 11 days.
MAX_SECONDS = 1e6


def stop_on_sigterm() -> Callable[[], bool]:
    """SIGTERM asks a long-running command to stop cleanly: finish the message
    at hand, flush, say what was done, exit 0 (as the bus processes do). The
    returned function says whether it was asked."""
    asked = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: asked.set())
    return asked.is_set


class InputError(click.ClickException):
    """Bad input, or a bus that cannot be reached: one line on stderr, exit 1."""

    def __init__(self, message: str) -> None:
        # What a library says can span lines (libpq: "connection ... failed:
        # server closed the connection unexpectedly\n\tThis probably means...").
        super().__init__(" ".join(part.strip() for part in message.splitlines() if part.strip()))


def ask_all(cfg: BusConfig, names: Iterable[str], cmd: str, timeout_ms: int,
            args: dict[str, Any] | None = None
            ) -> dict[str, tuple[Any, float | None, str | None]]:
    """`cmd` to each process at once: {name: (result, seconds, error)}."""
    keys = security.client_keys(cfg)

    def ask(name: str) -> tuple[Any, float | None, str | None]:
        endpoint = getattr(cfg, PROCESS_FIELDS[name])
        started = time.perf_counter()
        with ControlClient(endpoint, timeout_ms=timeout_ms, curve=keys) as client:
            try:
                result = client.request(cmd, args)
            except BusError as exc:
                return None, None, str(exc)
        return result, time.perf_counter() - started, None

    names = list(names)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return dict(zip(names, pool.map(ask, names)))


class Liveness:
    """Whether the processes a command needs answer a ping, said on stderr
    when that changes: a command never waits silently for a process that is
    down (or that refuses its CURVE key)."""

    CHECK_EVERY_S = 5.0

    def __init__(self, cfg: BusConfig, needed: list[str]) -> None:
        self.cfg = cfg
        self.needed = {name: getattr(cfg, PROCESS_FIELDS[name]) for name in needed}
        # What answers no ping: the proxy's subscriber side, checked by a handshake.
        self.streams = {"proxy's subscriber side": cfg.sub_endpoint} if "proxy" in needed else {}
        self.down: dict[str, str] = {}  # name -> why
        self._next_check = 0.0

    def missing(self) -> dict[str, str]:
        """{name: what is wrong} for each needed process or endpoint that does not answer."""
        timeout_ms = min(self.cfg.request_timeout_ms, 1000)
        answers = ask_all(self.cfg, self.needed, "ping", timeout_ms)
        hint = " with CURVE: is this key allowed?" if self.cfg.curve_dir else ""
        missing = {name: f"it does not answer (is bus-{name} running?{hint})"
                   for name, (_result, _seconds, error) in answers.items() if error}
        if not missing:
            ctx = zmq.Context.instance()
            for name, endpoint in self.streams.items():
                error = sockets.handshake_error(ctx, self.cfg, endpoint, timeout_ms / 1000)
                if error:
                    missing[name] = f"{error} (is that the proxy's BUS_SUB_ENDPOINT?)"
        return missing

    def check(self, now: float | None = None) -> list[str]:
        """Ping (at most every CHECK_EVERY_S), say what changed; what is down."""
        now = time.monotonic() if now is None else now
        if now < self._next_check:
            return sorted(self.down)
        self._next_check = now + self.CHECK_EVERY_S
        missing = self.missing()
        endpoints = {**self.needed, **self.streams}
        for name in sorted(missing.keys() - self.down.keys()):
            click.echo(f"waiting for the {PROCESS_TITLES.get(name, name)} at {endpoints[name]}: "
                       f"{missing[name]}", err=True)
        for name in sorted(self.down.keys() - missing.keys()):
            click.echo(f"the {PROCESS_TITLES.get(name, name)} at {endpoints[name]} answers again",
                       err=True)
        self.down = missing
        return sorted(missing)

    def wait(self, fail_fast: bool, stop: Callable[[], bool] = lambda: False) -> None:
        """Return once every needed process answers; with `fail_fast`, exit 1 at once."""
        while self.check() and not stop():
            if fail_fast:
                raise InputError(f"not answering: {', '.join(sorted(self.down))}")
            time.sleep(0.2)


def request_once(cfg: BusConfig, endpoint: str, cmd: str, args: dict[str, Any] | None = None
                 ) -> Any:
    """One control request; what went wrong as the command's one-line error."""
    with ControlClient(endpoint, timeout_ms=cfg.request_timeout_ms,
                       curve=security.client_keys(cfg)) as client:
        try:
            return client.request(cmd, args)
        except BusError as exc:
            raise InputError(str(exc)) from None
