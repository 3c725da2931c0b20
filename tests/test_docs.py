"""docs/protocol.md's C and JavaScript clients, run against a real bus.

The page promises that a client can be written from it alone; this keeps the
examples honest. The C test needs gcc and the headers of libzmq and msgpack-c
(`apt-get install gcc libzmq3-dev libmsgpack-dev libsodium-dev`), the JavaScript test node
and `npm ci --prefix tests/js`; .ci/run installs both. Each is skipped without
its tools. Each publisher example runs twice with its fixed producer id, and
must store its message both times (a producer session each run); each runs
once without CURVE and once with keys (BUS_CURVE_DIR, BUS_CURVE_KEY), where it
must sign its messages with the session MAC or nothing is stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth

from bus import control, protocol, security
from bus.client import Publisher
from tests.conftest import Bus, Proc, query, wait_for
from writer.producers import ProducerState

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def have_c_headers() -> bool:
    if shutil.which("gcc") is None:
        return False
    probe = subprocess.run(["gcc", "-E", "-x", "c", "-"],
                           input="#include <zmq.h>\n#include <msgpack.h>\n#include <sodium.h>\n",
                           capture_output=True, text=True)
    return probe.returncode == 0


JS_DIR = Path(__file__).resolve().parent / "js"
needs_c = pytest.mark.skipif(not have_c_headers(),
                             reason="gcc or the headers of libzmq / msgpack-c / libsodium "
                                    "(libzmq3-dev, libmsgpack-dev, libsodium-dev) not installed")
needs_js = pytest.mark.skipif(shutil.which("node") is None
                              or not (JS_DIR / "node_modules" / "zeromq").is_dir(),
                              reason="node or tests/js/node_modules (npm ci --prefix tests/js) "
                                     "missing")


@pytest.fixture(params=["plain", "curve"])
def docs_bus(request: pytest.FixtureRequest, make_bus, tmp_path: Path
             ) -> tuple[Bus, dict[str, str]]:
    """A running bus, and the environment of the example programs: empty
    without CURVE; with it, BUS_CURVE_DIR and a BUS_CURVE_KEY in publishers/
    and readers/ (the examples publish and subscribe), while the test's own
    clients use an admin key."""
    if request.param == "plain":
        return make_bus().start(), {}
    return curve_bus(make_bus, tmp_path)


def curve_bus(make_bus, tmp_path: Path, **settings: Any) -> tuple[Bus, dict[str, str]]:
    """docs_bus's bus with CURVE (and `settings`): its own client an admin,
    and the examples' environment with a key in publishers/ and readers/."""
    curve, clients = tmp_path / "curve", tmp_path / "clients"
    for directory in (curve / "publishers", curve / "readers", curve / "admins", clients):
        directory.mkdir(parents=True)
    for name in ("server", "proxy"):
        zmq.auth.create_certificates(curve, name)
    admin, _ = zmq.auth.create_certificates(clients, "admin")
    Path(admin).rename(curve / "admins" / "admin.key")
    example, _ = zmq.auth.create_certificates(clients, "example")
    for role in ("publishers", "readers"):
        (curve / role / "example.key").write_text(Path(example).read_text())
    security.load_keyring.cache_clear()
    bus = make_bus(BUS_CURVE_DIR=curve, BUS_CURVE_KEY=clients / "admin.key_secret",
                   **settings).start()
    return bus, {"BUS_CURVE_KEY": str(clients / "example.key_secret")}


def session_macs_checked(bus: Bus) -> None:
    """The writer stored the examples' messages as authentic, with CURVE or
    without: none was dropped for a wrong mac."""
    assert bus.writer_stats()["security"]["messages_not_authentic"] == 0


def local_endpoints(code: str, bus: Bus) -> str:
    for default, name in (("5550", "BUS_PUB_ENDPOINT"), ("5551", "BUS_SUB_ENDPOINT"),
                          ("5553", "BUS_CONTROL_ENDPOINT"), ("5555", "BUS_READ_ENDPOINT"),
                          ("5556", "BUS_NOTIFY_ENDPOINT")):
        code = code.replace(f"tcp://127.0.0.1:{default}", bus[name])
    return code


def js_examples() -> list[str]:
    return re.findall(r"```js\n(.*?)```", PROTOCOL_MD.read_text(), re.S)


def run_js(bus: Bus, code: str, env: dict[str, str] | None = None) -> Proc:
    script = JS_DIR / f"example-{os.getpid()}-{bus.tmp_path.name}.mjs"  # beside node_modules
    script.write_text(local_endpoints(code, bus))
    try:
        node = bus.spawn(["node", str(script)], env=env)
        node.wait(30)
    finally:
        script.unlink()
    return node


