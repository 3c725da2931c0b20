"""bus-cli tokens: the WebSocket gateway's tokens (bus/tokens.py), one file
each in a BUS_GATEWAY_TOKENS_DIR."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from bus import security
from bus import tokens as token_files
from cli.common import InputError


@click.group()
def tokens() -> None:
    """The gateway's tokens: who may use it (its WebSocket clients), and for what."""


def _check_name(name: str) -> None:
    if not token_files.TOKEN_NAME.fullmatch(name):
        raise click.BadParameter("letters, digits, '.', '_' and '-' (at most 64)",
                                 param_hint="NAME")


@tokens.command("generate")
@click.argument("directory", type=click.Path())
@click.argument("name")
@click.option("--list", "lists", type=click.Choice(security.ROLES), multiple=True,
              help="publishers (may publish), readers (may read), admins (both, and the "
                   "console's stats); repeatable, at least one")
@click.option("--publish", "publish", multiple=True, metavar="PREFIX",
              help="a topic prefix it may publish to (repeatable; '' for every topic)")
@click.option("--read", "read", multiple=True, metavar="PREFIX",
              help="a topic prefix it may read (repeatable; '' for every topic)")
@click.option("--connections", "connections", type=click.IntRange(0, 1 << 20), default=0,
              show_default=True, help="connections it may have open (0: the gateway's "
                                      "BUS_GATEWAY_MAX_CONNECTIONS_PER_TOKEN)")
def tokens_generate(directory: str, name: str, lists: tuple[str, ...], publish: tuple[str, ...],
                    read: tuple[str, ...], connections: int) -> None:
    """Write DIRECTORY/NAME.json for a new token and print the token, once:
    only its SHA-256 is kept. A running gateway takes it within a second."""
    _check_name(name)
    if not lists:
        raise click.UsageError(f"give --list at least once ({', '.join(security.ROLES)})")
    if Path(directory).exists() and not Path(directory).is_dir():
        raise InputError(f"{directory} is not a directory")
    try:
        secret, path = token_files.generate(directory, name, lists, publish, read,
                                            connections, time.time_ns())
    except FileExistsError:
        click.echo(f"error: {directory}/{name}.json exists; a token is never overwritten "
                   "(revoke it first)", err=True)
        sys.exit(1)
    except token_files.TokenFileError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise InputError(f"cannot write {directory}/{name}.json: {exc.strerror or exc}") from None
    click.echo(f"token {secret}\nfile  {path}\n(shown once: only its hash is stored)")
    may_read = bool({"readers", "admins"} & set(lists))
    may_publish = bool({"publishers", "admins"} & set(lists))
    if may_read and not read:
        click.echo("note: no --read prefix: it may read no topic ('--read \"\"' for every one)",
                   err=True)
    if may_publish and not publish:
        click.echo("note: no --publish prefix: it may publish to no topic ('--publish \"\"' for "
                   "every one)", err=True)


@tokens.command("ls")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def tokens_ls(directory: str, as_json: bool) -> None:
    """Each token of DIRECTORY: its lists and prefixes."""
    if not Path(directory).is_dir():
        raise InputError(f"{directory} is not a directory (a BUS_GATEWAY_TOKENS_DIR)")
    found = token_files.listed(directory)
    if as_json:
        click.echo(json.dumps([
            {"file": entry.path.name, "problem": entry.problem} if entry.token is None else
            {"name": entry.token.name, "lists": list(entry.token.lists),
             "publish": list(entry.token.publish), "read": list(entry.token.read),
             "max_connections": entry.token.max_connections} for entry in found], indent=2))
        return
    for entry in found:
        token = entry.token
        if token is None:
            click.echo(f"{entry.path.name:<32} UNREADABLE: {entry.problem}")
            continue
        click.echo(f"{token.name:<32} {','.join(token.lists):<28} "
                   f"publish {','.join(map(repr, token.publish)) or '-'}  "
                   f"read {','.join(map(repr, token.read)) or '-'}")
    if not found:
        click.echo(f"no tokens in {directory}", err=True)


@tokens.command("revoke")
@click.argument("directory", type=click.Path())
@click.argument("name")
def tokens_revoke(directory: str, name: str) -> None:
    """Remove NAME's token. A running gateway reads the directory again
    within about a second and closes the token's connections (1008)."""
    _check_name(name)
    path = Path(directory) / f"{name}.json"
    try:
        path.unlink()
    except FileNotFoundError:
        click.echo(f"error: no token {name} in {directory}", err=True)
        sys.exit(1)
    except OSError as exc:
        raise InputError(f"cannot remove {path}: {exc.strerror or exc}") from None
    click.echo(f"revoked {name}")
