"""bus-cli commands of the anchoring side: `utxo stats`.

The UTXO table is summarized by the reader (its counts walk indexes of up to
millions of rows, which must not run on the writer's thread); the reservation
counters come from the writer.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from bus.client import BusError, ControlClient
from cli.common import build_config, print_sections, setting_options


@click.group()
def utxo() -> None:
    """The wallet's UTXO table (owned by the writer)."""


@utxo.command("stats")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@setting_options("control_endpoint", "read_endpoint", "request_timeout_ms")
@click.pass_context
def utxo_stats(ctx: click.Context, as_json: bool, **flags: Any) -> None:
    """Available, reserved and spent UTXOs, the wallet tip, and the writer's
    reservation counters (reserved, expired, no_utxo, replayed...)."""
    cfg = build_config(ctx, flags, "utxo")
    result: dict[str, Any] = {}
    failed = False
    for name, endpoint, cmd in (("table", cfg.read_endpoint, "utxo_stats"),
                                ("writer", cfg.control_endpoint, "stats")):
        with ControlClient(endpoint, timeout_ms=cfg.request_timeout_ms) as client:
            try:
                reply = client.request(cmd)
                result[name] = reply["utxos"] if cmd == "stats" else reply
            except BusError as exc:
                result[name] = {"error": str(exc)}
                failed = True
    print_sections(result, as_json)
    sys.exit(1 if failed else 0)
