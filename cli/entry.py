"""bus-cli's console script. A Ctrl-C while Python still imports the CLI
(a few tenths of a second: click, pyzmq, the commands) exits 130, as a
Ctrl-C does later, instead of printing a KeyboardInterrupt traceback."""

from __future__ import annotations

import signal
import sys
from typing import Any


def _interrupted(_signum: int, _frame: Any) -> None:
    sys.exit(130)


def run() -> None:
    previous = signal.signal(signal.SIGINT, _interrupted)
    from cli.main import main  # most of bus-cli's start
    signal.signal(signal.SIGINT, previous)
    main()
