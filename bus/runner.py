"""The run loop shared by every long-running bus process.

A role is an object with `initialize(stop)`, `loop(now=None)`, `shutdown()`
(huey's shape), `status_line()` (what `systemctl status` shows) and, when its
HTTP side is on (bus/http.py, an `http` attribute), `snapshot()`: the stats
its /metrics and /healthz are read from, published once a second. `run_role` calls `loop()` until SIGTERM or SIGINT asks it to stop,
then `shutdown()`; a role's optional `health(stats)` (the one its /healthz
answers from) decides whether the systemd watchdog is pinged (the anchor
worker has none: what makes it unhealthy, bitcoind unreachable or a wallet
still syncing, is nothing a restart of it mends); the signal handlers only set a flag and wake the role's poller
through a self-pipe, so a stop is seen at once even inside a long poll.
Exit status: 0 after a clean stop, 1 after an unexpected exception, 75
(EX_TEMPFAIL) when a running role cannot go on (CannotGoOn): systemd's
Restart=on-failure restarts it after either.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import setproctitle

from bus.logging import get_logger


class StartupError(RuntimeError):
    """A role cannot start (or go on) for a reason the operator must fix
    (endpoint or database in use, unreadable file, refused credentials):
    logged as one line, no traceback; the process exits with `exit_status`."""

    exit_status = 1


class CannotGoOn(RuntimeError):
    """A running role that must stop for a restart to mend it (the writer's
    database session lost, and the writer's lock with it): logged as one line
    (`event`, no traceback); the process exits with EX_TEMPFAIL, which
    systemd's Restart=on-failure restarts."""

    event = "cannot_go_on"
    exit_status = 75


class Misconfigured(StartupError):
    """A start that cannot succeed until the operator changes the setup (a
    socket systemd passed for another endpoint): EX_CONFIG, which the units'
    RestartPreventExitStatus= keeps systemd from retrying every RestartSec=."""

    exit_status = 78


class StopSignal:
    """Set by SIGTERM/SIGINT; `fileno()` becomes readable when it is set."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(self._w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def request(self, reason: str = "requested") -> None:
        self.requested = True
        self.signal_name = self.signal_name or reason
        try:
            self._w.send(b"\0")
        except BlockingIOError:
            pass

    def fileno(self) -> int:
        return self._r.fileno()

    def clear_wakeup(self) -> None:
        try:
            while self._r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        self._r.close()
        self._w.close()


class Role(Protocol):
    name: str

    def initialize(self, stop: StopSignal) -> None: ...
    def loop(self, now: float | None = None) -> None: ...
    def shutdown(self) -> None: ...
    def status_line(self) -> str: ...


# How often the STATUS= line shown by `systemctl status` is refreshed.
STATUS_INTERVAL_S = 2.0
# While unhealthy, how often health is read again (a ping follows at once
# when it is back).
HEALTH_RECHECK_S = 1.0


class SystemdNotifier:
    """sd_notify(3): one datagram of NAME=VALUE lines to $NOTIFY_SOCKET (a
    path, or an abstract socket when it starts with "@"); nothing without it.
    A few lines rather than the sdnotify package (no release since 2018): the
    protocol is one sendto, and the watchdog's timing is ours anyway.

    WATCHDOG=1 goes out from the run loop itself, at half of $WATCHDOG_USEC, so
    a loop that stops turning (a commit stuck on a lock, a deadlock) stops the
    pings and systemd restarts the process (WatchdogSec= in the units). It goes
    out only while the role is healthy (the reason its /healthz would give is
    None): a process that turns but cannot serve (a database not writable, a
    forwarding loop that cannot capture) for half of WatchdogSec is restarted
    too, instead of answering 503 for ever. While unhealthy, health is read
    again every HEALTH_RECHECK_S, so a ping follows as soon as it is back."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_s = (int(watchdog_usec) / 2e6 if watchdog_usec.isdigit()
                           and watchdog_pid in ("", str(os.getpid())) else 0.0)
        self._next_watchdog = 0.0
        self._next_status = 0.0
        self._status = ""
        self.withheld_reason: str | None = None  # why the last ping was not sent

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:  # never blocking: a reader that does not read must not stall the loop
            self._sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self._address)
        except OSError:  # systemd gone or restarting, or its queue full: nothing to tell
            pass

    def ready(self, status: str, *extra: str) -> None:
        """READY=1; `extra` lines (BUS_HTTP=host:port) are for `bus-cli up`,
        which reads its children's notifications as systemd does (systemd
        ignores names it does not know)."""
        self._status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}", *extra)

    def tick(self, now: float, role: Role,
             unhealthy: Callable[[], str | None] = lambda: None) -> None:
        """`unhealthy()`: why the role is not healthy (None: it is), read
        when a watchdog ping is due."""
        if self._sock is None:
            return
        if self.watchdog_s and now >= self._next_watchdog:
            reason = unhealthy()
            if reason is None:
                self._next_watchdog = now + self.watchdog_s
                self.send("WATCHDOG=1")
                if self.withheld_reason is not None:
                    get_logger(role.name).info("watchdog_resumed", was=self.withheld_reason)
            else:
                self._next_watchdog = now + min(HEALTH_RECHECK_S, self.watchdog_s)
                if self.withheld_reason is None:
                    get_logger(role.name).warning(
                        "watchdog_withheld", reason=reason,
                        action="no WATCHDOG=1 while unhealthy: systemd restarts the process "
                               "if this lasts WatchdogSec")
            self.withheld_reason = reason
        if now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL_S
            status = role.status_line()
            if status != self._status:
                self._status = status
                self.send(f"STATUS={status}")

    def stopping(self, reason: str) -> None:
        self.send("STOPPING=1", f"STATUS=stopping ({reason})")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


