"""bus-cli: run the bus processes and talk to them.

    bus-cli up                      proxy + writer + reader in the foreground (development)
    bus-cli proxy | writer | reader one process each (what the systemd units run)
    bus-cli publish TOPIC [DATA]    publish DATA, or one message per stdin line
    bus-cli tail [PREFIX...]        print messages as they pass (--since, --durable)
    bus-cli history [PREFIX...]     print stored messages
    bus-cli purge PREFIX            delete the stored messages of a topic prefix (admin)
    bus-cli stats                   writer/reader metrics and proxy counters
    bus-cli consumers | producers   durable consumers; producer ids (ls, info, rm)
    bus-cli keys                    CURVE keys: generate, ls, revoke
    bus-cli bench                   publish/acknowledge/subscribe rates and latencies
    bus-cli db migrate | copy       the schema; a copy to another engine (SQLite, PostgreSQL)
    bus-cli anchor [submit|proof|verify]  the anchor worker, and anchoring requests/proofs
    bus-cli utxo stats              the wallet's UTXO table and reservation counters

Every setting is a flag here, an environment variable, or a key of the config
file (see `bus.config.SETTINGS`); flags win.

This module only assembles the group: each command lives in the module of its
concern (cli/messages.py, purge.py, consumers.py, producers.py, operations.py, keys.py,
processes.py, up.py, anchoring.py, audit.py, bench.py, db.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from bus.build import revision
from cli.anchoring import anchor, utxo
from cli.audit import audit
from cli.bench import bench
from cli.consumers import consumers
from cli.db import db
from cli.keys import keys
from cli.messages import history, publish, tail, topics
from cli.operations import health, ping, show_config, stats
from cli.processes import proxy, reader, writer
from cli.producers import producers
from cli.purge import purge
from cli.up import up


class BusCli(click.Group):
    """click's group, with the exits a shell expects: 130 after Ctrl-C
    (click says "Aborted!" and exits 1), quiet when the reader of standard
    output goes away (`bus-cli tail | head`), one line for a usage error."""

    def invoke(self, ctx: click.Context) -> Any:
        # Here, not only in main: click's own main takes a broken pipe (EPIPE)
        # first and exits 1, saying nothing, as if the command had failed.
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            exit_quietly_after_broken_pipe()

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            sys.exit(130)
        except UnicodeEncodeError as exc:  # e.g. an argument of bytes that are not UTF-8
            click.echo(f"Error: text that is not valid UTF-8 (in an argument?): {exc.reason}",
                       err=True)
            sys.exit(2)
        except BrokenPipeError:
            exit_quietly_after_broken_pipe()


def exit_quietly_after_broken_pipe() -> None:
    """The reader of standard output went away (`| head`): exit 141, what a
    shell reports for a command ended by SIGPIPE, with nothing on stderr.
    Python would complain again when it flushes stdout at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(141)


@click.group(cls=BusCli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zmq-sqlite-bus", prog_name="bus-cli",
                      message=f"%(prog)s, version %(version)s ({revision()})")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file [env BUS_CONFIG; default /etc/bus/bus.toml if present]")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """ZeroMQ message bus with a batching SQLite writer."""
    ctx.obj = {"config_path": config_path}


for command in (show_config, proxy, writer, reader, up, publish, tail, history, topics,
                consumers, producers, purge, ping, health, stats, keys, anchor, audit, bench, db, utxo):
    main.add_command(command)

if __name__ == "__main__":
    main()