def c_examples(bus: Bus) -> tuple[str, str]:
    publisher, subscriber = re.findall(r"```c\n(.*?)```", PROTOCOL_MD.read_text(), re.S)[:2]

    # The subscriber snippet is a loop body: wrap it in a program with the
    # publisher's helpers (load_curve, secure) that prints each frame's size,
    # unbuffered, and stops after 50 messages.
    subscriber = subscriber.replace("for (;;) {", "for (int k = 0; k < 50; k++) {").replace(
        "zmq_msg_close(&part); i++;",
        'printf("frame %d: %zu\\n", i, zmq_msg_size(&part)); zmq_msg_close(&part); i++;')
    helpers = publisher[:publisher.index("int main(void) {")]
    subscriber = (helpers + "int main(void) {\n"
                  "setvbuf(stdout, NULL, _IONBF, 0);\n"
                  "if (load_curve() != 0) return 3;\n"
                  "void *ctx = zmq_ctx_new();\n" + subscriber + "return 0;\n}\n")
    return local_endpoints(publisher, bus), local_endpoints(subscriber, bus)


def compile_c(source: str, path: Path, *flags: str) -> Path:
    path.with_suffix(".c").write_text(source)
    subprocess.run(["gcc", "-Wall", "-Werror", *flags, "-o", str(path),
                    str(path.with_suffix(".c")), "-lzmq", "-lmsgpackc", "-lsodium"],
                   check=True, capture_output=True, timeout=60)
    return path


def stored_sessions(bus: Bus, topic: str) -> list[tuple[str, int, int, bytes]]:
    """(producer, epoch, seq, payload) of every stored message on `topic`."""
    return [(producer, msgpack.unpackb(meta)["epoch"], seq, payload) for producer, seq, meta,
            payload in query(bus.db, "SELECT producer_id, producer_seq, meta, payload "
                                     "FROM messages WHERE topic = ? ORDER BY id", (topic,))]


@needs_c
def test_c_examples_publish_on_every_run_and_subscribe(docs_bus: tuple[Bus, dict[str, str]],
                                                       tmp_path: Path) -> None:
    bus, example_env = docs_bus
    publisher_src, subscriber_src = c_examples(bus)
    publisher = compile_c(publisher_src, tmp_path / "pub")
    subscriber = compile_c(subscriber_src, tmp_path / "sub", "-Wno-unused-function")
    sub = bus.spawn([str(subscriber)], env=example_env)
    with Publisher(bus.config(), producer_id="probe") as probe:
        # A subscription reaches the proxy some time after the connect.
        wait_for(lambda: probe.publish("orders.probe", b"p") and "frame 0: 12" in
                 sub.stdout.collect(), message="the C subscriber to receive a probe")
    for run in (1, 2):
        result = subprocess.run([str(publisher)], capture_output=True, text=True, timeout=30,
                                env={**bus.env, **example_env})
        assert result.returncode == 0, f"run {run}: exit {result.returncode} (3: bad keys, " \
                                       "2: no writer, 1: no proxy, 4: no acknowledgement)"
        first = 3 * run - 2
        assert result.stdout == f"stored: c-1 epoch {run} seqs {first}-{first + 2} " \
                                "(0 sent again)\n"
    assert [row[:3] for row in stored_sessions(bus, "orders.new")] == \
        [("c-1", 1, 1), ("c-1", 1, 2), ("c-1", 1, 3), ("c-1", 2, 4), ("c-1", 2, 5), ("c-1", 2, 6)]
    meta = msgpack.unpackb(query(bus.db, "SELECT meta FROM messages "
                                         "WHERE topic = 'orders.new'")[0][0])
    assert {k: meta[k] for k in ("producer", "epoch", "seq")} == \
        {"producer": "c-1", "epoch": 1, "seq": 1}
    assert list(meta) == ["producer", "epoch", "seq", "mac"], "signed with CURVE or without"
    session_macs_checked(bus)
    wait_for(lambda: sub.stdout.collect().count("frame 0: 10") == 6,
             message="the six messages at the C subscriber")
    lines = sub.stdout.collect()
    first = lines.index("frame 0: 10")
    assert lines[first:first + 3] == ["frame 0: 10", "frame 1: 8",
                                      f"frame 2: {len(msgpack.packb(meta))}"]
    sub.kill()


