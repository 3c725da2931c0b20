"""The WAL stays bounded (issue 22, items 5 and 7): on a small disk, where a
WAL checkpointed only every 16 MiB filled the file system before its first
checkpoint could run, and under a long reader, whose snapshot keeps the WAL
from starting over."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from bus.client import Publisher
from tests.conftest import mounted_tmpfs, query, wait_for
from tests.test_hostile import fill


@pytest.fixture
def tmpfs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of request.param MiB (skipped where one cannot be mounted)."""
    with mounted_tmpfs(tmp_path / "disk", request.param) as disk:
        yield disk


@pytest.mark.parametrize("tmpfs", [20, 64], indirect=True, ids=["20MiB", "64MiB"])
def test_a_small_disk_recovers_and_goes_on_after_its_backlog(make_bus, tmpfs: Path) -> None:
    """Item 5: on a 20 MiB file system the backlog of a full disk was stored
    once space was freed, and then the writer stuck again with a 4 KiB
    database file and an 18 MB WAL: the first checkpoint was due at 16 MiB of
    WAL, and by then the database file had no room to take it, so all of the
    data stayed in the WAL until the file system was full; new messages were
    never acknowledged and SIGTERM exited 1. The WAL is now checkpointed by
    size, its budget a part of the free space: 12,000 messages recovered,
    200 more acknowledged, and a clean stop, on 20 MiB as on 64 MiB."""
    bus = make_bus(BUS_DB=tmpfs / "bus.db", BUS_SHUTDOWN_TIMEOUT_MS=10_000).start()
    payload = os.urandom(1000)
    with Publisher(bus.config(), producer_id="disk") as pub:
        pub.publish("disk.t", payload, wait=True, timeout=10)
        filler = fill(tmpfs, "filler", 0)
        for _ in range(12_000):  # 12 MB: held back while the disk is full
            pub.publish("disk.t", payload)
        wait_for(lambda: (s := bus.writer_stats())["backlog"]["failing_for_s"]
                 and "full" in s["backlog"]["last_error"], timeout=30,
                 message="commits to fail on the full disk")
        filler.unlink()
        pub.flush(timeout=60)
        assert bus.count("disk.t") == 12_001
        for _ in range(200):
            pub.publish("disk.after", payload)
        pub.flush(timeout=20)
    assert bus.count("disk.after") == 200
    assert query(bus.db, "SELECT count(DISTINCT producer_seq) FROM messages") == [(12_201,)]
    wal = bus.writer_stats()["wal"]
    # Checkpointed as it went, and what the WAL holds now could be
    # checkpointed twice over.
    assert wal["checkpoints"] > 0
    vfs = os.statvfs(tmpfs)
    assert 2 * wal["bytes"] <= vfs.f_bavail * vfs.f_frsize, wal
    assert bus.writer.stop() == 0, bus.writer.stderr.collect()[-5:]
    assert query(bus.db, "PRAGMA integrity_check") == [("ok",)]


