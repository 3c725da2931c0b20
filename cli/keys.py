"""bus-cli keys: CURVE key pairs, and the allow-lists of a BUS_CURVE_DIR."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import click
import zmq.auth

from bus import security
from cli.common import InputError


@click.group()
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