@needs_js
def test_javascript_example_publishes_on_every_run_and_subscribes(
        docs_bus: tuple[Bus, dict[str, str]]) -> None:
    bus, example_env = docs_bus
    example = js_examples()[0]
    print_line = "console.log(topic.toString(), payload.toString(), meta ? decode(meta, big) : {});"
    assert print_line in example
    example = local_endpoints(example, bus).replace(
        print_line, print_line + ' if (topic.toString() === "orders.done") process.exit(0);')
    script = JS_DIR / f"example-{os.getpid()}-{bus.tmp_path.name}.mjs"  # beside node_modules
    script.write_text(example)
    try:
        with Publisher(bus.config(), producer_id="py") as pub:
            for run in (1, 2):
                node = bus.spawn(["node", str(script)], env=example_env)
                # It exits 0 only after its message was acknowledged and a
                # "orders.done" reached its subscriber (published until one does).
                bus.wait_count(3 * run, "orders.new")

                def exited() -> bool:
                    if node.popen.poll() is not None:
                        return True
                    pub.publish("orders.done", '{"n": 1}', content_type="application/json")
                    return False
                wait_for(exited, interval=0.05, message="the JavaScript example to exit")
                assert node.wait() == 0, node.stderr.collect()
                first = 3 * run - 2
                assert f"stored: js-1 epoch {run} seqs {first}-{first + 2} (0 sent again)" \
                    in node.stdout.collect()
    finally:
        script.unlink()
    rows = stored_sessions(bus, "orders.new")
    assert [row[:3] for row in rows] == [("js-1", 1, 1), ("js-1", 1, 2), ("js-1", 1, 3),
                                         ("js-1", 2, 4), ("js-1", 2, 5), ("js-1", 2, 6)]
    assert [row[3] for row in rows] == [b'{"id":7}', b'{"id":8}', b'{"id":9}'] * 2
    session_macs_checked(bus)
    publish_ns = query(bus.db, "SELECT publish_ns FROM messages WHERE topic = 'orders.new'")
    assert all(ns > 10**18 for (ns,) in publish_ns)
    out = "\n".join(node.stdout.collect())
    assert 'orders.done {"n": 1}' in out and "producer: 'py'" in out


@needs_js
def test_javascript_durable_consumer_example_pages_and_stores_its_position(bus: Bus) -> None:
    example = js_examples()[1]
    with Publisher(bus.config(), producer_id="src") as pub:
        for i in range(7):
            pub.publish("orders.new" if i != 3 else "other.t", b"o%d" % i)
        pub.flush(timeout=10)
    first = run_js(bus, example)
    assert first.popen.returncode == 0, first.stderr.collect()
    assert first.stdout.collect() == [f"{i + 1} orders.new o{i} {i + 1}" for i in range(7)
                                      if i != 3]
    assert bus.writer_stats()["consumers"]["positions"]["js-audit"]["last_id"] == 7

    with Publisher(bus.config(), producer_id="src2") as pub:
        pub.publish("orders.new", b"late", wait=True)
    again = run_js(bus, example)
    assert again.popen.returncode == 0, again.stderr.collect()
    assert again.stdout.collect() == ["8 orders.new late 1"], "resumed after its position"


def gateway_js_example() -> str:
    (example,) = [code for code in js_examples() if "new WebSocket(url)" in code]
    return example


@needs_js
def test_the_gateway_javascript_example_runs_in_node(bus: Bus, tmp_path: Path) -> None:
    """The browser's WebSocket API, in Node (20: the `ws` package's, as the
    page says): it presents its token, replays, subscribes, publishes, and
    its publish is stored when it is answered."""
    from tests.test_gateway import Gateway, tokens_for
    made = tokens_for(bus, tmp_path / "tokens", {"desk": [
        "--list", "publishers", "--list", "readers", "--publish", "orders.", "--read",
        "orders."]})
    gw = Gateway(bus, BUS_GATEWAY_TOKENS_DIR=tmp_path / "tokens")
    with Publisher(bus.config(), producer_id="py") as pub:
        pub.publish("orders.old", b"before")
        pub.publish("other.t", b"not read")
        pub.flush(timeout=10)
    example = gateway_js_example().replace('"ws://127.0.0.1:5560/"', f'"{gw.url}"').replace(
        '"bus_TOKEN"', f'"{made["desk"]}"')
    node = run_js(bus, 'globalThis.WebSocket = (await import("ws")).WebSocket;\n' + example)
    out = node.stdout.collect()
    assert node.popen.returncode == 0, (out, node.stderr.collect())
    assert "stored: seq 1" in out and "stream 1: orders.old before" in out
    assert "stream 0: orders.web hello from js" in out and "closed 1000 done" in out
    assert not any("other.t" in line for line in out)
    assert query(bus.db, "SELECT payload FROM messages WHERE producer_id LIKE 'gw/desk/%'") == \
        [(b"hello from js",)]