def test_the_wal_stays_bounded_while_clients_page_through_history_during_ingest(
        make_bus) -> None:
    """Item 7: each history page was one read transaction, but one bounded
    in rows, not in time: a page of 64 prefixes that match nothing examined
    200,000 rows in 0.5 s (1.8 s under load), and a client asking for such
    pages back to back kept a snapshot open nearly all the time, so the WAL
    never started over: 1 GB after 16 s of ingest. Even short pages back to
    back held it (112 MB): the writer's checkpoint waited for a moment when
    no reader was reading, and looked for one only now and then. Now a
    filtered page stops after 20 ms of windows (the client pages on), any
    read is interrupted at 0.5 s, and past its bound the writer checkpoints
    and waits for the gap between two reads: the WAL stays within
    journal_size_limit (32 MiB) and one transaction (236 MB before)."""
    from bus.client.history import HistoryClient
    from storage.sqlite import WAL_SIZE_LIMIT, Store
    bus = make_bus()
    seed = Store(bus.db)
    payload = os.urandom(1000)
    try:
        for batch in range(100):  # 100,000 stored messages to page through
            seed.write_batch([("seed.t", payload, None, None, None, None)] * 1000)
    finally:
        seed.close()
    bus.start()
    wal = Path(bus.db + "-wal")
    stop = threading.Event()
    peak, pages, errors = [0], [0, 0], []

    def page_through(index: int, prefixes: list[str]) -> None:
        try:
            with HistoryClient(bus.config(), timeout_ms=10_000) as history:
                after_id = 0
                while not stop.is_set():
                    page = history.page(prefixes, after_id=after_id)
                    after_id = page.after_id if page.more else 0
                    pages[index] += 1
        except Exception as exc:  # the test fails on it below
            errors.append(exc)

    def watch_wal() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                peak[0] = max(peak[0], wal.stat().st_size)
            time.sleep(0.005)

    nothing = ["nothing.%d." % i + "x" * 200 for i in range(64)]
    threads = [threading.Thread(target=page_through, args=(0, [""])),
               threading.Thread(target=page_through, args=(1, nothing)),
               threading.Thread(target=watch_wal)]
    for thread in threads:
        thread.start()
    try:
        with Publisher(bus.config(), producer_id="ingest") as pub:
            for i in range(150_000):  # about 200 MB through the WAL
                pub.publish("ingest.t", payload)
                if i % 1000 == 999:
                    pub.read_acks()
            pub.flush(timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors, errors
    stats = bus.writer_stats()["wal"]
    # 32 MiB and one transaction (33.7 MB measured), with room for a machine
    # so loaded that a page outlasts the writer's 200 ms wait once.
    assert peak[0] <= WAL_SIZE_LIMIT + (8 << 20), (peak[0], pages, stats)
    assert pages[0] > 10 and pages[1] > 10, pages
    assert bus.count("ingest.t") == 150_000
    assert stats["writer_checkpoints"] > 0


def seeded_history(path: Path, rows: int, last: str) -> None:
    """`rows` messages of seed.t, then one of `last` (its payload b"found")."""
    from storage.sqlite import Store
    store = Store(str(path))
    try:
        for _ in range(rows // 1000):
            store.write_batch([("seed.t", b"x" * 100, None, None, None, None)] * 1000)
        store.write_batch([(last, b"found", None, None, None, None)])
    finally:
        store.close()


def test_a_filtered_page_stops_at_its_time_budget_and_the_client_pages_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 7: a page with a topic filter examines windows of SCAN_WINDOW_ROWS
    ids and stops after the one that ends past READ_BUDGET_S; its after_id
    says how far it looked, so paging on finds what lies further."""
    from bus import protocol
    from bus.config import load_config
    from reader import service
    seeded_history(tmp_path / "bus.db", 20_000, "wanted.t")
    monkeypatch.setattr(service, "READ_BUDGET_S", 0.0)  # every window past the budget
    history = service.History(str(tmp_path / "bus.db"), 5000, 4 << 20, 200_000, 200)
    try:
        page = history.page(["wanted."])
        assert page["messages"] == [] and page["more"]
        assert page["after_id"] == service.SCAN_WINDOW_ROWS
        pages, after_id, found = 1, page["after_id"], []
        while page["more"] and pages < 10:
            page = history.page(["wanted."], after_id=after_id)
            after_id, pages = page["after_id"], pages + 1
            found += page["messages"]
        assert [row[2] for row in found] == [b"found"] and not page["more"]
        assert pages == 20_001 // service.SCAN_WINDOW_ROWS + 1
    finally:
        history.close()
    # Past READ_MAX_S whatever still runs is interrupted: read_failed, and
    # the reader goes on.
    monkeypatch.setattr(service, "READ_MAX_S", 0.0)
    reader = service.Reader(load_config(env={"BUS_DB": str(tmp_path / "bus.db")}))
    try:
        reply = msgpack.unpackb(reader.handle([protocol.encode_request(
            1, "history", {"prefixes": ["nothing."]})]))
        assert reply["error"]["code"] == protocol.READ_FAILED, reply
        monkeypatch.setattr(service, "READ_MAX_S", 0.5)
        reply = msgpack.unpackb(reader.handle([protocol.encode_request(
            2, "history", {"prefixes": ["wanted."], "after_id": 20_000})]))
        assert reply["ok"] and reply["result"]["messages"][0][2] == b"found", reply
    finally:
        reader.shutdown()


def test_the_wal_budget_follows_the_free_space() -> None:
    """The figures docs/architecture.md states ("Small disks"): as before from
    about 128 MiB free up, a part of the free space below."""
    from storage.sqlite import CHECKPOINT_PAGES, WAL_SIZE_LIMIT, wal_budget
    large = wal_budget(80 << 30, 4096)
    assert (large.checkpoint_pages, large.size_limit) == (CHECKPOINT_PAGES, WAL_SIZE_LIMIT)
    for free in (0, 1 << 20, 6 << 20, 20 << 20, 64 << 20, 127 << 20):
        budget = wal_budget(free, 4096)
        assert budget.checkpoint_pages >= 64
        assert budget.transaction_bytes == free // 16
        if free >= 4 << 20:  # above the floor: a checkpoint, and the WAL, fit the free space
            assert budget.checkpoint_pages * 4120 <= free // 8
            assert budget.size_limit <= free // 4


def test_audit_verify_counts_what_is_not_sealed_in_short_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bus-cli audit verify` runs beside a live writer: its count of the
    messages stored after the last seal is a window of ids per statement
    (each its own short read), and adds up to one count over all of them."""
    from storage import audit
    from storage.sqlite import open_read_only
    seeded_history(tmp_path / "bus.db", 2000, "sealed.t")
    monkeypatch.setattr(audit, "COUNT_WINDOW_IDS", 7)
    conn = open_read_only(str(tmp_path / "bus.db"), 200)
    try:
        assert audit.unsealed_count(conn, 995, [""]) == 1006
        assert audit.unsealed_count(conn, 0, ["sealed."]) == 1
        assert audit.unsealed_count(conn, 2001, [""]) == 0
    finally:
        conn.close()
