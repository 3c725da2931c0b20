"""bus-cli producers: the producer ids the writer knows (ls, info, rm)."""

from __future__ import annotations

import collections
import datetime as dt
import json
from typing import Any

import click

from bus import security
from bus.client import BusError, ControlClient
from bus.config import BusConfig, role_fields
from cli.common import InputError, build_config, request_once, setting_options

# Producers asked for per producers_list request (the writer answers 1000 at most).
PRODUCERS_PAGE = 1000


@click.group(short_help='Producer ids: list, show, free (admins).')
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
@setting_options(*role_fields("writer_client", "curve"))
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
@setting_options(*role_fields("writer_client", "curve"))
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
@setting_options(*role_fields("writer_client", "curve"))
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
