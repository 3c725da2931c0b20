"""A standby writer (`bus-cli writer --standby`, PostgreSQL only).

It binds nothing and writes nothing until it holds the writer's advisory lock
(storage/postgres.py, WRITER_LOCK_KEY): every BUS_STANDBY_RETRY_MS it tries to
open the database as the writer does, and is refused while another writer's
session holds the lock. Once it holds it, it is the writer (writer/service.py)
from the next pass of its loop: it binds its endpoints and serves. The lock is
PostgreSQL's, so two writers can never both hold it: a writer whose session
the server ended (kill -9, a lost host, a cut network once keepalives gave up
on it, an admin's pg_terminate_backend) has lost it, and exits at its next use
of the database (`SessionLost`) instead of opening another session: its
unit restarts it, as a standby again.

A writer that holds the lock but has sent nothing for BUS_PG_SESSION_TIMEOUT_S
(frozen, or cut off before the server's keepalives gave up on it; a running
writer sends a statement each second) is fenced: the standby ends its session
(PgStore._take_lock), and so its lock, before it takes the lock itself.

While it waits it tells systemd it is ready (it is doing its job) with a
STATUS= that says who holds the lock; /healthz, once the writer serves, is
the writer's. It binds nothing, so it answers no `stats` meanwhile.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from typing import Any

from bus.config import BusConfig
from bus.logging import get_logger
from bus.runner import StartupError, StopSignal
import storage
from storage.postgres import DatabaseInUse  # a standby's database is PostgreSQL
from writer.health import writer_health
from writer.service import open_writer_store

log = get_logger("writer")


class LockWait:
    """Takes the writer's lock when it is free: `step(now)` tries
    `open_store()` (which takes it, or is refused with DatabaseInUse) once
    every `retry_s`, and returns the store once it holds it."""

    def __init__(self, open_store: Callable[[], Any], retry_s: float, started: float,
                 database_errors: tuple[type[BaseException], ...] = ()) -> None:
        self.open_store = open_store
        self.database_errors = database_errors
        self.retry_s = retry_s
        self.started = started
        self.next_try = started
        self.tries = 0
        self.holder: str | None = None      # who holds the lock, as the last refusal said
        self.last_error: str | None = None  # why the last try reached no server

    def step(self, now: float) -> Any | None:
        if now < self.next_try:
            return None
        self.next_try = now + self.retry_s
        self.tries += 1
        try:
            store = self.open_store()
        except DatabaseInUse as exc:
            if exc.holder != self.holder:
                log.info("standby_waiting", holder=exc.holder)
            self.holder, self.last_error = exc.holder, None
            return None
        except (StartupError, *self.database_errors) as exc:
            # No server, refused credentials, a server restarting, a role that
            # may not see or end the holder's session: tried again.
            if str(exc) != self.last_error:
                log.warning("standby_cannot_reach_database", error=str(exc).strip(),
                            error_type=type(exc).__name__)
            self.last_error = str(exc).strip()
            return None
        return store

    def timeout_ms(self, now: float) -> int:
        return max(0, int((self.next_try - now) * 1000))

    def snapshot(self, now: float) -> dict[str, Any]:
        return {"waiting_s": round(now - self.started, 3), "tries": self.tries,
                "holder": self.holder, "last_error": self.last_error}


class StandbyWriter:
    """The writer role behind a LockWait: a standby until it holds the lock,
    then the writer it wraps (`make_writer`)."""

    name = "writer"

    def __init__(self, config: BusConfig, make_writer: Callable[[BusConfig], Any]) -> None:
        """`config.standby` needs a PostgreSQL database (bus/config.py refuses
        it with SQLite)."""
        self.config = config
        self.make_writer = make_writer
        self.writer: Any = None
        self.http: Any = None  # the writer's, once it serves
        self.wait = LockWait(lambda: open_writer_store(config, fence=True),
                             config.standby_retry_ms / 1000.0, time.monotonic(),
                             storage.errors_of(config.db)[1])

    def initialize(self, stop: StopSignal) -> None:
        self.stop = stop
        log.info("standby", db=storage.redact(self.config.db),
                 retry_ms=self.config.standby_retry_ms)

    def loop(self, now: float | None = None) -> None:
        if self.writer is not None:
            self.writer.loop(now)
            return
        if now is None:
            select.select([self.stop.fileno()], [], [],
                          self.wait.timeout_ms(time.monotonic()) / 1000.0)
            self.stop.clear_wakeup()
            now = time.monotonic()
        if self.stop.requested:
            return
        store = self.wait.step(now)
        if store is None:
            return
        log.info("took_over", waited_s=round(now - self.wait.started, 3), tries=self.wait.tries,
                 previous_holder=self.wait.holder, fenced=store.fenced)
        self.writer = self.make_writer(self.config)
        self.writer.initialize(self.stop, store=store)
        self.http = self.writer.http

    def status_line(self) -> str:
        if self.writer is not None:
            return self.writer.status_line()
        if self.wait.tries == 0:
            return "standby: about to try the writer's lock"
        held = f"held by {self.wait.holder}" if self.wait.holder else \
            (self.wait.last_error or "held by a session this role cannot see: run every "
                                     "writer as the same database role")
        return f"standby: waiting for the writer's lock ({held})"

    def snapshot(self) -> dict[str, Any]:
        if self.writer is not None:
            return self.writer.snapshot()
        return {"standby": self.wait.snapshot(time.monotonic())}

    def health(self, stats: dict[str, Any]) -> str | None:
        """A standby that waits is healthy: waiting is its job."""
        return None if "standby" in stats else writer_health(stats)

    def shutdown(self) -> None:
        if self.writer is not None:
            self.writer.shutdown()