def test_the_documented_session_mac_example_is_what_the_code_computes() -> None:
    """docs/protocol.md's worked example ("Authenticating a session"): its meta
    bytes and tag, for a foreign client to check its own code against."""
    text = PROTOCOL_MD.read_text()
    head = re.search(r"^meta before the tag +([0-9a-f ]+)$", text, re.M)
    tag = re.search(r"^tag +([0-9a-f ]+)$", text, re.M)
    assert head and tag, "the example is in docs/protocol.md"
    signer = protocol.SessionMac(b"\x01" * 32)
    meta = signer.signed_meta(b"t", b"p", {"producer": "p", "epoch": 1, "seq": 1})
    assert meta[:-16] == bytes.fromhex(head.group(1).replace(" ", ""))
    assert meta[-16:] == bytes.fromhex(tag.group(1).replace(" ", ""))
    assert signer.message_is_authentic(b"t", b"p", meta)
    ack_head = re.search(r"^ack before the tag +([0-9a-f ]+)$", text, re.M)
    ack_tag = re.search(r"^ack tag +([0-9a-f ]+)$", text, re.M)
    assert ack_head and ack_tag, "the acknowledgement example is in docs/protocol.md"
    topic = protocol.ack_topic("p")
    # The writer's own acknowledgement of seqs 1 and 3 (2 never arrived).
    ack = signer.notification(topic, ProducerState("p", max_seq=3, holes=[[2, 2]],
                                                   epoch=1).ack(0))
    assert ack[:-16] == bytes.fromhex(ack_head.group(1).replace(" ", ""))
    assert ack[-16:] == bytes.fromhex(ack_tag.group(1).replace(" ", ""))
    assert signer.notification_is_authentic(topic, ack)


def test_every_control_command_is_in_the_protocol_page(bus: Bus) -> None:
    """The writer's, the reader's and the proxy's commands, as each names them
    (the unknown_command reply lists them), are each documented; the
    Authentication table gives publishers and readers the writer commands its
    command table lets them run."""
    from bus.client import BusError, ControlClient
    page = PROTOCOL_MD.read_text()
    for endpoint in ("BUS_CONTROL_ENDPOINT", "BUS_READ_ENDPOINT", "BUS_PROXY_CONTROL_ENDPOINT"):
        with ControlClient(bus[endpoint], timeout_ms=3000) as client:
            with pytest.raises(BusError) as unknown:
                client.request("no-such-command")
        commands = str(unknown.value).rpartition("this process has ")[2].split(", ")
        assert len(commands) > 1, unknown.value
        missing = [cmd for cmd in commands if f"| `{cmd}`" not in page and
                   f"`{cmd}` `" not in page and f" `{cmd}` |" not in page]
        assert not missing, f"{endpoint}: not in docs/protocol.md's command tables: {missing}"
    writer = {command.name: command for command in code_tables()["writer"]}
    for role in (security.PUBLISHERS, security.READERS):
        allowed = {name for name, command in writer.items() if role in command.roles}
        row = next(line for line in page.splitlines() if line.startswith(f"| `{role}/*.key`"))
        documented = set(re.findall(r"`([a-z_]+)`", row.split("|")[3]))
        assert allowed <= documented, (role, allowed - documented)


def test_the_documented_seal_record_example_is_what_the_code_computes() -> None:
    """docs/protocol.md's worked example ("Audit seals", the seal record), for
    a verifier in another language to check its encoding against."""
    from proofs.audit import SEAL_RECORD, seal_document, seal_record
    text = PROTOCOL_MD.read_text()
    record = re.search(r"^seal record +([0-9a-f ]+)$", text, re.M)
    digest = re.search(r"^record hash +([0-9a-f]{64})$", text, re.M)
    assert record and digest, "the example is in docs/protocol.md"
    fields = (3, 1, 40, 30, 1, bytes(range(32)), ["orders.", "trades."])
    assert seal_record(*fields) == bytes.fromhex(record.group(1).replace(" ", ""))
    assert seal_document(SEAL_RECORD, *fields) == bytes.fromhex(digest.group(1))


# --- the command tables: docs/protocol.md against each process's table -------

class _Parts:
    """Stands in for a process's parts where only its command table is read:
    every attribute is another stand-in (a handler is never called)."""

    def __getattr__(self, name: str) -> _Parts:
        return _Parts()