# sd_listen_fds(3): the first file descriptor systemd passes.
SD_LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_inherited: dict[str, int] | None = None


def inherited_sockets(environ: dict[str, str] | None = None) -> dict[str, int]:
    """The listening sockets systemd passed to this process (socket
    activation, the `.socket` units in deploy/systemd), by name
    (FileDescriptorName=): sd_listen_fds(3)'s protocol, read once. They are
    this process's only when LISTEN_PID is its pid; fds 3 to 3 + LISTEN_FDS - 1,
    LISTEN_FDNAMES their names separated by ':'. The variables are then
    removed (sd_listen_fds' unset_environment) and the fds made close-on-exec,
    so that no child takes them as its own. systemd keeps its copy of each
    socket across restarts of the process: the port is never free for
    another process to bind."""
    global _inherited
    if environ is None and _inherited is not None:
        return _inherited
    env = os.environ if environ is None else environ
    found: dict[str, int] = {}
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if pid == str(os.getpid()) and count.isdigit():
        names = env.get("LISTEN_FDNAMES", "").split(":")
        for index in range(int(count)):
            fd = SD_LISTEN_FDS_START + index
            name = names[index] if index < len(names) and names[index] else "unknown"
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFD)
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            except OSError:
                raise Misconfigured(f"LISTEN_FDS={count}, but fd {fd} ({name}) is not "
                                   "open") from None
            found[name] = fd
    for name in _LISTEN_VARS:
        env.pop(name, None)
    if environ is None:
        _inherited = found
    return found


# How often a process gives freed heap memory back (MemoryTrim).
TRIM_INTERVAL_S = 10.0
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to give back this way
    _malloc_trim = None


