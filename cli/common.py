"""What every bus-cli command shares: one flag per setting, the config built
from flags, and printing of nested results."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import click

from bus import security
from bus.config import SETTINGS, BusConfig, ConfigError, load_config
from bus.logging import configure_logging

_SETTING = {s.field: s for s in SETTINGS}
# Every command that talks to the bus takes its CURVE keys (bus/security.py).
CURVE_FIELDS = ("curve_dir", "curve_key")
# The processes that only bind (their keys come from BUS_CURVE_DIR alone).
SERVER_PROCESSES = ("writer", "proxy", "reader")


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


def build_config(ctx: click.Context, flags: dict[str, Any], process: str | None = None) -> BusConfig:
    try:
        cfg = load_config({k: v for k, v in flags.items() if k in _SETTING},
                          config_path=ctx.obj.get("config_path"))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    configure_logging(cfg.log_level, cfg.log_format, process=process)
    if cfg.curve_dir:
        try:  # what is wrong with the keys, as one line, before any socket is opened
            security.load_keyring(cfg.curve_dir)
            if process not in SERVER_PROCESSES:
                security.client_keys(cfg)
        except security.SecurityError as exc:
            raise click.UsageError(str(exc)) from None
    return cfg


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
        if isinstance(value, dict) and value and key != "config":
            click.echo(f"{indent}{key}:")
            _print_tree(value, indent + "  ")
        elif key != "config":
            click.echo(f"{indent}{key}: {value}")