def code_tables() -> dict[str, list[control.Command]]:
    """Each process's command table, as its code declares it (no process
    started: the writer's over stand-in parts, the others' as constructed)."""
    from anchor.worker import AnchorWorker
    from bus.config import load_config
    from proxy.service import Proxy
    from reader.service import Reader
    from writer.commands import writer_table
    config = load_config({"db": "/nonexistent/bus.db"}, env={})
    tables = {"writer": control.Dispatcher(writer_table(_Parts()), None).table}  # type: ignore
    for process, kind in (("reader", Reader), ("proxy", Proxy), ("anchor worker", AnchorWorker)):
        tables[process] = kind(config).dispatcher.table
    from gateway.service import Gateway
    tables["gateway"] = Gateway(config).commands
    return {process: list(table) for process, table in tables.items()}


@dataclasses.dataclass(frozen=True)
class DocumentedCommand:
    process: str
    name: str
    args: frozenset[str]
    roles: frozenset[str]
    errors: frozenset[str]
    line: int


def documented_commands(text: str) -> list[DocumentedCommand]:
    """Every row of a command table of the page: a table whose header has
    `cmd`, `args`, who and errors columns (and Process, or the writer's).
    Arguments and codes are the lowercase names in backticks of their cells
    (a value is written quoted, `"smallest"`; a setting in capitals); who, the
    key lists named in its cell."""
    rows: list[DocumentedCommand] = []
    columns: list[str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            columns = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if columns is None:
            # The gateway's table names an `op` and its arguments (beside `op`
            # in the request), the others a `cmd` and its `args`.
            cells = ["`cmd`" if c == "`op`" else "`args`" if c.startswith("arguments")
                     else c for c in cells]
            columns = cells if {"`cmd`", "`args`", "who", "errors"} <= set(cells) else []
            continue
        if not columns or set(line) <= set("|- "):
            continue
        row = dict(zip(columns, cells))
        names = re.findall(r"`([a-z_]+)`", row["`cmd`"])
        assert len(names) == 1, f"docs/protocol.md:{number}: one command a row: {line[:80]}"
        rows.append(DocumentedCommand(
            row.get("Process", "writer"), names[0],
            frozenset(re.findall(r"`([a-z_][a-z0-9_]*)`", row["`args`"])),
            frozenset(re.findall(r"\b(admins|publishers|readers)\b", row["who"])),
            frozenset(re.findall(r"`([a-z_][a-z0-9_]*)`", row["errors"])), number))
    return rows


def table_differences(text: str, tables: dict[str, list[control.Command]]) -> list[str]:
    """What docs/protocol.md's command tables say otherwise than the code's."""
    documented = documented_commands(text)
    problems = []
    seen = [(row.process, row.name) for row in documented]
    problems += [f"{process} {name}: documented twice" for process, name in sorted(set(seen))
                 if seen.count((process, name)) > 1]
    by_name = {(row.process, row.name): row for row in documented}
    for process, commands in tables.items():
        for command in commands:
            row = by_name.pop((process, command.name), None)
            if row is None:
                problems.append(f"{process} {command.name}: in no table of docs/protocol.md")
                continue
            args = {*command.args, *(["request_id"] if command.request_id is not None else [])}
            roles = {*command.roles, security.ADMINS}
            for what, code, doc in (("args", args, row.args), ("who", roles, row.roles),
                                    ("errors", command.codes, row.errors)):
                if set(code) != set(doc):
                    problems.append(f"docs/protocol.md:{row.line}: {process} {command.name} "
                                    f"{what}: the code has {sorted(code)}, the page "
                                    f"{sorted(doc)}")
    problems += [f"docs/protocol.md:{row.line}: {row.process} {row.name}: no such command in "
                 "its code" for row in by_name.values()]
    return problems


def test_the_command_tables_are_the_code_s() -> None:
    """Every command of every process is in a table of docs/protocol.md, with
    the arguments, the key lists that may run it and the error codes its
    declaration in the code names (bus/control.Command), and every command
    documented exists."""
    tables = code_tables()
    assert min(len(commands) for commands in tables.values()) > 1, tables
    assert table_differences(PROTOCOL_MD.read_text(), tables) == []


def test_the_table_check_sees_a_wrong_row() -> None:
    """A row with an argument, a key list or a code the code does not have,
    or a command the code does not have, is named."""
    tables = code_tables()
    text = PROTOCOL_MD.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| writer | `consumer_get`"))
    wrong = row.replace("| `consumer` | readers, admins | `bad_request` |",
                        "| `consumer`, `limit` | publishers, admins | `bad_request`, `busy` |")
    assert wrong != row
    problems = table_differences(text.replace(row, wrong + "\n" + row.replace(
        "`consumer_get`", "`consumer_gone`")), tables)
    assert [problem.split(": ", 1)[1] for problem in problems] == [
        "writer consumer_get args: the code has ['consumer'], the page ['consumer', 'limit']",
        "writer consumer_get who: the code has ['admins', 'readers'], the page "
        "['admins', 'publishers']",
        "writer consumer_get errors: the code has ['bad_request'], the page "
        "['bad_request', 'busy']",
        "writer consumer_gone: no such command in its code"], problems


# --- the publisher examples against a dropped message and forged notifications

# Each example's send of its three messages, and the same with the second
# message's mac damaged the first time it is sent (the writer drops it as not
# authentic, and never nacks it: the hole it leaves is what tells the client).
DAMAGED_SEND = {
    "c": ("        send_kept(pub, topic, m);\n    }",
          "        if (i == 1) m->meta.data[m->meta.size - 1] ^= 1;\n"
          "        send_kept(pub, topic, m);\n"
          "        if (i == 1) m->meta.data[m->meta.size - 1] ^= 1;\n    }"),
    "js": ("  await pub.send([topic, payload, meta]);\n}",
           "  await pub.send([topic, payload, i !== 1 ? meta : Buffer.concat(\n"
           "    [meta.subarray(0, -1), Buffer.from([meta[meta.length - 1] ^ 1])])]);\n}"),
}


def publisher_example(language: str, bus: Bus, tmp_path: Path, notify: str | None = None,
                      damaged: bool = False) -> list[str]:
    """The command that runs the page's publisher example in `language`, its
    notify endpoint `notify` (else the bus's), its second message damaged."""
    if language == "c":
        source = re.findall(r"```c\n(.*?)```", PROTOCOL_MD.read_text(), re.S)[0]
    else:
        source = js_examples()[0]
        source = source[:source.index("const s = new Subscriber(curve);")]  # no subscriber
    if notify is not None:
        source = source.replace("tcp://127.0.0.1:5556", notify)
    if damaged:
        before, after = DAMAGED_SEND[language]
        assert before in source
        source = source.replace(before, after)
    source = local_endpoints(source, bus)
    if language == "c":
        return [str(compile_c(source, tmp_path / "pub"))]
    script = JS_DIR / f"example-{os.getpid()}-{tmp_path.name}.mjs"  # beside node_modules
    script.write_text(source)
    return ["node", str(script)]


def run_example(argv: list[str], bus: Bus) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=bus.env)
    finally:
        if argv[0] == "node":
            Path(argv[1]).unlink()


