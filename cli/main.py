"""bus-cli: run the bus processes and talk to them.

    bus-cli up                      proxy + writer + reader in the foreground (development)
    bus-cli proxy | writer | reader one process each (what the systemd units run)
    bus-cli gateway                 the WebSocket gateway and its console (browsers)
    bus-cli publish TOPIC [DATA]    publish DATA, or one message per stdin line
    bus-cli tail [PREFIX...]        print messages as they pass (--since, --durable)
    bus-cli history [PREFIX...]     print stored messages
    bus-cli purge PREFIX            delete the stored messages of a topic prefix (admin)
    bus-cli stats                   writer/reader metrics and proxy counters
    bus-cli consumers | producers   durable consumers; producer ids (ls, info, rm)
    bus-cli keys                    CURVE keys: generate, ls, revoke
    bus-cli tokens                  the gateway's tokens: generate, ls, revoke
    bus-cli bench                   publish/acknowledge/subscribe rates and latencies
    bus-cli db migrate | copy       the schema; a copy to another engine (SQLite, PostgreSQL)
    bus-cli anchor [submit|proof|verify]  the anchor worker, and anchoring requests/proofs
    bus-cli utxo stats              the wallet's UTXO table and reservation counters

Every setting is a flag here, an environment variable, or a key of the config
file (see `bus.config.SETTINGS`); flags win.

This module only assembles the group: each command lives in the module of its
concern (cli/messages.py, purge.py, consumers.py, producers.py, operations.py, keys.py, tokens.py,
processes.py, up.py, anchoring.py, audit.py, bench.py, db.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from bus.build import revision

# Each command and where it is defined. A command's module is imported when
# the command runs (or help lists them all), not at every start: `bus-cli
# writer`, what a unit and each test start, then takes 0.15 s to start
# instead of 0.20 (it no longer imports the bench, the anchor client and the
# client library). click's own pattern for lazily loaded subcommands.
COMMANDS = {
    "config": "cli.operations:show_config", "health": "cli.operations:health",
    "ping": "cli.operations:ping", "stats": "cli.operations:stats",
    "proxy": "cli.processes:proxy", "writer": "cli.processes:writer",
    "reader": "cli.processes:reader", "gateway": "cli.processes:gateway", "up": "cli.up:up",
    "publish": "cli.messages:publish", "tail": "cli.messages:tail",
    "history": "cli.messages:history", "topics": "cli.messages:topics",
    "consumers": "cli.consumers:consumers", "producers": "cli.producers:producers",
    "purge": "cli.purge:purge", "keys": "cli.keys:keys",
    "tokens": "cli.tokens:tokens", "anchor": "cli.anchoring:anchor",
    "utxo": "cli.anchoring:utxo", "audit": "cli.audit:audit", "bench": "cli.bench:bench",
    "db": "cli.db:db",
}


class BusCli(click.Group):
    """click's group, with its commands loaded when used (COMMANDS) and the
    exits a shell expects: 130 after Ctrl-C (click says "Aborted!" and exits
    1), quiet when the reader of standard output goes away (`bus-cli tail |
    head`), one line for a usage error."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, name = COMMANDS[cmd_name].split(":")
            self.add_command(getattr(importlib.import_module(module), name), cmd_name)
        return self.commands.get(cmd_name)

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


if __name__ == "__main__":
    main()