def release_free_memory() -> None:
    """Give freed heap back to the system (glibc's malloc_trim). After a burst
    (a subscription flood, a backlog) libzmq and Python free their memory, but
    glibc keeps it in its arenas: RSS would stay at its peak."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class _Statm:
    """/proc/self/statm, opened once and read with pread(2): reading it must
    not need a free file descriptor. With the table full (a flood of idle
    connections), an open() here failed with EMFILE and ended the process;
    now the last value read stands in, and the failure is counted."""

    def __init__(self) -> None:
        self._fd = -1
        self._pid = 0
        self.last = 0
        self.failures = 0

    def read(self) -> int:
        try:
            if self._pid != os.getpid():  # first use, or a forked child's own file
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
                self._pid = os.getpid()
            self.last = int(os.pread(self._fd, 256, 0).split()[1]) * _PAGE_BYTES
        except OSError:
            self.failures += 1
        return self.last


_STATM = _Statm()
_STATM.read()  # opened at import, when there are descriptors to spare


def resident_bytes() -> int:
    """This process's resident set size (Linux); never opens a file (_Statm)."""
    return _STATM.read()


class MemoryLimit:
    """This process's RSS against a limit (0: none), read at most every
    `interval_s`. `exceeded(now)` is True when RSS is over the limit even
    after freed memory was given back; after that, only once it has grown by
    another eighth of the limit (what the process needs itself, a full batch
    buffer, does not trigger it over and over), until it is back under
    `rearm_fraction` of the limit."""

    def __init__(self, limit_bytes: int, interval_s: float = 0.05,
                 rearm_fraction: float = 0.75) -> None:
        self.limit = limit_bytes
        self.interval_s = interval_s
        self.rearm_fraction = rearm_fraction
        self.rss = 0
        self._next = 0.0
        self._threshold = limit_bytes

    def exceeded(self, now: float) -> bool:
        if not self.limit or now < self._next:
            return False
        self._next = now + self.interval_s
        self.rss = resident_bytes()
        if self.rss < self.limit * self.rearm_fraction:
            self._threshold = self.limit
        if self.rss <= self._threshold:
            return False
        release_free_memory()
        self.rss = resident_bytes()
        if self.rss <= self._threshold:
            return False
        self._threshold = self.rss + self.limit // 8
        return True


class MemoryTrim:
    """Calls release_free_memory() every `interval_s`."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._next = 0.0

    def maybe(self, now: float) -> None:
        if now >= self._next:
            self._next = now + self.interval_s
            release_free_memory()


def run_role(role: Role) -> int:
    setproctitle.setproctitle(f"bus-{role.name}")
    log = get_logger(role.name)
    stop = StopSignal()
    notifier = SystemdNotifier()
    status = 0
    try:
        role.initialize(stop)  # sockets bound, database open: ready (a standby: waiting)
        http = getattr(role, "http", None)
        # What withholds the watchdog's ping: the role's health, unless it
        # has a narrower rule for what a restart mends (the reader's: a
        # lagging standby answers /healthz 503, and a restart mends nothing).
        health = getattr(role, "watchdog_health", getattr(role, "health", None))

        def unhealthy() -> str | None:
            return None if health is None else health(role.snapshot())
        notifier.ready(role.status_line(), *([f"BUS_HTTP={http.address}"] if http else []))
        trim = MemoryTrim()
        while not stop.requested:
            role.loop()
            now = time.monotonic()
            trim.maybe(now)
            notifier.tick(now, role, unhealthy)
            http = getattr(role, "http", None)  # a standby's, once it serves
            if http is not None and http.due(now):
                http.publish(role.snapshot(), now)
        notifier.stopping(stop.signal_name or "requested")
        log.info("stopping", signal=stop.signal_name)
    except StartupError as exc:
        log.error("cannot_start", error=str(exc))
        status = exc.exit_status
    except CannotGoOn as exc:
        log.error(exc.event, error=str(exc))
        status = exc.exit_status
    except Exception:
        log.exception("crashed")
        status = 1
    finally:
        try:
            role.shutdown()
        except Exception:
            log.exception("shutdown_failed")
            status = 1
        if getattr(role, "http", None) is not None:
            role.http.close()  # type: ignore[attr-defined]
        stop.close()
        notifier.close()
    log.info("stopped", exit_status=status)
    return status
