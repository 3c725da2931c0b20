"""The systemd units: checked by systemd-analyze, and their command lines run for real.

No systemd runs here, so each unit's ExecStart is run as a subprocess with the
unit's config file pointed at a temp copy of deploy/bus.toml (free ports, temp
database) and stopped with the unit's KillSignal.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bus.client import HistoryClient, Publisher
from bus.config import load_config
from tests.bitcoind_double import BitcoindDouble
from tests.conftest import BUS_CLI, ENDPOINT_VARS, Proc, count_messages, free_port, ping, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
INSTALLED_CLI = "/opt/bus/.venv/bin/bus-cli"
INSTALLED_CONFIG = "/etc/bus/bus.toml"
SERVICES = ("bus-writer.service", "bus-proxy.service", "bus-reader.service")  # start order
ANCHOR = "bus-anchor.service"  # optional (needs bitcoind): enabled on its own
GATEWAY = "bus-gateway.service"  # optional too (browsers)
# Each service's tcp endpoints, bound by systemd (socket activation), by the
# FileDescriptorName= the process looks its endpoint up by (bus/sockets.bind).
SOCKETS = {
    "bus-proxy.service": ["bus-proxy-control.socket", "bus-proxy-pub.socket",
                          "bus-proxy-sub.socket"],
    "bus-reader.service": ["bus-reader-read.socket"],
    "bus-writer.service": ["bus-writer-control.socket", "bus-writer-notify.socket"],
    ANCHOR: ["bus-anchor-control.socket"],
    GATEWAY: ["bus-gateway.socket"],
}
FD_ENDPOINTS = {"pub": "pub_endpoint", "sub": "sub_endpoint",
                "proxy_control": "proxy_control_endpoint", "control": "control_endpoint",
                "notify": "notify_endpoint", "read": "read_endpoint",
                "anchor_control": "anchor_control_endpoint", "gateway": "gateway_listen"}


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are case-sensitive
    parser.read(UNITS / name)
    return parser


def local_config(tmp_path: Path, **replace: str) -> Path:
    """deploy/bus.toml with free ports, a temp database and `replace`d keys,
    as /etc/bus/bus.toml."""
    text = (ROOT / "deploy" / "bus.toml").read_text()
    lines = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in ENDPOINT_VARS and '"ipc://' in line:  # the same socket file, in tmp_path
            name = line.split('"')[1].rsplit("/", 1)[1]
            line = f'{key} = "ipc://{tmp_path / name}"'
        elif key in ENDPOINT_VARS:
            line = f'{key} = "tcp://127.0.0.1:{free_port()}"'
        elif key == "BUS_DB":
            line = f'BUS_DB = "{tmp_path / "bus.db"}"'
        elif key in replace:
            line = f'{key} = "{replace.pop(key)}"'
        lines.append(line)
    lines += [f'{key} = "{value}"' for key, value in replace.items()]
    path = tmp_path / "bus.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def localize(text: str, config: Path) -> str:
    return text.replace(INSTALLED_CLI, BUS_CLI).replace(INSTALLED_CONFIG, str(config))


def endpoint_of(cfg: Any, fd_name: str) -> str:
    """The endpoint the socket passed as `fd_name` must listen at (the
    gateway's setting is host:port, an HTTP server's)."""
    value = getattr(cfg, FD_ENDPOINTS[fd_name])
    return value if "://" in value else f"tcp://{value}"


def test_deploy_has_one_unit_per_process_and_a_target() -> None:
    assert sorted(p.name for p in UNITS.iterdir()) == \
        sorted([*SERVICES, ANCHOR, GATEWAY,
                *(name for names in SOCKETS.values() for name in names), "bus.target"])
    target = read_unit("bus.target")
    assert set(target["Unit"]["Wants"].split()) == set(SERVICES)
    for name in (*SERVICES, ANCHOR, GATEWAY):
        unit = read_unit(name)
        assert unit["Service"]["Restart"] == "on-failure"
        # A crash loop must not leave the bus down for good (systemd's default
        # start limit would): restarts never stop, at most one per 2 s.
        assert unit["Unit"]["StartLimitIntervalSec"] == "0"
        assert int(unit["Service"]["RestartSec"]) >= 2
        assert INSTALLED_CONFIG in unit["Service"]["ExecStart"]
        assert unit["Unit"]["PartOf"] == "bus.target"
        assert unit["Install"]["WantedBy"] == "bus.target"
    # Stopped in reverse start order: the proxy (After= the writer) stops first,
    # so what it captured is stored before the writer exits.
    assert "bus-writer.service" in read_unit("bus-proxy.service")["Unit"]["After"].split()
    # The reader opens the writer's database file: same (dynamic) user.
    assert read_unit("bus-reader.service")["Service"]["User"] == \
        read_unit("bus-writer.service")["Service"]["User"]
    # The capture socket file (ipc, owner-only) is in the writer's and the
    # proxy's RuntimeDirectory, which both keep, and they share its user.
    capture = load_config(env={}, config_path=ROOT / "deploy" / "bus.toml").capture_endpoint
    assert capture.startswith("ipc:///run/bus/")
    for name in ("bus-writer.service", "bus-proxy.service"):
        service = read_unit(name)["Service"]
        assert service["RuntimeDirectory"] == "bus" and service["User"] == "bus"
        assert service["RuntimeDirectoryPreserve"] == "yes"
    # Every tcp endpoint of deploy/bus.toml is held by a .socket unit of the
    # service that binds it, named as that process looks it up, and listening
    # where the config says (a process refuses a socket that does not).
    cfg = load_config(env={}, config_path=ROOT / "deploy" / "bus.toml")
    held = set()
    for service, sockets in SOCKETS.items():
        assert sorted(read_unit(service)["Service"]["Sockets"].split()) == sockets
        for name in sockets:
            unit = read_unit(name)
            assert unit["Socket"]["Service"] == service
            assert unit["Unit"]["PartOf"] == "bus.target"
            endpoint = endpoint_of(cfg, unit["Socket"]["FileDescriptorName"])
            assert endpoint == f"tcp://{unit['Socket']['ListenStream']}", name
            held.add(endpoint)
    assert held == {endpoint_of(cfg, name) for name in FD_ENDPOINTS}
    # The anchor worker needs no database: another user, started after the bus.
    writer_user = read_unit("bus-writer.service")["Service"]["User"]
    for optional in (ANCHOR, GATEWAY):
        assert read_unit(optional)["Service"]["User"] != writer_user
        assert set(SERVICES) <= set(read_unit(optional)["Unit"]["After"].split())


# The endpoints each service binds and caps at BUS_MAX_CONNECTIONS (its
# socket-activated ones, and the writer's capture).
CAPPED_ENDPOINTS = {"bus-proxy.service": 3, "bus-writer.service": 3, "bus-reader.service": 1,
                    ANCHOR: 1}


def test_every_service_may_open_the_files_its_connection_caps_need() -> None:
    """Issue 22: with systemd's default limit (1,024) idle connections filled
    the descriptor table and every process exited. Each unit's LimitNOFILE=
    holds BUS_MAX_CONNECTIONS on each endpoint the process binds, with room
    for the connections over the cap (bus/sockets.descriptors_needed), so the
    process need not lower its cap; and no socket unit pretends to cap with
    MaxConnections=, which systemd applies to Accept=yes sockets only."""
    from bus.sockets import descriptors_needed
    cfg = load_config(env={}, config_path=ROOT / "deploy" / "bus.toml")
    assert set(CAPPED_ENDPOINTS) == {*SERVICES, ANCHOR}
    for name, endpoints in CAPPED_ENDPOINTS.items():
        limit = read_unit(name)["Service"]["LimitNOFILE"]
        assert limit.isdigit(), (name, limit)  # one number: soft = hard
        assert int(limit) >= descriptors_needed(cfg.max_connections, endpoints), name
        assert int(limit) <= 4 * descriptors_needed(cfg.max_connections, endpoints), name
    for sockets in SOCKETS.values():
        for name in sockets:
            unit = read_unit(name)["Socket"]
            assert unit["Accept"] == "no"
            assert "MaxConnections" not in unit and "MaxConnectionsPerSource" not in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    config = local_config(tmp_path)
    units = []
    for src in sorted(UNITS.iterdir()):
        dst = tmp_path / src.name
        dst.write_text(localize(src.read_text(), config))
        units.append(str(dst))
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    for unit in units:
        if unit.endswith(".service"):
            security = subprocess.run(["systemd-analyze", "security", "--offline=true", unit],
                                      capture_output=True, text=True, timeout=60)
            assert security.returncode == 0, security.stderr
            level = float(security.stdout.split("Overall exposure level for")[1].split()[1])
            assert level <= 2.0, security.stdout


def gateway_replays(listen: str, token: str) -> bool:
    """Whether the gateway at `listen` lets `token` in and replays unit.*."""
    from websockets.sync.client import connect
    try:
        with connect(f"ws://{listen}/", open_timeout=2) as ws:
            ws.send('{"op": "auth", "token": "%s"}' % token)
            ws.recv(timeout=5)
            ws.send('{"op": "replay", "stream": 1, "prefixes": ["unit."]}')
            return "stored through the units" in ws.recv(timeout=5) + ws.recv(timeout=5)
    except (OSError, TimeoutError):
        return False


def test_unit_command_lines_run_and_stop_cleanly(tmp_path: Path) -> None:
    node = BitcoindDouble()
    config = local_config(tmp_path, BUS_BITCOIND_RPC_URL=node.url,
                          BUS_GATEWAY_LISTEN=f"127.0.0.1:{free_port()}",
                          BUS_GATEWAY_HTTP=f"127.0.0.1:{free_port()}",
                          BUS_GATEWAY_TOKENS_DIR=str(tmp_path / "tokens"),
                          BUS_BITCOIND_ZMQ_HASHBLOCK=node.zmq_endpoint,
                          BUS_BITCOIND_RPC_COOKIE=str(tmp_path / ".cookie"))
    (tmp_path / ".cookie").write_text(f"{node.user}:{node.password}")
    cfg = load_config(env={}, config_path=config)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("BUS_", "BATCH_"))}
    env["BUS_LOG_FORMAT"] = "json"
    procs = {}
    try:
        for name in (*SERVICES, ANCHOR):  # the After= order
            service = read_unit(name)["Service"]
            argv = shlex.split(localize(service["ExecStart"], config))
            assert argv[0] == BUS_CLI
            procs[name] = Proc(argv, env, cwd=tmp_path)
            if name == SERVICES[-1]:
                wait_for(lambda: all(ping(e) for e in (cfg.control_endpoint,
                                                       cfg.proxy_control_endpoint,
                                                       cfg.read_endpoint)),
                         message="the units' processes to answer ping")
        # The worker reaches bitcoind with the cookie file, and the bus.
        wait_for(lambda: any(e.get("event") == "anchor_ready" for e in procs[ANCHOR].log_events()),
                 message="the anchor worker ready")
        with Publisher(cfg, producer_id="unit") as pub:
            pub.publish("unit.check", b"stored through the units' command lines", wait=True)
        with HistoryClient(cfg) as history:
            assert [m.payload for m in history.messages(["unit."])] == \
                [b"stored through the units' command lines"]
        # The gateway, with a token of its directory.
        tokens = subprocess.run([BUS_CLI, "tokens", "generate", str(tmp_path / "tokens"), "ops",
                                 "--list", "readers", "--read", "unit."], capture_output=True,
                                text=True, check=True).stdout.split()[1]
        gateway = read_unit(GATEWAY)["Service"]
        procs[GATEWAY] = Proc(shlex.split(localize(gateway["ExecStart"], config)), env,
                              cwd=tmp_path)
        wait_for(lambda: gateway_replays(cfg.gateway_listen, tokens),
                 message="the gateway to replay what is stored")
        for name in reversed((*SERVICES, ANCHOR, GATEWAY)):  # reverse order on stop
            kill = getattr(signal, read_unit(name)["Service"]["KillSignal"])
            assert procs[name].stop(kill) == 0, procs[name].stderr.collect()
        assert count_messages(tmp_path / "bus.db", "unit.") == 1
    finally:
        for proc in procs.values():
            proc.kill()
        node.close()


def test_make_install_installs_every_page_the_units_point_to(tmp_path: Path) -> None:
    """Each unit's Documentation= is a file:///opt/bus/... page: `make install`
    puts every one there (README.md was missing), and records the commit it
    installed, which its processes then report (bus/build.py)."""
    prefix = tmp_path / "opt-bus"
    result = subprocess.run(["make", "-s", "install", f"PREFIX={prefix}",
                             f"PYTHON={shutil.which('python3.11') or shutil.which('python3')}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pages = set()
    for unit in (ROOT / "deploy" / "systemd").iterdir():
        for line in unit.read_text().splitlines():
            if line.startswith("Documentation="):
                pages.update(url.removeprefix("file:///opt/bus/")
                             for url in line.split("=", 1)[1].split() if url.startswith("file:"))
    assert "README.md" in pages
    missing = sorted(page for page in pages if not (prefix / page).is_file())
    assert missing == [], f"pointed to by a unit, not installed: {missing}"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"
    build = subprocess.run([str(prefix / ".venv" / "bin" / "python"), "-c",
                            "from bus.build import build_info; print(build_info()['revision'])"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert build.stdout.strip() == head, build.stderr


def directives(path: Path, section: str) -> dict[str, list[str]]:
    """A unit file's (or drop-in's) directives of `section`, each with every
    value it is given, in order (an empty one resets a list in systemd)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_three_host_files_describe_one_deployment() -> None:
    """deploy/cluster/ (deploy/cluster.md): each host's bus.toml loads, and
    they agree. The writers' lists name the same endpoints, each writer
    host's own first (a writer binds the first); the edge's upstream is A's
    subscriber endpoint; every host's clients reach the same proxy, writers
    and reader. On each host, every socket unit not masked there has a
    drop-in that listens where that host's bus.toml says (first resetting
    the unit's own ListenStream=), and none that is masked has one; the
    writers' sockets are masked on A and B (an empty Sockets= does not clear
    systemd's list: a review found the first version relied on it)."""
    from bus.config import endpoints_of
    cluster = ROOT / "deploy" / "cluster"
    cfg = {host: load_config(env={}, config_path=cluster / host / "bus.toml") for host in "abc"}
    a, b, c = cfg["a"], cfg["b"], cfg["c"]
    for field in ("capture_endpoint", "control_endpoint", "notify_endpoint"):
        on_a, on_b = endpoints_of(getattr(a, field)), endpoints_of(getattr(b, field))
        assert on_a == on_b[::-1] and len(on_a) == 2, field
        assert on_a[0].startswith("tcp://10.0.0.1:") and on_b[0].startswith("tcp://10.0.0.2:")
        if field != "capture_endpoint":
            assert set(endpoints_of(getattr(c, field))) == set(on_a), field
    assert a.standby and b.standby and not c.standby
    assert c.upstream == a.sub_endpoint and not a.upstream and not b.upstream
    assert a.pub_endpoint == b.pub_endpoint == c.pub_endpoint
    assert a.read_endpoint == b.read_endpoint == c.read_endpoint == "tcp://10.0.0.2:5555"
    assert a.db == b.db and a.db.startswith("postgresql://") and a.curve_dir and c.curve_dir
    guide = (ROOT / "deploy" / "cluster.md").read_text()
    masked = {row.split("|")[1].strip(): set(row.split("|")[2].strip(" `").split())
              for row in guide.splitlines() if row.startswith(("| A |", "| B |", "| C |"))}
    assert set(masked) == {"A", "B", "C"}, masked
    all_units = {path.name for path in UNITS.iterdir()}
    for host in "abc":
        off = masked[host.upper()]
        assert off <= all_units, off - all_units
        if host in "ab":
            assert {"bus-writer-control.socket", "bus-writer-notify.socket"} <= off
        drop_ins = {path.parent.name.removesuffix(".d"): path
                    for path in (cluster / host / "systemd").glob("*.d/cluster.conf")}
        assert not set(drop_ins) & off, (host, set(drop_ins) & off)
        assert all(name in all_units for name in drop_ins), drop_ins
        # The anchor worker and the gateway are optional, enabled on their own.
        for name in sorted(all_units - off - set(SOCKETS[ANCHOR]) - set(SOCKETS[GATEWAY])):
            if not name.endswith(".socket"):
                continue
            assert name in drop_ins, f"{host}: {name} listens on 127.0.0.1 there"
            listen = directives(drop_ins[name], "Socket")["ListenStream"]
            assert listen[0] == "" and len(listen) == 2, (host, name, listen)
            fd_name = read_unit(name)["Socket"]["FileDescriptorName"]
            assert getattr(cfg[host], FD_ENDPOINTS[fd_name]) == f"tcp://{listen[1]}", (host, name)
        for name, path in drop_ins.items():  # no reset systemd does not do
            section = "Socket" if name.endswith(".socket") else "Service"
            assert directives(path, section).get("Sockets", ["x"])[0] != "", (host, name)
    edge = directives(cluster / "c" / "systemd" / "bus-proxy.service.d" / "cluster.conf", "Service")
    assert any(e.startswith("BUS_CURVE_KEY=") for e in edge["Environment"])
    reader = directives(cluster / "b" / "systemd" / "bus-reader.service.d" / "cluster.conf",
                        "Service")
    assert reader["Environment"] == ["BUS_DB=postgresql://bus@127.0.0.1/bus"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("host", ["a", "b", "c"])
def test_each_host_s_units_with_their_drop_ins_pass_systemd_analyze(host: str,
                                                                    tmp_path: Path) -> None:
    """deploy/cluster/X/systemd's drop-ins beside the units, as in
    /etc/systemd/system: systemd-analyze reads them and finds nothing wrong."""
    config = local_config(tmp_path)
    for src in UNITS.iterdir():
        (tmp_path / src.name).write_text(localize(src.read_text(), config))
    shutil.copytree(ROOT / "deploy" / "cluster" / host / "systemd", tmp_path, dirs_exist_ok=True)
    units = sorted(str(tmp_path / d.name.removesuffix(".d"))
                   for d in (ROOT / "deploy" / "cluster" / host / "systemd").iterdir())
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
