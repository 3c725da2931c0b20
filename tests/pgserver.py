"""A private PostgreSQL server for the tests, started from the installed
binaries (Debian's `postgresql` package: /usr/lib/postgresql/*/bin) in a
temporary directory, on a free loopback port; each bus gets a database of its own.

Not pytest-postgresql: it runs initdb and pg_ctl as the current user, and both
refuse to run as root, which CI is (dbfixtures/pytest-postgresql#341, #455).
Here, as root, they run as the `postgres` user the package creates, with
runuser; as anyone else, as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

# Stops the server if the test run dies without its teardown (SIGKILL, or a
# SIGTERM that pytest does not turn into one): argv is the test run's pid,
# the stop command, and the directory to remove.
ORPHAN_WATCH = """
import os, shutil, subprocess, sys, time
pid, command, directory = int(sys.argv[1]), sys.argv[2:-1], sys.argv[-1]
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(1)
subprocess.run(command, capture_output=True, timeout=60)
shutil.rmtree(directory, ignore_errors=True)
"""

PACKAGE_HINT = ("PostgreSQL's binaries are missing: apt-get install postgresql "
                "(they are looked for in /usr/lib/postgresql/*/bin)")


def find_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name
                   .isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class PgServer:
    """durable=False (tests): fsync and synchronous commit off, since a test
    server's data need not survive the machine; True (benchmarks): the
    defaults, so that a commit costs what it costs in production."""

    def __init__(self, bindir: Path, port: int, durable: bool = False, host: str = "127.0.0.1",
                 allow: str = "", wrapper: list[str] | None = None) -> None:
        """`host`: the address it listens on; `allow`: a network (CIDR) whose
        clients it lets in too, replication included; `wrapper`: what its
        commands run under (`ip netns exec NS`: a host of tests/cluster.py)."""
        self.bindir = bindir
        self.port = port
        self.durable = durable
        self.host = host
        self.allow = allow
        self.version = bindir.parent.name
        self.dir = Path(tempfile.mkdtemp(prefix="bus-pg-"))
        self.data = self.dir / "data"
        self.user = "bus"
        self._as: list[str] = list(wrapper or [])
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._as += ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> PgServer:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  self.user, "-E", "UTF8", *([] if self.durable else ["--no-sync"]))
        if self.allow:
            with open(self.data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.allow} trust\n"
                          f"host replication all {self.allow} trust\n")
        fast = "" if self.durable else \
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        return self._serve(fast)

    def _serve(self, options: str) -> PgServer:
        """pg_ctl start on this server's data, port and socket directory, with
        `options` (-c ...), and the watch that stops it if the test run dies."""
        self._options = options
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.dir / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} {options}"
                  "-c max_connections=200", "start")
        self._watch = subprocess.Popen(
            [sys.executable, "-c", ORPHAN_WATCH, str(os.getpid()), *self._stop_command(),
             str(self.dir)], start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        return self

    def start_replica_of(self, primary: PgServer) -> PgServer:
        """A hot standby of `primary` (streaming replication): its data copied
        by pg_basebackup (-R writes standby.signal and primary_conninfo), then
        started read-only on this server's port. initdb's pg_hba lets the
        bus user replicate from 127.0.0.1 (trust), and wal_level is replica."""
        self._run(str(self.bindir / "pg_basebackup"), "-D", str(self.data), "-h", primary.host,
                  "-p", str(primary.port), "-U", self.user, "-X", "stream", "-R", "-c", "fast",
                  *([] if self.durable else ["--no-sync"]))
        return self._serve("-c hot_standby=on ")

    def stop_server(self) -> None:
        """Stop the server (fast shutdown), keeping its data for start_again."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                  "stop")
        self._watch.terminate()
        self._watch.wait(10)

    def start_again(self) -> PgServer:
        return self._serve(self._options)

    def _stop_command(self) -> list[str]:
        return [*self._as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                "immediate", "stop"]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg
        name = f"bus_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            subprocess.run(self._stop_command(), check=True, capture_output=True, timeout=60)
        finally:
            self._watch.terminate()
            self._watch.wait(10)
            shutil.rmtree(self.dir, ignore_errors=True)
