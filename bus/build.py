"""What a process is built from: the bus's version and source revision, and the
versions of what it runs on. Every process answers it in `ping {"about": true}`
and `stats` (`build`), and exports it as the `bus_build_info` metric, so an
operator can tell which processes still run the code from before an upgrade.

The revision is the git commit of the source tree the package runs from (an
editable install, `make up`), or the one `make install` recorded in the
virtual environment it made (REVISION_FILE), or "unknown". It is read from
the files, not from `git`, which a server need not have.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import sys
from pathlib import Path

import zmq

PACKAGE = "zmq-sqlite-bus"
# Written by `make install` beside its virtual environment's pyvenv.cfg.
REVISION_FILE = "bus-revision"
_SOURCE_TREE = Path(__file__).resolve().parent.parent


def _git_revision(tree: Path) -> str | None:
    """HEAD's commit of the git checkout at `tree`, read from .git's files."""
    git = tree / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = tree / git.read_text().split(":", 1)[1].strip()  # relative to the tree
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head  # detached
        ref = head[5:]
        common = git / "commondir"
        roots = [git] + ([git / common.read_text().strip()] if common.is_file() else [])
        for root in roots:
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
            packed = root / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return None
    return None


def revision() -> str:
    recorded = Path(sys.prefix) / REVISION_FILE
    try:
        return recorded.read_text().strip() or "unknown"
    except OSError:
        pass
    return _git_revision(_SOURCE_TREE) or "unknown"


@functools.cache
def build_info() -> dict[str, str]:
    """The bus's version and revision, and Python's, pyzmq's and libzmq's."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "revision": revision(),
            "python": platform.python_version(), "pyzmq": zmq.pyzmq_version(),
            "libzmq": zmq.zmq_version()}
