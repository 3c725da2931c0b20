"""bus-cli proxy | writer | reader | gateway: run one process (what the systemd units
run), with a flag for each setting its role uses (bus/config.py)."""

from __future__ import annotations

import sys
from typing import Any

import click

from bus.config import role_fields
from cli.common import build_config, setting_options


@click.command(short_help='Run the proxy (what bus-proxy.service runs).')
@setting_options(*role_fields("proxy"))
@click.pass_context
def proxy(ctx: click.Context, **flags: Any) -> None:
    """Run the proxy (publishers in, subscribers out) with its capture pipe to the writer."""
    from proxy.service import Proxy
    from bus.runner import run_role
    sys.exit(run_role(Proxy(build_config(ctx, flags, "proxy"))))


@click.command()
@setting_options(*role_fields("writer"))
@click.pass_context
def writer(ctx: click.Context, **flags: Any) -> None:
    """Run the batching writer (with --standby: once it holds the writer's lock)."""
    from bus.runner import run_role
    from writer.service import Writer
    config = build_config(ctx, flags, "writer")
    if config.standby:
        from writer.standby import StandbyWriter
        sys.exit(run_role(StandbyWriter(config, Writer)))
    sys.exit(run_role(Writer(config)))


@click.command()
@setting_options(*role_fields("reader"))
@click.pass_context
def reader(ctx: click.Context, **flags: Any) -> None:
    """Serve history pages from a read-only database connection."""
    from bus.runner import run_role
    from reader.service import Reader
    sys.exit(run_role(Reader(build_config(ctx, flags, "reader"))))


# The gateway is a client of the proxy, the writer and the reader (the
# console asks each for its stats): their endpoints, the message limits and
# its CURVE key are its flags too.
GATEWAY_ROLES = ("gateway", "publisher", "subscriber", "reader_client", "writer_client",
                 "proxy_client", "curve")


@click.command()
@setting_options(*role_fields(*GATEWAY_ROLES))
@click.pass_context
def gateway(ctx: click.Context, **flags: Any) -> None:
    """Serve WebSocket clients (browsers) and the console, with per-token permissions."""
    from bus.runner import run_role
    from gateway.service import Gateway
    sys.exit(run_role(Gateway(build_config(ctx, flags, "gateway"))))
