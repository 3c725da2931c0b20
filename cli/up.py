"""bus-cli up: proxy + writer + reader in the foreground, a small supervisor
(development): each child started in turn and waited on until it says it is
ready the way it tells systemd, stopped in the safe order on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from bus.config import SETTINGS, http_address_problem, role_fields, unknown_variables
import storage
from cli.common import build_config, setting_options

# The HTTP sides of the processes `up` runs.
HTTP_FIELDS = tuple(s.field for s in SETTINGS if s.form is http_address_problem
                    and set(s.roles) & {"writer", "proxy", "reader"})
SETTING_ENV = {s.field: s.env for s in SETTINGS}


def flags_of(process: str, flags: dict[str, Any]) -> list[str]:
    """The flags given to `up` that `process` takes (those of its role)."""
    args = []
    for field in role_fields(process):
        value = flags.get(field)
        if value is None:
            continue
        flag = field.replace("_", "-")
        args += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) \
            else [f"--{flag}", str(value)]
    return args


@click.command()
@setting_options(*role_fields("writer", "proxy", "reader"))
@click.pass_context
def up(ctx: click.Context, **flags: Any) -> None:
    """Run proxy + writer + reader in the foreground until Ctrl-C.

    Each child tells this process it is ready the way it tells systemd
    (sd_notify READY=1, on a socket of this process's own), so "up" means
    these three children serve, not that something answers on the ports.
    Their HTTP sides (/metrics, /healthz) are on, on free loopback ports,
    unless set. Ctrl-C (or SIGTERM) stops the proxy first, so that everything
    it captured reaches the writer, then the writer, which flushes and closes
    the database, then the reader.

    Exit status: 0 when Ctrl-C or SIGTERM stopped the bus cleanly, also while
    it was still starting (the children started so far are stopped); 1 when
    it could not start or a process failed.
    """
    stopping: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum

    # First: a Ctrl-C while the config is read or a child starts stops what
    # has started and exits as a Ctrl-C later does.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cfg = build_config(ctx, flags, "up")
    # Each child reads what `up` read, the same config file (--config) and
    # environment, and takes up's flags as its own: `bus-cli config --running`
    # then says where each of its settings came from (all of them passed as
    # environment said "environment" for a flag, a file and a default alike).
    env = dict(os.environ)
    for variable, _closest in unknown_variables(env):
        # build_config named it once, for `up`: its children would name it thrice more.
        del env[variable]
    for field in HTTP_FIELDS:
        if not getattr(cfg, field):
            env[SETTING_ENV[field]] = "127.0.0.1:0"
    cmd = [sys.executable, "-m", "cli.main"]
    if ctx.obj.get("config_path"):
        cmd += ["--config", ctx.obj["config_path"]]
    status = 0
    children: dict[str, subprocess.Popen] = {}
    ready: dict[str, dict[str, str]] | None = {}
    with tempfile.TemporaryDirectory(prefix="bus-up-") as tmp:
        notify = {name: _notify_socket(Path(tmp, f"{name}.notify"))
                  for name in ("writer", "proxy", "reader")}
        try:
            # The writer first: the reader would warn that the database it
            # creates is not there yet.
            for group in (("writer",), ("proxy", "reader")):
                if stopping["signal"] is not None:
                    break
                for name in group:
                    # Own sessions: the terminal's Ctrl-C reaches only this
                    # process, which then stops the children in the safe order.
                    children[name] = subprocess.Popen(
                        cmd + [name, *flags_of(name, flags)],
                        env={**env, "NOTIFY_SOCKET": str(Path(tmp, f"{name}.notify"))},
                        start_new_session=True)
                started = _wait_ready({name: children[name] for name in group}, notify, stopping)
                if started is None:
                    if stopping["signal"] is None:
                        ready = None  # a child failed: said above
                    break
                ready.update(started)
            if stopping["signal"] is not None:
                click.echo("stopping before the bus was up (asked by "
                           f"{signal.Signals(stopping['signal']).name})", err=True)
            elif ready is None:
                status = 1
                click.echo("the bus did not start; the lines above say why. An endpoint in use "
                           "is often another bus (bus-cli ping finds it): stop it, or give this "
                           "one other endpoints (--pub-endpoint ..., see bus-cli up --help, or "
                           "BUS_*_ENDPOINT) and the clients the same", err=True)
            else:
                http = {name: ready[name].get("BUS_HTTP", "off") for name in ready}
                click.echo(
                    f"bus is up: proxy pid {children['proxy'].pid}, writer pid "
                    f"{children['writer'].pid}, reader pid {children['reader'].pid}, database "
                    f"{describe_db(cfg.db)}\n"
                    f"  publishers connect to   {cfg.pub_endpoint}   (BUS_PUB_ENDPOINT)\n"
                    f"  subscribers connect to  {cfg.sub_endpoint}   (BUS_SUB_ENDPOINT)\n"
                    f"  writer capture (PULL)   {cfg.capture_endpoint}   (BUS_CAPTURE_ENDPOINT)\n"
                    f"  writer control (ROUTER) {cfg.control_endpoint}   (BUS_CONTROL_ENDPOINT)\n"
                    f"  proxy control (ROUTER)  {cfg.proxy_control_endpoint}   "
                    f"(BUS_PROXY_CONTROL_ENDPOINT)\n"
                    f"  history reads (ROUTER)  {cfg.read_endpoint}   (BUS_READ_ENDPOINT)\n"
                    f"  notifications (XPUB)    {cfg.notify_endpoint}   (BUS_NOTIFY_ENDPOINT)\n"
                    f"  writer /metrics /healthz  http://{http['writer']}   (BUS_WRITER_HTTP)\n"
                    f"  proxy /metrics /healthz   http://{http['proxy']}   (BUS_PROXY_HTTP)\n"
                    f"  reader /metrics /healthz  http://{http['reader']}   (BUS_READER_HTTP)\n"
                    "Ctrl-C stops all three.", err=False)
                sys.stdout.flush()
                while stopping["signal"] is None:
                    for name, proc in children.items():
                        if proc.poll() is not None:
                            click.echo(f"{name} exited with status {proc.returncode}", err=True)
                            status = 1
                            stopping["signal"] = signal.SIGTERM
                    for sock in notify.values():
                        _read_notifications(sock)  # keep their queues from filling
                    time.sleep(0.1)
        finally:
            timeout = cfg.shutdown_timeout_ms / 1000.0 + 5
            for name in ("proxy", "writer", "reader"):
                proc = children.get(name)
                if proc is None:
                    continue
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                # A child stopped while it started may die of the SIGTERM
                # before its handler is set: asked for, not a failure.
                asked_to_stop = stopping["signal"] is not None and name not in (ready or {})
                if code != 0 and not (asked_to_stop and code == -signal.SIGTERM):
                    status = 1
            for sock in notify.values():
                sock.close()
    click.echo("bus stopped" + ("" if status == 0 else " with errors"), err=True)
    sys.exit(status)


def describe_db(db: str) -> str:
    """The database as a person reads it: the file's full path, or the URL
    without its password."""
    return storage.redact(db) if storage.is_url(db) else os.path.abspath(db)


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def _read_notifications(sock: socket.socket) -> dict[str, str]:
    """The NAME=VALUE lines waiting on a notify socket (the last of each name)."""
    lines: dict[str, str] = {}
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return lines
        for line in data.decode(errors="replace").splitlines():
            name, _, value = line.partition("=")
            lines[name] = value


def _wait_ready(children: dict[str, subprocess.Popen], notify: dict[str, socket.socket],
                stopping: dict) -> dict[str, dict[str, str]] | None:
    """Each child's READY=1 notification (with its other lines), or None if
    one exits first or they are not all ready within 15 s."""
    deadline = time.monotonic() + 15
    ready: dict[str, dict[str, str]] = {}
    while len(ready) < len(children) and stopping["signal"] is None:
        for name, proc in children.items():
            if name in ready:
                continue
            if proc.poll() is not None:
                if stopping["signal"] is None:
                    click.echo(f"{name} exited with status {proc.returncode}", err=True)
                return None
            lines = _read_notifications(notify[name])
            if lines.get("READY") == "1":
                ready[name] = lines
        if time.monotonic() > deadline:
            click.echo(f"not ready within 15 s: "
                       f"{', '.join(sorted(set(children) - set(ready)))}", err=True)
            return None
        time.sleep(0.05)
    return ready if len(ready) == len(children) else None