LANGUAGES = [pytest.param("c", marks=needs_c), pytest.param("js", marks=needs_js)]


@pytest.mark.parametrize("language", LANGUAGES)
def test_publisher_examples_send_again_only_the_hole_a_dropped_message_leaves(
        language: str, bus: Bus, tmp_path: Path) -> None:
    result = run_example(publisher_example(language, bus, tmp_path, damaged=True), bus)
    assert result.returncode == 0, result.stderr
    producer = {"c": "c-1", "js": "js-1"}[language]
    assert result.stdout.splitlines()[-1] == f"stored: {producer} epoch 1 seqs 1-3 " \
                                             "(1 sent again)", "the hole alone, once"
    assert [row[:3] for row in stored_sessions(bus, "orders.new")] == \
        [(producer, 1, 1), (producer, 1, 3), (producer, 1, 2)]
    assert bus.writer_stats()["security"]["messages_not_authentic"] == 1


@contextlib.contextmanager
def relay_with_forged_tags(bus: Bus) -> Iterator[str]:
    """A notify endpoint that passes on every notification of the writer's
    with the last byte of its tag changed: a process that took the endpoint
    while the writer restarted, telling the truth without the session key."""
    ready: queue.Queue[str] = queue.Queue()
    stop = threading.Event()

    def relay() -> None:
        ctx = zmq.Context.instance()
        with ctx.socket(zmq.SUB) as real, ctx.socket(zmq.XPUB) as fake:
            real.connect(bus["BUS_NOTIFY_ENDPOINT"])
            real.subscribe(protocol.RESERVED_PREFIX.encode())
            ready.put(f"tcp://127.0.0.1:{fake.bind_to_random_port('tcp://127.0.0.1')}")
            while not stop.is_set():
                if real.poll(50):
                    topic, payload = real.recv_multipart()[:2]
                    fake.send_multipart([topic, payload[:-1] + bytes((payload[-1] ^ 1,))])
                while fake.poll(0):
                    fake.recv()  # subscriptions

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        yield ready.get(timeout=10)
    finally:
        stop.set()
        thread.join(10)


