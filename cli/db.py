"""bus-cli db: the database's schema and its copy to another engine.

    bus-cli db migrate                     bring the schema up to this version's
    bus-cli db copy --from SRC --to DST    copy (or resume copying) a bus database

SRC and DST are what BUS_DB takes: a SQLite file (or sqlite:///PATH) or a
postgresql:// URL.
"""

from __future__ import annotations

from typing import Any

import click

import storage
from bus import pgurl
from bus.config import database_problem, role_fields
from bus.runner import StartupError
from cli.common import InputError, build_config, said_if_slow, setting_options
from storage import schema


@click.group()
def db() -> None:
    """The database: migrate its schema, copy it to another engine."""


@db.command()
@setting_options(*role_fields("database"))
@click.pass_context
def migrate(ctx: click.Context, **flags: Any) -> None:
    """Bring the schema up to this version's, in one transaction (a writer
    does the same when it starts), or say why not: a newer schema, a writer
    running on it."""
    cfg = build_config(ctx, flags, "db")
    try:
        with said_if_slow(storage.describe(cfg.db)):
            before = storage.schema_version(cfg.db)
            storage.open_store(cfg.db, busy_timeout_ms=cfg.sqlite_busy_timeout_ms).close()
    except StartupError as exc:
        raise InputError(str(exc)) from None
    where = storage.describe(cfg.db)
    if before == schema.SCHEMA_VERSION:
        click.echo(f"{where}: schema {before}, this version's: nothing to do")
    else:
        click.echo(f"{where}: schema {before if before is not None else '(none: new)'} -> "
                   f"{schema.SCHEMA_VERSION}")


@db.command("copy")
@click.option("--from", "source", required=True, metavar="SRC",
              help="the database to copy: a SQLite file (sqlite:///PATH) or postgresql:// URL")
@click.option("--to", "dest", required=True, metavar="DST",
              help="where to: created if new; a copy that stopped is resumed")
@click.option("--chunk-rows", type=click.IntRange(100, 100_000), default=5000, show_default=True,
              help="messages per transaction")
@click.pass_context
def copy(ctx: click.Context, source: str, dest: str, chunk_rows: int) -> None:
    """Copy every message (with its id) and every other table from SRC to
    DST, then verify: the same number of messages, the same last id, and per
    producer the same count and range of sequence numbers. Resumable: run it
    again after it stopped, it goes on after the last message DST has. No
    writer may run on either: DST's lock is taken, and a source with a running
    writer is refused (its producer ledger would run ahead of the copied
    messages). DST must be empty or an earlier copy of SRC."""
    from storage.copy import CopyMismatch, copy_database
    for flag, db in (("--from", source), ("--to", dest)):
        # Two URLs libpq cannot read would show alike, and look the same database.
        if (problem := database_problem(db) or (storage.is_url(db) and pgurl.problem(db))):
            raise click.BadParameter(problem, param_hint=flag)
    if storage.describe(source) == storage.describe(dest):
        raise click.UsageError("--from and --to are the same database")
    bar: dict[str, Any] = {}

    notice: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        notice["wait"].cancel()  # connected: the bar says the rest
        if "bar" not in bar:
            bar["bar"] = click.progressbar(length=max(total, 1), label="copying messages",
                                           show_pos=True, file=click.get_text_stream("stderr"))
            bar["bar"].__enter__()
        bar["bar"].update(done - bar["bar"].pos)

    try:
        with said_if_slow(f"{storage.describe(source)} and {storage.describe(dest)}") as wait:
            notice["wait"] = wait
            result = copy_database(source, dest, chunk_rows, progress)
    except (StartupError, storage.NotReadable, CopyMismatch) as exc:
        raise InputError(str(exc)) from None
    finally:
        if "bar" in bar:
            bar["bar"].__exit__(None, None, None)
    tables = ", ".join(f"{table} {count:,}" for table, count in result["tables"].items())
    click.echo(f"copied {result['messages']:,} messages (ids up to {result['last_id']:,}) "
               f"to {storage.describe(dest)}; verified: counts, last id, and the sequences "
               f"of {result['producers']:,} producers; {tables}")
