"""bus-cli purge: delete the stored messages of a topic prefix (the writer's
admin command `purge`, like NATS `stream purge --subject` or Redis `XTRIM`)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import click

from bus import protocol
from bus.client import since_to_ns
from bus.config import role_fields
from cli.common import InputError, build_config, request_once, setting_options
from cli.messages import parse_since


def parse_before(text: str) -> dict[str, int]:
    """--before: a message id (digits), or a time: a duration ago (10m, 2h, 1d)
    or an ISO 8601 time (UTC if no zone). As the purge request's arguments."""
    if text.strip().isdigit():
        before_id = int(text)
        if not 1 <= before_id <= protocol.MAX_INT64:
            raise click.BadParameter(f"{text!r}: an id is 1 to 2^63-1", param_hint="--before")
        return {"before_id": before_id}
    try:
        return {"before_ns": since_to_ns(parse_since(text))}
    except click.BadParameter as exc:
        exc.param_hint = "--before"
        raise
    except (OverflowError, ValueError) as exc:
        raise click.BadParameter(f"{text!r}: {exc}", param_hint="--before") from None


def describe(prefix: str, before: str | None) -> str:
    what = f"topics starting with {prefix!r}" if prefix else "every topic"
    if before is None:
        return what
    if before.strip().isdigit():
        return what + f", ids below {before.strip()}"
    # parse_before has read it already: a duration ago, or a time.
    ago = isinstance(parse_since(before), dt.timedelta)
    return what + (f", committed more than {before.strip()} ago" if ago
                   else f", committed before {before}")


def is_purge_reply(reply: Any) -> bool:
    """Whether `reply` has the writer's purge reply's fields and types (whoever
    bound the endpoint wrote it)."""
    def integer(value: Any) -> bool:
        return type(value) is int
    return (isinstance(reply, dict) and integer(reply.get("deleted"))
            and isinstance(reply.get("more"), bool) and integer(reply.get("after_id"))
            and integer(reply.get("upto"))
            and (reply.get("newest_kept") is None or integer(reply["newest_kept"])))


@click.command(short_help="Delete the stored messages of a topic prefix (admin).")
@click.argument("prefix")
@click.option("--before", "before", default=None, metavar="ID|TIME",
              help="only messages with an id below ID, or committed before TIME "
                   "(a duration ago: 10m, 2h, 1d; or an ISO 8601 time, UTC if no zone)")
@click.option("--yes", "-y", "yes", is_flag=True, help="do not ask for confirmation")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@setting_options(*role_fields("writer_client", "curve"))
@click.pass_context
def purge(ctx: click.Context, prefix: str, before: str | None, yes: bool, as_json: bool,
          **flags: Any) -> None:
    """Delete the stored messages whose topic starts with PREFIX ('' for
    every topic), all or those --before an id or a time; with CURVE, an admin
    key. Asks first unless --yes (without a terminal, --yes is required).

    Kept: the messages of sealed topics (BUS_AUDIT_PREFIXES; a prefix that
    covers one is refused: they leave by retention only) and the newest
    stored message (ids are never reused). Durable consumers and history
    readers skip what is gone."""
    if protocol.is_reserved(prefix):  # the writer would refuse it: a usage error, said here
        raise click.UsageError(f"topics starting with {protocol.RESERVED_PREFIX!r} are never "
                               "stored: nothing to purge")
    cfg = build_config(ctx, flags, "purge")
    args: dict[str, Any] = {"prefix": prefix, **(parse_before(before) if before else {})}
    what = describe(prefix, before)
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("no terminal to confirm the purge on: add --yes")
        if not click.confirm(f"Delete the stored messages of {what}?", default=False):
            raise InputError("nothing purged")
    deleted, reply = 0, None
    while True:
        reply = request_once(cfg, cfg.control_endpoint, "purge", args)
        if not is_purge_reply(reply):
            raise InputError(f"{cfg.control_endpoint} answered, but not as the writer does (is "
                             "it the writer's BUS_CONTROL_ENDPOINT?)")
        deleted += reply["deleted"]
        if not reply["more"]:
            break
        if reply["after_id"] <= args.get("after_id", -1):  # a writer that does not move on
            raise InputError(f"the writer's purge made no progress past id {reply['after_id']}")
        # On from where it got, up to the same id: what is stored meanwhile stays.
        args = {"prefix": prefix, "before_id": reply["upto"] + 1, "after_id": reply["after_id"]}
    kept = reply["newest_kept"]
    if as_json:
        click.echo(json.dumps({"prefix": prefix, "deleted": deleted, "upto": reply["upto"],
                               "newest_kept": kept}))
        return
    note = f" (kept the newest message, id {kept:,}: ids are never reused)" if kept else ""
    click.echo(f"purged {deleted:,} message{'s' if deleted != 1 else ''} of {what}{note}")