@pytest.mark.parametrize("language", LANGUAGES)
def test_publisher_examples_believe_no_acknowledgement_without_the_session_s_mac(
        language: str, bus: Bus, tmp_path: Path) -> None:
    with relay_with_forged_tags(bus) as notify:
        result = run_example(publisher_example(language, bus, tmp_path, notify=notify), bus)
    assert "stored:" not in result.stdout, "believed an acknowledgement the writer did not sign"
    assert result.returncode != 0
    assert bus.count("orders.new") == 3, "the messages were stored: only the tags were forged"


# --- the stats replies: docs/protocol.md's field lists against the processes' --

STATS_HEADINGS = {"writer": "Writer `stats`:", "reader": "Reader `stats`:",
                  "proxy": "Proxy `stats`:", "anchor worker": "Anchor worker `stats`:"}
_SECTION = re.compile(r"^([a-z_]+)(\??):\s")
# Innermost (...), [...] or {...}: stripped over and over, what is inside
# (explanations, a map's or a list's own fields) is no field of the section.
_BRACKETED = re.compile(r"\([^()\[\]{}]*\)|\[[^()\[\]{}]*\]|\{[^()\[\]{}]*\}")
_FIELD = re.compile(r"([a-z_][a-z0-9_]*)(\??)\s*$")


@dataclasses.dataclass(frozen=True)
class StatsField:
    conditional: bool                   # `name?`: there in some cases only; `name?:` nil
    fields: dict[str, bool] | None      # a section's fields (name -> conditional), or None


def _field_names(text: str) -> dict[str, bool]:
    """The fields a list names, each the last word of an item between commas
    once every bracketed part is gone ("with SQLite only: bytes?" -> bytes,
    conditional)."""
    while (stripped := _BRACKETED.sub("", text)) != text:
        text = stripped
    fields = {}
    for item in text.split(","):
        if item.strip():
            found = _FIELD.search(item)
            assert found, f"docs/protocol.md: not a stats field: {item.strip()!r}"
            fields[found.group(1)] = bool(found.group(2))
    return fields


def documented_stats(text: str) -> dict[str, dict[str, StatsField]]:
    """Each process's `stats` reply as docs/protocol.md lists it: the code
    block after its heading, where a line `name: fields` is a section (a map
    of those fields; `name?:`, or nil) and other lines name top-level fields."""
    processes = {}
    for process, heading in STATS_HEADINGS.items():
        opening = heading + "\n\n```\n"
        start = text.find(opening)
        if start < 0:
            continue
        block = text[start + len(opening):].split("```", 1)[0]
        groups: list[tuple[str | None, list[str]]] = []
        for line in block.splitlines():
            section = _SECTION.match(line)
            if section:
                groups.append((section.group(1) + section.group(2), [line[section.end():]]))
            elif line[:1] not in ("", " ") and (not groups or groups[-1][0] is not None):
                groups.append((None, [line]))
            else:
                groups[-1][1].append(line)
        documented: dict[str, StatsField] = {}
        for name, lines in groups:
            if name is None:
                documented.update({field: StatsField(conditional, None) for field, conditional
                                   in _field_names("\n".join(lines)).items()})
            else:
                documented[name.rstrip("?")] = StatsField(name.endswith("?"),
                                                          _field_names("\n".join(lines)))
        processes[process] = documented
    return processes


def stats_differences(process: str, documented: dict[str, StatsField] | None,
                      reply: dict[str, Any]) -> tuple[list[str], set[tuple[str, ...]]]:
    """What `reply` (a process's real `stats`) has that the page does not list,
    and what the page lists as always there that the reply lacks; and the
    conditional fields the reply has (as paths)."""
    if documented is None:
        return [f"{process}: no list of its stats fields in docs/protocol.md "
                f"({STATS_HEADINGS[process]!r} and a code block)"], set()
    problems, seen = [], set()

    def compare(where: str, listed: dict[str, bool], actual: dict[str, Any]) -> list[str]:
        return ([f"{process}: {where}{name} is in the reply, not in docs/protocol.md"
                 for name in actual if name not in listed] +
                [f"{process}: {where}{name} is in docs/protocol.md (not marked `?`), not in "
                 "the reply" for name, conditional in listed.items()
                 if not conditional and name not in actual])

    problems += compare("", {name: field.conditional for name, field in documented.items()},
                        reply)
    for name, field in documented.items():
        if name not in reply:
            continue
        if field.conditional and reply[name] is not None:
            seen.add((process, name))
        if field.fields is None or (field.conditional and reply[name] is None):
            continue
        if not isinstance(reply[name], dict):
            problems.append(f"{process}: {name} is documented as a map of fields, the reply's "
                            f"is {reply[name]!r}")
            continue
        problems += compare(f"{name}.", field.fields, reply[name])
        seen |= {(process, name, sub) for sub, conditional in field.fields.items()
                 if conditional and sub in reply[name]}
    return problems, seen


