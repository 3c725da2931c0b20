"""Pure logic, no processes: config precedence, the batch buffer, load meter, protocol."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from bus import protocol
from bus.config import ConfigError, load_config
from bus.logging import RateLimitedLog
from tests.conftest import subcommands
from writer.batch import BatchBuffer, BatchMetrics, LoadMeter

# --- config ----------------------------------------------------------------------


def test_config_defaults_are_the_seed_contract() -> None:
    cfg = load_config(env={}, config_path=None)
    assert (cfg.batch_write_enabled, cfg.batch_size, cfg.batch_flush_interval_ms,
            cfg.batch_max_buffer_size) == (True, 100, 50, 10000)
    assert cfg.pub_endpoint == "tcp://127.0.0.1:5550" and cfg.db == "bus.db"


def test_config_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "bus.toml"
    path.write_text('BATCH_SIZE = 500\nBUS_DB = "/from/file.db"\nBATCH_FLUSH_INTERVAL_MS = 7\n')
    cfg = load_config({"batch_size": 900, "db": None},
                      env={"BUS_DB": "/from/env.db", "BATCH_WRITE_ENABLED": "false"},
                      config_path=path)
    assert cfg.batch_size == 900            # flag beats file
    assert cfg.db == "/from/env.db"         # env beats file; a None flag is "not given"
    assert cfg.batch_flush_interval_ms == 7  # file beats default
    assert cfg.batch_write_enabled is False
    assert cfg.batch_max_buffer_size == 10000
    assert cfg.source == f"defaults < {path} < environment < flags"


def test_config_file_from_environment_variable(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text("BATCH_SIZE = 3\n")
    assert load_config(env={"BUS_CONFIG": str(path)}).batch_size == 3


@pytest.mark.parametrize("env, message", [
    ({"BATCH_SIZE": "lots"}, "BATCH_SIZE: expected a number"),
    ({"BATCH_SIZE": "0"}, "BATCH_SIZE must be at least 1"),
    ({"BATCH_WRITE_ENABLED": "maybe"}, "expected true/false"),
    ({"BATCH_SIZE": "20000"}, "must not exceed BATCH_MAX_BUFFER_SIZE"),
    ({"BUS_SQLITE_SYNCHRONOUS": "sometimes"}, "NORMAL, FULL"),
    ({"BUS_DB": "host=db1 password=s3cret"}, "^(?!.*s3cret).*looks like a libpq keyword string"),
    ({"BUS_DB": "mysql://u@db1/bus"}, "only postgresql:// URLs and SQLite files"),
    ({"BUS_CONTROL_ENDPOINT": "127.0.0.1:5553"}, "must be tcp://HOST:PORT"),
    ({"BUS_PUB_ENDPOINT": "tcp://*:70000"}, "has port 70000: ports are 1-65535"),
    ({"BUS_READ_ENDPOINT": "tcp://host"}, "must be tcp://HOST:PORT"),
    ({"BUS_LOG_LEVEL": "verbose"}, "BUS_LOG_LEVEL must be one of debug, info"),
    ({"BUS_REQUEST_TIMEOUT_MS": "-5"}, "BUS_REQUEST_TIMEOUT_MS must be at least 1"),
    ({"BUS_CAPTURE_HWM": str(2**63)}, "BUS_CAPTURE_HWM must be at most 2147483647"),
    ({"BUS_SHUTDOWN_TIMEOUT_MS": "-1"}, "must not be negative"),
    ({"BUS_ANCHOR_INTERVAL_S": "nan"}, "expected a number"),
    ({"BUS_WRITER_HTTP": "9101"}, "BUS_WRITER_HTTP must be host:port"),
    ({"BUS_PROXY_MEMORY_LIMIT_BYTES": "-1"}, "must be 0 .off. or at least"),
])
def test_config_rejects_bad_values_with_the_variable_name_and_its_origin(env, message) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        load_config(env=env)
    [name] = env
    assert str(refused.value).endswith(f"(from environment {name})")


def test_config_says_where_each_value_came_from(tmp_path: Path) -> None:
    path = tmp_path / "bus.toml"
    path.write_text('BATCH_SIZE = 7\nBUS_LOG_LEVEL = "loud"\n')
    with pytest.raises(ConfigError, match=f"BUS_LOG_LEVEL .* \\(from config file {path}\\)"):
        load_config(env={}, config_path=path)
    path.write_text("BATCH_SIZE = 7\n")
    cfg = load_config({"db": "x.db"}, env={"BUS_SUB_HWM": "9"}, config_path=path)
    assert (cfg.origins["batch_size"], cfg.origins["sub_hwm"], cfg.origins["db"],
            cfg.origins["pub_hwm"]) == (f"config file {path}", "environment BUS_SUB_HWM",
                                        "flag --db", "default")
    with pytest.raises(ConfigError, match="from flag --batch-size"):
        load_config({"batch_size": 0}, env={}, config_path=path)


def test_config_file_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "bus.toml"
    path.write_text("BATCH_SIZ = 5\n")
    with pytest.raises(ConfigError, match="unknown settings BATCH_SIZ"):
        load_config(env={}, config_path=path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(env={}, config_path=tmp_path / "missing.toml")


def test_the_bounds_the_config_checks_limits_against_are_what_they_stand_for() -> None:
    """The room for a session's meta, the longest topic a history request can
    name, and the most documents of one anchor_record, against the code that
    sets them: a producer id of 128 four-byte characters, the reader's request
    frame, the writer's count of maps and arrays."""
    from bus import sockets
    from bus.config import (
        ANCHOR_DOCUMENTS_MAX,
        CURVE_FRAME_OVERHEAD_BYTES,
        SESSION_META_MAX_BYTES,
        TOPIC_BYTES_MAX,
    )
    most = 2**64 - 1
    meta = protocol.MetaEncoder("\U0010FFFF" * protocol.MAX_PRODUCER_CHARS, most,
                                protocol.SessionMac(bytes(32))).encode(
        most, time_ns=most, ack=True, content_type="application/octet-stream")
    assert len(meta) <= SESSION_META_MAX_BYTES
    history = protocol.encode_request(f"{2**22}-{most}", "history", {
        "prefixes": ["\U0010FFFF" * (TOPIC_BYTES_MAX // 4)], "after_id": most, "limit": most})
    assert len(history) + CURVE_FRAME_OVERHEAD_BYTES <= sockets.MAX_SMALL_REQUEST_BYTES
    change = [{"txid": "ab" * 32, "vout": 1, "amount_sat": 1, "address": "bc1q",
               "script_pubkey": "00"}]

    def anchor_record(documents: int) -> list[bytes]:
        return [protocol.encode_request("1-1", "anchor_record", {
            "request_id": "r", "root": bytes(32), "size": documents, "lease_id": "l",
            "tip_height": 1, "txid": "ab" * 32, "raw_tx": b"", "fee_sat": 1, "vsize": 1,
            "change": change, "documents": [[bytes(32), None, i] for i in range(documents)]})]
    assert protocol.decode_request(anchor_record(ANCHOR_DOCUMENTS_MAX))[1] == "anchor_record"
    with pytest.raises(protocol.ProtocolError, match="maps and arrays"):
        protocol.decode_request(anchor_record(protocol.MAX_REQUEST_CONTAINERS))


# --- a database URL's secrets ---------------------------------------------------

SECRET = "Sekr1tZ"
UNREADABLE = "<a postgresql:// URL libpq cannot read"


@pytest.mark.parametrize("url, shown", [
    # libpq percent-decodes query keys: this is its password
    (f"postgresql://u@h:5432/db?pass%77ord={SECRET}", "postgresql://u:***@h:5432/db"),
    (f"postgresql://u@h/db?sslpassword={SECRET}&sslmode=require",
     "postgresql://u@h/db?sslmode=require&sslpassword=***"),
    # libpq takes the last of a repeated key; neither is shown
    (f"postgresql://u@h/db?password={SECRET}1&password={SECRET}2", "postgresql://u:***@h/db"),
    (f"postgresql://u@h/db?passw%6Frd={SECRET}1&password={SECRET}2",
     "postgresql://u:***@h/db"),
    # '@', ':' and '%' percent-encoded in the user info's password
    (f"postgresql://u:{SECRET}%40x%3Ay%25z@h/db", "postgresql://u:***@h/db"),
    (f"postgresql://u%40corp:{SECRET}@h/db", "postgresql://u%40corp:***@h/db"),
    (f"postgresql://:{SECRET}@h/db", "postgresql://:***@h/db"),
    (f"postgresql://u:{SECRET}?x@h/db", "postgresql://u:***@h/db"),  # libpq: '?' in userinfo
    (f"postgresql://h/db?password=a@{SECRET}", "postgresql://:***@h/db"),
    (f"postgres://u:{SECRET}@h/db", "postgres://u:***@h/db"),
    # the other secrets libpq marks
    (f"postgresql://h/db?oauth_client_secret={SECRET}",
     "postgresql://h/db?oauth_client_secret=***"),
    (f"postgresql://h/db?scram_client_key={SECRET}", "postgresql://h/db?scram_client_key=***"),
    # libpq cannot parse these, and its error quotes the password: nothing shown
    (f"postgresql://u@h/db?password=%zz{SECRET}", UNREADABLE),
    (f"postgresql://u@h/db?password={SECRET}%00", UNREADABLE),
    (f"postgresql://u:{SECRET}@[::1/db", UNREADABLE),
    (f"postgresql://u@h/db?PASSWORD={SECRET}", UNREADABLE),  # keys are case-sensitive
    (f"postgresql://u@h/db?bogus=1&password={SECRET}", UNREADABLE),
    # libpq parses these, but reads the password as host, port or database
    (f"postgresql://u:{SECRET}@{SECRET}@h/db", UNREADABLE),
    (f"postgresql://u:{SECRET}/x@h/db", UNREADABLE),
    (f"postgresql://u:{SECRET}/x?password={SECRET}@h/db", UNREADABLE),
    (f"postgresql://u:{SECRET}x/y?password=z@h/db", UNREADABLE),
])
def test_a_postgresql_urls_secrets_are_hidden_as_libpq_reads_them(url: str, shown: str) -> None:
    from bus.config import redact_url
    assert redact_url(url).startswith(shown) and SECRET not in redact_url(url)


@pytest.mark.parametrize("url", [
    "postgresql://bus@127.0.0.1:5432/bus_0a1b", "postgresql://u@[::1]:5432/db",
    "postgresql:///db?host=/run/postgresql&port=5433", "postgresql://h/d%20b?sslmode=require",
    "postgresql:///db?host=h1,h2&port=5432,5433",
])
def test_a_postgresql_url_without_secrets_is_shown_as_given(url: str) -> None:
    from bus.config import redact_url
    assert redact_url(url) == url


def test_every_option_libpq_keeps_secret_is_hidden() -> None:
    """libpq's own list (PQconndefaults' dispchar "*" or "D"), whatever its version."""
    from psycopg import pq

    from bus.config import redact_url
    secret = [o.keyword.decode() for o in pq.Conninfo.get_defaults() if o.dispchar == b"*"]
    assert {"password", "sslpassword"} <= set(secret)
    for keyword in secret:
        assert SECRET not in redact_url(f"postgresql://h/db?{keyword}={SECRET}"), keyword


# --- batch buffer, metrics, load -------------------------------------------------

ROW = ("t", b"p", None, None, None, None)


def test_buffer_is_due_by_size_then_by_time() -> None:
    buf = BatchBuffer(batch_size=3, flush_interval=0.05, max_size=10)
    assert buf.due(0.0) is None and buf.seconds_until_due(0.0) is None
    buf.add_message(ROW, 10.0)
    buf.add_consumption(("c", 1, 0, None), 10.01)
    assert buf.due(10.02) is None and buf.room == 1
    assert buf.seconds_until_due(10.02) == pytest.approx(0.03)
    assert buf.due(10.05) == "time"       # the oldest row's age counts
    buf.add_message(ROW, 10.02)
    assert buf.due(10.02) == "size" and buf.room == 0
    assert buf.sizes() == {"messages": 2, "consumptions": 1, "subscriptions": 0}
    buf.clear()
    assert len(buf) == 0 and buf.due(99.0) is None


def test_buffer_is_full_at_its_byte_budget_and_gives_back_a_committed_part() -> None:
    buf = BatchBuffer(batch_size=100, flush_interval=1.0, max_size=1000, max_bytes=3000)
    big = ("t", b"x" * 999, None, None, None, None)  # 1,000 bytes with its topic
    for i in range(3):
        assert not buf.is_full
        buf.add_message(big, float(i))
    assert buf.is_full and buf.bytes == 3000
    buf.add_consumption(("c", 1, 0, None), 3.0)
    buf.take(2)
    assert buf.bytes == 1000 and len(buf.messages) == 1 and buf.consumptions == []
    buf.take(1)
    assert buf.bytes == 0 and len(buf) == 0 and buf.oldest_at is None


def test_replay_gives_the_states_of_a_committed_part_only() -> None:
    """The ledger rows stored with part of the buffer must describe exactly the
    messages of that part (a crash between parts must not lose any seq)."""
    from writer.producers import ProducerLedger, ProducerState
    committed = ProducerState("p", max_seq=4, epoch=2)
    ledger = ProducerLedger(lambda pid: committed.row() if pid == "p" else None)
    rows = [("t", b"", protocol.encode_meta("p", seq, 2), "p", seq, None) for seq in (5, 6, 8)]
    rows += [("t", b"", protocol.encode_meta("p", 7), "p", 7, None),           # no session
             ("t", b"", protocol.encode_meta("q", 1, 1), "q", 1, None)]        # unknown
    states = {state.producer_id: state for state in ledger.replay(rows)}
    assert (states["p"].max_seq, states["p"].holes, states["p"].contiguous_seq) == (8, [[7, 7]], 6)
    assert "q" not in states  # its session is not committed: nothing of it to store
    assert committed.max_seq == 4, "the committed state itself is not touched"


def test_replay_gives_up_no_hole_and_reads_any_meta_the_writer_took() -> None:
    """A part's ledger rows must not give up a hole (it would be acknowledged
    while its message may still wait in the buffer), and a meta with an
    integer key (the writer takes those) must not stop the replay."""
    from writer.producers import ProducerLedger, ProducerState
    committed = ProducerState("p", max_seq=0, epoch=1)
    ledger = ProducerLedger(lambda pid: committed.row(), max_holes=2)
    seqs = [2, 4, 6, 8, 10]  # holes at 1, 3, 5, 7, 9: more than max_holes
    rows = [("t", b"", msgpack.packb({1: 0, "producer": "p", "epoch": 1, "seq": seq}), "p",
             seq, None) for seq in seqs]
    (state,) = ledger.replay(rows)
    assert state.holes == [[1, 1], [3, 3], [5, 5], [7, 7], [9, 9]]
    assert state.contiguous_seq == 0 and state.abandoned == 0


def test_buffer_reports_full_at_its_bound() -> None:
    buf = BatchBuffer(batch_size=2, flush_interval=1.0, max_size=4)
    for i in range(4):
        assert not buf.is_full
        buf.add_message(ROW, float(i))
    assert buf.is_full


def test_metrics_count_flushes_by_reason() -> None:
    m = BatchMetrics()
    m.record_flush(100, "size", 0.002, batched=True)
    m.record_flush(20, "time", 0.001, batched=True)
    m.record_flush(5, "shutdown", 0.001, batched=True)
    snap = m.snapshot()
    assert (snap["total_flushes"], snap["total_writes"], snap["total_batched_items"]) == \
        (3, 125, 125)
    assert (snap["flush_by_size"], snap["flush_by_time"], snap["flush_by_shutdown"]) == (1, 1, 1)
    assert (snap["avg_batch_size"], snap["max_batch_size"], snap["min_batch_size"]) == \
        (41.67, 100, 5)
    assert snap["max_flush_ms"] == 2.0
    unbatched = BatchMetrics()
    unbatched.record_flush(1, "size", 0.001, batched=False)
    assert unbatched.snapshot()["total_batched_items"] == 0


def test_load_meter_window() -> None:
    meter = LoadMeter(threshold=100, window_seconds=2)
    assert meter.is_low_load(0.0)
    meter.record(150, 100.2)
    meter.record(150, 101.7)
    assert meter.requests_per_second(101.9) == 150.0
    assert not meter.is_low_load(101.9)
    assert meter.requests_per_second(102.5) == 75.0   # the first second left the window
    assert meter.is_low_load(102.5)
    assert meter.requests_per_second(110.0) == 0.0
    assert meter.snapshot(110.0) == {"requests_per_second": 0.0, "is_low_load": True,
                                     "threshold": 100, "window_seconds": 2}


def test_rate_limited_log_counts_what_it_suppresses() -> None:
    calls = []

    class Sink:
        def warning(self, event, **fields):
            calls.append((event, fields))

    log = RateLimitedLog(Sink(), interval=5.0)
    for i in range(10):
        log.warning("meta_not_map", "message_rejected", now=100.0 + i * 0.1)
    log.warning("too_few_frames", "message_rejected", now=100.5)
    log.warning("meta_not_map", "message_rejected", now=105.5)
    assert [(f["reason"], f["suppressed_since_last"]) for _, f in calls] == \
        [("meta_not_map", 0), ("too_few_frames", 0), ("meta_not_map", 9)]


# --- protocol --------------------------------------------------------------------

def test_meta_round_trip_keeps_unknown_keys() -> None:
    raw = protocol.encode_meta("p-1", 3, time_ns=5, content_type="application/json",
                               headers={"k": "v"}, ack=True)
    meta = protocol.decode_meta(raw)
    assert meta == {"producer": "p-1", "seq": 3, "time_ns": 5,
                    "content_type": "application/json", "headers": {"k": "v"}, "ack": True}
    extra = msgpack.packb({"seq": 1, "x-custom": [1, 2]})
    assert protocol.parse_message([b"t", b"p", extra]).meta["x-custom"] == [1, 2]


@pytest.mark.parametrize("frames, reason", [
    ([b"t"], "too_few_frames"),
    ([b"t", b"p", b"m", b"x"], "too_many_frames"),
    ([b"", b"p"], "empty_topic"),
    ([b"\xc3\x28", b"p"], "topic_not_utf8"),
    ([b"x" * 9, b"p"], "topic_too_long"),
    ([b"\x01sub", b"p"], "topic_control_char"),
    ([b"t", b"p" * 100], "message_too_large"),
    ([b"t", b"p", b"\xc1"], "meta_not_msgpack"),
    ([b"t", b"p", msgpack.packb("str")], "meta_not_map"),
    ([b"t", b"p", msgpack.packb({"seq": 0})], "meta_bad_value"),
    ([b"t", b"p", msgpack.packb({"producer": 5})], "meta_bad_value"),
    ([b"t", b"p", msgpack.packb({"time_ns": 1.5})], "meta_bad_value"),
])
def test_decode_message_rejects_with_a_reason(frames, reason) -> None:
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode_message(frames, max_topic_bytes=8, max_message_bytes=64)
    assert err.value.reason == reason


def test_two_frame_message_has_no_meta() -> None:
    assert protocol.decode_message([b"a.b", b""], 8, 64) == ("a.b", b"", None, {})


def test_the_proxy_subscribes_to_exactly_the_first_bytes_of_storable_topics() -> None:
    first_bytes = {chr(c).encode("utf-8")[0] for c in range(0x20, 0x110000)
                   if not 0xD800 <= c <= 0xDFFF}
    assert set(protocol.TOPIC_FIRST_BYTES) == first_bytes - {ord("$")}
    assert set(protocol.PROXY_SUBSCRIPTIONS) == {bytes((b,)) for b in protocol.TOPIC_FIRST_BYTES}


def test_control_request_and_reply_shapes() -> None:
    assert protocol.decode_request([protocol.encode_request(7, "stats")]) == (7, "stats", {})
    with pytest.raises(protocol.ProtocolError, match="one frame, not 2"):
        protocol.decode_request([protocol.encode_request(7, "stats"), b"x"])
    with pytest.raises(protocol.RequestError) as err:
        protocol.decode_request([msgpack.packb({"id": "x", "args": {}})])
    assert err.value.request_id == "x" and err.value.reason == "bad_request"
    reply = protocol.decode_reply(protocol.encode_reply_error(7, "flush_failed", "disk full"))
    assert reply == {"id": 7, "ok": False, "error": {"code": "flush_failed",
                                                     "reason": "disk full"}}


@pytest.mark.parametrize("fields", [
    {}, {"content_type": "text/plain"}, {"headers": {"a": "b", "c": "d"}},
    {"content_type": "application/json", "headers": {"k": "v"}, "ack": True},
])
def test_meta_encoder_writes_what_msgpack_writes_for_the_map(fields) -> None:
    encoder = protocol.MetaEncoder("pricer-é")
    for seq in (1, 127, 128, 70_000, 2**40):
        expected = {"producer": "pricer-é", "seq": seq, "time_ns": 1_795_000_000_000_000_000}
        expected.update(fields)
        assert encoder.encode(seq, time_ns=expected["time_ns"], **fields) == \
            msgpack.packb(expected)


def test_every_setting_is_a_flag_of_some_command() -> None:
    """14 settings had no flag and appeared in no --help (issue #12)."""
    import click

    from bus.config import SETTINGS
    from cli.main import main
    flags: set[str] = set()

    def walk(command: click.Command) -> None:
        flags.update(param.name for param in command.params)
        for name, sub in subcommands(command).items():
            if name != "config":  # it takes them all
                walk(sub)
    walk(main)
    assert [s.env for s in SETTINGS if s.field not in flags] == []
