"""Structured logs: JSON lines for journald and files, readable lines on a terminal.

Logs go to stderr so that commands like `bus-cli tail` keep stdout for data.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", process: str | None = None) -> None:
    """Set up structlog once per process. fmt: auto | json | console."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        processors += [structlog.processors.format_exc_info,
                       _with_priority(structlog.processors.JSONRenderer())
                       if _stderr_is_journal() else structlog.processors.JSONRenderer()]
    else:
        # A person at a terminal: the "started" event's 70 settings would bury
        # what matters (`bus-cli config` prints them); JSON logs keep them.
        processors += [_drop_config, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level.lower(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=QuietOnBrokenPipe(sys.stderr)),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if process:
        structlog.contextvars.bind_contextvars(process=process)


def _drop_config(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.pop("config", None)
    return event


class QuietOnBrokenPipe:
    """stderr for the logs. A process whose log reader went away (a closed
    terminal, a parent killed with its pipe) loses its log lines, not its
    shutdown: a BrokenPipeError raised from a log call inside the stop path
    left sockets open, and the process hung in zmq_ctx_term for good."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # EPIPE, EIO; ValueError: the stream is closed
            return 0

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


# syslog priorities for journald's "<N>" line prefix (SyslogLevelPrefix=yes, its
# default for a service's stdout and stderr).
_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the journal stream it
    connected; stderr is that stream unless it was redirected."""
    try:
        device, inode = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def _with_priority(render: Any) -> Any:
    """Prefix each line with its priority, so that `journalctl -p err` finds errors."""
    def render_with_priority(logger: Any, method: str, event: dict[str, Any]) -> str:
        return f"<{_PRIORITIES.get(event.get('level', 'info'), 6)}>{render(logger, method, event)}"
    return render_with_priority


def get_logger(name: str) -> Any:
    return structlog.get_logger(component=name)


class RateLimitedLog:
    """Logs an event at most once per `interval` seconds per key, with the count suppressed.

    Bad input can arrive at line rate; the log must not become the bottleneck
    or fill the journal.
    """

    def __init__(self, log: Any, interval: float = 5.0) -> None:
        self._log = log
        self._interval = interval
        self._next_at: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def due(self, key: str, now: float | None = None) -> bool:
        """Whether an event of `key` would be logged now; if not, it is counted
        as suppressed, as warning() would: a hot path skips building fields."""
        now = time.monotonic() if now is None else now
        if now < self._next_at.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        return True

    def warning(self, key: str, event: str, now: float | None = None, **fields: Any) -> None:
        self._emit(self._log.warning, key, event, now, fields)

    def error(self, key: str, event: str, now: float | None = None, **fields: Any) -> None:
        self._emit(self._log.error, key, event, now, fields)

    def _emit(self, method: Any, key: str, event: str, now: float | None,
              fields: dict[str, Any]) -> None:
        now = time.monotonic() if now is None else now
        if now < self._next_at.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next_at[key] = now + self._interval
        suppressed = self._suppressed.pop(key, 0)
        method(event, reason=key, suppressed_since_last=suppressed, **fields)