def conditional_fields(documented: dict[str, dict[str, StatsField]]) -> set[tuple[str, ...]]:
    paths = set()
    for process, fields in documented.items():
        for name, field in fields.items():
            if field.conditional:
                paths.add((process, name))
            paths |= {(process, name, sub) for sub, conditional in (field.fields or {}).items()
                      if conditional}
    return paths


def test_the_stats_field_lists_are_the_processes_replies(make_bus, node, tmp_path: Path,
                                                         request: pytest.FixtureRequest) -> None:
    """docs/protocol.md's lists of the writer's, the reader's, the proxy's and
    the anchor worker's `stats` fields against each process's real reply,
    both ways: every field of a reply is listed, and every field listed is in
    every reply unless marked `name?`; each field so marked is seen in at
    least one of the buses (CURVE off, with an anchor worker sealing; CURVE
    on; SQLite and, with its binaries, PostgreSQL)."""
    from tests.test_anchor import FAST, bus_for, start_worker
    from tests.test_edge import Edge
    anchoring = [bus_for(make_bus, node, BUS_AUDIT_PREFIXES="orders."),
                 curve_bus(make_bus, tmp_path / "curve-bus", **FAST, **{
                     "BUS_BITCOIND_RPC_URL": node.url, "BUS_BITCOIND_RPC_USER": node.user,
                     "BUS_BITCOIND_RPC_PASSWORD": node.password})[0]]
    for bus in anchoring:  # the worker runs as the bus's own client: an admin with CURVE
        start_worker(bus)
        wait_for(lambda bus=bus: "height" in bus.request("BUS_ANCHOR_CONTROL_ENDPOINT", "stats")[
            "bitcoind"], message="the anchor worker to have asked bitcoind for its best block")
    buses = {"CURVE off": anchoring[0], "CURVE on": anchoring[1]}
    try:
        buses["PostgreSQL"] = make_bus(
            BUS_DB=request.getfixturevalue("pg_server").create_database()).start()
    except pytest.skip.Exception:  # no PostgreSQL here: its fields are not checked
        pass
    documented = documented_stats(PROTOCOL_MD.read_text())
    assert "load:     requests_per_second" in PROTOCOL_MD.read_text()
    problems, seen = [], set()
    for name, bus in buses.items():
        replies = {"writer": bus.writer_stats(), "proxy": bus.proxy_stats(),
                   "reader": bus.request("BUS_READ_ENDPOINT", "stats")}
        if bus in anchoring:
            replies["anchor worker"] = bus.request("BUS_ANCHOR_CONTROL_ENDPOINT", "stats")
        checked = [(name, process, reply) for process, reply in replies.items()]
        if bus is anchoring[0]:  # an edge proxy's reply is held to the proxy's list too
            checked.append((f"{name}, an edge", "proxy", Edge(bus).stats()))
        for label, process, reply in checked:
            found, conditional = stats_differences(process, documented.get(process), reply)
            problems += [f"{label}: {problem}" for problem in found]
            seen |= conditional
    # A hot standby's reader: its fields are checked by tests/test_replica.py.
    never = conditional_fields(documented) - seen - {("reader", "replica")}
    if "PostgreSQL" not in buses:
        never = {path for path in never if path[:2] != ("writer", "wal")}
    problems += [f"{'.'.join(path)} is marked `?` in docs/protocol.md and was in no reply"
                 for path in sorted(never)]
    assert problems == [], "\n".join(problems)


def test_the_stats_check_sees_a_wrong_list() -> None:
    """A field the page lists that a reply lacks, a field a reply has that the
    page does not list, and a `?` field are each told apart."""
    text = PROTOCOL_MD.read_text()
    documented = documented_stats(text.replace(
        "load:     requests_per_second, is_low_load,",
        "load:     requests_per_second, was_low_load, maybe_later?, is_low_load,"))
    reply = {name: ({sub: 0 for sub in field.fields if not field.fields[sub]}
                    if field.fields is not None else 0)
             for name, field in documented["writer"].items() if not field.conditional}
    reply["load"].pop("was_low_load")
    reply["load"]["window_minutes"] = 1
    reply["uptime_hours"] = 1
    problems, seen = stats_differences("writer", documented["writer"], reply)
    assert sorted(problems) == [
        "writer: load.was_low_load is in docs/protocol.md (not marked `?`), not in the reply",
        "writer: load.window_minutes is in the reply, not in docs/protocol.md",
        "writer: uptime_hours is in the reply, not in docs/protocol.md"], problems
    assert ("writer", "load", "maybe_later") in conditional_fields(documented) - seen
