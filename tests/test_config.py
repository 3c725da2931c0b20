"""The one settings source (bus/config.py): every setting declared once, as a
field of BusConfig, and everything else generated from the declarations."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from bus import config
from bus.config import SETTINGS, BusConfig, ConfigError, load_config, role_fields
from cli.common import PROCESS_FIELDS
from tests.conftest import BUS_CLI, DEADLINE, subcommands


def run_config_command(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """`bus-cli config --json` with only these BUS_* variables set."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("BUS_", "BATCH_"))}
    env.update(variables, BUS_CONFIG=str(tmp_path / "empty.toml"), BUS_LOG_FORMAT="json")
    (tmp_path / "empty.toml").write_text("")
    return subprocess.run([BUS_CLI, "config", "--json"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=DEADLINE)


def log_events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_a_misspelt_bus_variable_is_warned_about_with_the_closest_name(tmp_path: Path) -> None:
    """A misspelt variable was ignored in silence (the writer ran without its
    HTTP side), while a misspelt key of the config file is refused."""
    done = run_config_command(tmp_path, BUS_WRITER_HTPP="127.0.0.1:0")
    assert done.returncode == 0, done.stderr
    warnings = [event for event in log_events(done.stderr) if event["event"] == "unknown_setting"]
    assert [(w["variable"], w["closest"], w["level"]) for w in warnings] == \
        [("BUS_WRITER_HTPP", "BUS_WRITER_HTTP", "warning")]
    shown = json.loads(done.stdout)  # the output is unchanged: the variable sets nothing
    assert shown["BUS_WRITER_HTTP"] == {"value": "", "from": "default"}


def test_known_variables_are_not_warned_about(tmp_path: Path) -> None:
    done = run_config_command(tmp_path, BUS_WRITER_HTTP="127.0.0.1:0",
                              BUS_TEST_REQUIRE_BITCOIND="1", BUS_TEST_BITCOIND="/bin/false")
    assert done.returncode == 0, done.stderr
    assert [e for e in log_events(done.stderr) if e["event"] == "unknown_setting"] == []
    assert json.loads(done.stdout)["BUS_WRITER_HTTP"]["value"] == "127.0.0.1:0"


def test_unknown_variables_names_each_with_the_closest_setting() -> None:
    env = {"BUS_WRITER_HTPP": "x", "BUS_BATCH_SIZE": "5", "BATCH_SIZE": "5", "HOME": "/",
           "BUS_CONFIG": "/etc/bus/bus.toml", "BUS_DB": "bus.db", "BATCH_SIZ": "5"}
    # BATCH_SIZ: the seed's BATCH_* names are settings too, a misspelt one named.
    assert config.unknown_variables(env) == [("BATCH_SIZ", "BATCH_SIZE"),
                                             ("BUS_BATCH_SIZE", "BATCH_SIZE"),
                                             ("BUS_WRITER_HTPP", "BUS_WRITER_HTTP")]


def test_an_unknown_key_of_the_config_file_is_named_with_the_closest_setting(
        tmp_path: Path) -> None:
    file = tmp_path / "bus.toml"
    file.write_text("batch_size = 3\nBUS_WRITER_HTPP = 'x'\n")
    with pytest.raises(config.ConfigError) as err:  # case aside: not BUS_DB
        load_config(env={}, config_path=file)
    assert str(err.value) == (f"{file}: unknown settings BUS_WRITER_HTPP (closest: "
                              "BUS_WRITER_HTTP), batch_size (closest: BATCH_SIZE)")


def test_each_setting_is_one_field_of_busconfig() -> None:
    fields = [f.name for f in dataclasses.fields(BusConfig)]
    assert fields == [s.field for s in SETTINGS] + ["source", "origins"]
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    assert BusConfig() == dataclasses.replace(load_config(env={}, config_path="/dev/null"),
                                              source="defaults")  # the defaults
    assert {s.type for s in SETTINGS} == {str, int, float, bool}


def test_the_bounds_checked_are_the_declared_ones() -> None:
    """No list of names: a setting's bounds are in its declaration."""
    for s in SETTINGS:
        if s.at_least is not None:
            with pytest.raises(ConfigError, match=f"^{s.env} must (be at least|not be neg)"):
                load_config({s.field: s.at_least - 1}, env={}, config_path="/dev/null")
        if s.positive:
            with pytest.raises(ConfigError, match=f"^{s.env} must be positive"):
                load_config({s.field: 0}, env={}, config_path="/dev/null")
        if s.choices:
            with pytest.raises(ConfigError, match=f"^{s.env} must be one of"):
                load_config({s.field: "nothing"}, env={}, config_path="/dev/null")


# The roles each command is a client of (or the process it runs): its setting
# flags are exactly role_fields of these. A command missing here takes none.
COMMAND_ROLES: dict[str, tuple[str, ...]] = {
    "proxy": ("proxy",), "writer": ("writer",), "reader": ("reader",), "anchor": ("anchor",),
    "gateway": ("gateway", "publisher", "subscriber", "reader_client", "writer_client",
                "proxy_client", "curve"),
    **{f"tokens {cmd}": () for cmd in ("generate", "ls", "revoke")},
    "up": ("writer", "proxy", "reader"),
    "publish": ("publisher", "curve"),
    "tail": ("subscriber", "reader_client", "proxy_client", "curve"),
    "history": ("reader_client", "curve"), "topics": ("reader_client", "curve"),
    "bench": ("publisher", "subscriber", "curve"),
    **{f"{group} {cmd}": ("writer_client", "curve")
       for group in ("producers", "consumers") for cmd in ("ls", "info", "rm")},
    "purge": ("writer_client", "curve"),
    "anchor submit": ("anchor_requester", "reader_client", "anchor_client", "curve"),
    "anchor proof": ("reader_client", "curve"),
    "anchor verify": ("bitcoind", "bitcoind_deadline"),
    "utxo stats": ("writer_client", "reader_client", "curve"),
    "audit verify": ("database", "bitcoind"), "audit proof": ("database",),
    "db migrate": ("database",),  # db copy: --from and --to, no setting
    "ping": ("prober", "curve"), "health": ("prober", "curve"),
    "stats": ("writer_client", "proxy_client", "reader_client", "curve"),
    "config": config.ROLES,  # every setting
}


def setting_flags_by_command() -> dict[str, set[str]]:
    """Each bus-cli command and sub-command (by its path), and its setting flags."""
    import click

    from cli.main import main
    fields = {s.field for s in SETTINGS}
    found: dict[str, set[str]] = {}

    def walk(command: click.Command, path: str) -> None:
        found[path] = {p.name for p in command.params if p.name in fields}
        for name, sub in subcommands(command).items():
            walk(sub, f"{path} {name}".strip())
    walk(main, "")
    return found


def test_each_command_takes_the_flags_of_its_roles() -> None:
    """A command's setting flags are those of the roles it is a client of (or
    runs): adding a role to a setting's declaration gives its clients the flag."""
    flags = setting_flags_by_command()
    assert set(COMMAND_ROLES) <= set(flags)
    for path, taken in flags.items():
        assert taken == set(role_fields(*COMMAND_ROLES.get(path, ()))), path
    assert flags["config"] == {s.field for s in SETTINGS}
    assert set(role_fields("prober")) == set(PROCESS_FIELDS.values())
    with pytest.raises(ValueError, match="no role wirter"):
        role_fields("wirter")


def test_no_command_lists_its_settings_by_hand() -> None:
    """cli/ names the roles a command is a client of, never a setting's field:
    a setting's clients are declared on the setting (bus/config.py)."""
    fields = {s.field for s in SETTINGS}
    listed = []
    for path in sorted((Path(__file__).parent.parent / "cli").glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "setting_options":
                listed += [f"{path.name}:{node.lineno} {node.value}"
                           for node in ast.walk(call)
                           if isinstance(node, ast.Constant) and node.value in fields]
    assert listed == []


def test_a_setting_must_say_who_uses_it() -> None:
    with pytest.raises(TypeError, match="roles must be"):
        config.setting("BUS_X", 1, "x", roles=())
    with pytest.raises(TypeError, match="roles must be"):
        config.setting("BUS_X", 1, "x", roles=("wirter",))


def test_endpoint_lists_resolve_host_names_and_take_an_alias_once() -> None:
    """Review of issue 27: libzmq's events name a reconnected connection by
    its address, not the host name it was given, so the proxy could not tell
    which writer was the older one; and an alias of the same address was a
    second connection to one writer, dropped as "older" over and over."""
    from bus.sockets import connect_endpoints
    assert connect_endpoints("tcp://localhost:5600,tcp://127.0.0.1:5600,tcp://127.0.0.1:5601") \
        == ["tcp://127.0.0.1:5600", "tcp://127.0.0.1:5601"]
    assert connect_endpoints("tcp://localhost:5600") == ["tcp://localhost:5600"]  # one: as given
