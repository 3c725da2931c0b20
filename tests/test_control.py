"""The command layer in-process (bus/control.py, writer/commands.py): the
writer's table run by a Dispatcher over a temporary SQLite database, no
process and no socket: request-id replay, one transaction a command, a
refusal that leaves nothing behind, and who may run what, read from the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq.auth

import storage
from bus import control, protocol, security
from bus.config import load_config
from bus.logging import get_logger
from proofs.merkle import MerkleTree
from writer.anchors import AnchorBook
from writer.audit import AuditBook
from writer.commands import writer_table
from writer.utxos import UtxoBook

FUNDING = "aa" * 32
FIRST, SECOND = "bb" * 32, "cc" * 32


class StandInWriter:
    """The parts of a Writer the table reads: the books over a real store;
    the commands that need the whole writer answer their own name."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.utxos = UtxoBook(store.conn, store.transaction, 3600.0, 3600.0)
        self.anchors = AnchorBook(store.conn, self.utxos.spend)
        self.audit = AuditBook(store.conn)

    def __getattr__(self, name: str) -> Any:
        return lambda *_args: name


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[StandInWriter]:
    store = storage.open_store(str(tmp_path / "bus.db"))
    try:
        yield StandInWriter(store)
    finally:
        store.close()


def dispatcher_of(writer: StandInWriter, **options: Any) -> control.Dispatcher:
    return control.Dispatcher(writer_table(writer), get_logger("test"), **options)  # type: ignore[arg-type]


def ask(dispatcher: control.Dispatcher, cmd: str, args: dict[str, Any] | None = None,
        user: str | None = None) -> dict[str, Any]:
    return msgpack.unpackb(dispatcher.handle([protocol.encode_request(1, cmd, args)], user))


def result(reply: dict[str, Any]) -> Any:
    assert reply["ok"], reply
    return reply["result"]


def funded(dispatcher: control.Dispatcher) -> None:
    result(ask(dispatcher, "utxo_tip", {"height": 100, "hash": "dd" * 32}))
    result(ask(dispatcher, "utxo_upsert", {"utxos": [
        {"txid": FUNDING, "vout": 0, "amount_sat": 50_000, "block_height": 90}]}))


def test_a_request_id_replays_its_reply_and_refuses_other_arguments(
        writer: StandInWriter) -> None:
    dispatcher = dispatcher_of(writer)
    funded(dispatcher)
    reserve = {"request_id": "r-1", "min_amount_sat": 1000, "lease_seconds": 60}
    first = result(ask(dispatcher, "utxo_reserve", reserve))
    assert result(ask(dispatcher, "utxo_reserve", reserve)) == first
    assert writer.utxos.counters["replayed"] == 1
    reused = ask(dispatcher, "utxo_reserve", {**reserve, "min_amount_sat": 2000})
    assert reused["error"]["code"] == protocol.REQUEST_ID_REUSED
    missing = ask(dispatcher, "utxo_reserve", {"min_amount_sat": 1000, "lease_seconds": 60})
    assert missing["error"]["code"] == protocol.BAD_REQUEST
    assert dispatcher.counters.bad_requests == 1, "a missing request id is the client's fault"


def test_a_refused_command_leaves_nothing_of_its_transaction(writer: StandInWriter) -> None:
    """anchor_record spends the leased UTXO, then finds the lease spent by
    another anchor and refuses: the spend it made is rolled back with it."""
    dispatcher = dispatcher_of(writer)
    funded(dispatcher)
    lease = result(ask(dispatcher, "utxo_reserve", {"request_id": "r", "min_amount_sat": 1,
                                                     "lease_seconds": 60}))["lease_id"]
    record = {"request_id": "a-1", "root": MerkleTree([b"\x02" * 32]).root, "size": 1,
              "documents": [[b"\x02" * 32, None, None]], "txid": FIRST, "raw_tx": b"tx",
              "fee_sat": 200, "vsize": 150, "lease_id": lease, "change": [], "tip_height": 100}
    result(ask(dispatcher, "anchor_record", record))
    again = ask(dispatcher, "anchor_record", {**record, "request_id": "a-2", "txid": SECOND,
                                              "root": MerkleTree([b"\x03" * 32]).root,
                                              "documents": [[b"\x03" * 32, None, None]]})
    assert again["error"]["code"] == protocol.BAD_REQUEST, again
    utxo = result(ask(dispatcher, "utxo_get", {"txid": FUNDING, "vout": 0}))
    assert (utxo["status"], utxo["spending_txid"]) == ("spent", FIRST)
    assert result(ask(dispatcher, "anchor_known", {"hashes": [b"\x03" * 32]}))["known"] == []
    assert writer.anchors.counters["recorded"] == 1


def test_who_may_run_a_command_is_read_from_the_table(writer: StandInWriter,
                                                      tmp_path: Path) -> None:
    curve = tmp_path / "curve"
    keys = {}
    for role in ("publishers", "readers", "admins"):
        (curve / role).mkdir(parents=True)
        public, _ = zmq.auth.create_certificates(curve / role, role)
        keys[role] = zmq.auth.load_certificate(public)[0].decode()
    zmq.auth.create_certificates(curve, "server")
    security.load_keyring.cache_clear()
    config = load_config({"curve_dir": str(curve), "db": str(tmp_path / "bus.db")}, env={})
    dispatcher = dispatcher_of(writer, config=config, authorized=True)
    table = {command.name: command for command in dispatcher.table}
    for role in ("publishers", "readers"):
        for name, command in table.items():
            reply = ask(dispatcher, name, {}, keys[role])
            may = role in command.roles
            assert (reply.get("error", {}).get("code") != protocol.FORBIDDEN) == may, \
                (role, name, reply)
    assert {name for name, c in table.items() if "publishers" in c.roles} == \
        {"ping", "config", "stats", "producer_open", "producer_status"}
    assert {name for name, c in table.items() if "readers" in c.roles} == \
        {"ping", "config", "stats", "consumer_ack", "consumer_get"}
    refused = ask(dispatcher, "flush", {}, keys["publishers"])["error"]
    assert refused["reason"] == \
        "forbidden: 'flush' needs a key in admins/; this key is in publishers/"
    refused = ask(dispatcher, "stats", {}, None)["error"]
    assert refused["reason"] == ("forbidden: 'stats' needs a key in publishers/ or readers/ "
                                 "or admins/; this key is in no list (revoked?)")
    assert all(ask(dispatcher, name, {}, keys["admins"]).get("error", {}).get("code")
               != protocol.FORBIDDEN for name in table)
    security.load_keyring.cache_clear()


def test_a_table_refuses_what_cannot_be_run() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        control.CommandTable((control.Command("a", print), control.Command("a", print)))
    with pytest.raises(ValueError, match="needs a runner"):
        control.CommandTable((control.Command("a", print, transaction=True),))
    with pytest.raises(ValueError, match="request_id needs transaction"):
        control.Command("a", print, request_id=True)
    with pytest.raises(ValueError, match="beyond the 'read' endpoint"):
        control.Dispatcher([control.Command("a", print, roles=(security.PUBLISHERS,))], None,
                           domain="read")
