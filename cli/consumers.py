"""bus-cli consumers: durable consumers' positions and lag (ls, info, rm)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click

from bus.config import role_fields
from cli.common import InputError, build_config, request_once, setting_options


@click.group(short_help='Durable consumers: list, show, remove.')
def consumers() -> None:
    """Durable consumers: their positions and lag (like `nats consumer`)."""


@consumers.command("ls")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@setting_options(*role_fields("writer_client", "curve"))
@click.pass_context
def consumers_ls(ctx: click.Context, as_json: bool, **flags: Any) -> None:
    """Every durable consumer (the 100 most behind), with its position and lag:
    the messages of its prefixes stored after its position, counted among the
    next 10,000 ids (">=N": it is further behind than that; "?": the database
    could not say), and how many ids of every topic are stored after it
    (behind)."""
    cfg = build_config(ctx, flags, "consumers")
    reply = request_once(cfg, cfg.control_endpoint, "stats")
    summary = reply.get("consumers") if isinstance(reply, dict) else None
    if not isinstance(summary, dict):
        raise InputError(f"{cfg.control_endpoint} answered, but not as the writer does (is it "
                         "the writer's BUS_CONTROL_ENDPOINT?)")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    # `behind`: every topic's ids after the position. Beside a lag that is a
    # lower bound (">=0" for a quiet prefix on a busy bus), it says how far
    # the count would have to go.
    click.echo(f"{'consumer':<32} {'last_id':>12} {'lag':>10} {'behind':>12}  acknowledged")
    for name, position in summary["positions"].items():
        updated = dt.datetime.fromtimestamp(position["updated_ns"] / 1e9, dt.timezone.utc)
        behind = position.get("behind")
        click.echo(f"{name:<32} {position['last_id']:>12,} {shown_lag(position):>10} "
                   f"{'?' if behind is None else f'{behind:,}':>12}  "
                   f"{updated:%Y-%m-%d %H:%M:%S}Z")
    click.echo(f"{summary['count']} consumer{'s' if summary['count'] != 1 else ''}", err=True)


def shown_lag(position: dict[str, Any]) -> str:
    """A consumer's lag as `consumers ls` prints it (a writer from before
    lag_exact counted exactly, if on every topic)."""
    lag = position.get("lag")
    if lag is None:
        return "?"
    return f"{lag:,}" if position.get("lag_exact", True) else f">={lag:,}"


@consumers.command("info")
@click.argument("name")
@setting_options(*role_fields("writer_client", "curve"))
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
@setting_options(*role_fields("writer_client", "curve"))
@click.pass_context
def consumers_rm(ctx: click.Context, name: str, **flags: Any) -> None:
    """Delete a consumer's position (with CURVE: an admin key); exit 1 if none."""
    cfg = build_config(ctx, flags, "consumers")
    deleted = request_once(cfg, cfg.control_endpoint, "consumer_delete",
                           {"consumer": name})["deleted"]
    if not deleted:
        raise InputError(f"no consumer {name!r}")
    click.echo(f"deleted consumer {name}", err=True)
