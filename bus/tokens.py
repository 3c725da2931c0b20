"""Gateway tokens: who may use the WebSocket gateway (gateway/), and for what.

A token is the WebSocket client's CURVE key: a browser cannot hold a CURVE
key pair, so the gateway speaks to the bus with its own key and enforces each
token's rights itself. A BUS_GATEWAY_TOKENS_DIR holds one file a token,
NAME.json (`bus-cli tokens generate`):

    {"name": "desk", "sha256": "<hex of the token's SHA-256>",
     "lists": ["publishers", "readers"],
     "publish": ["orders."], "read": ["orders.", "prices."],
     "max_connections": 0, "created_ns": ...}

`lists` are the lists of a CURVE key (bus/security.py): publishers may
publish, readers may subscribe and read stored messages, admins may do both
and read the gateway's and the bus's stats (the console). `publish` and
`read` are the topic prefixes it may publish to and read ("" is every topic):
a subscription's prefix must start with one of `read`, a published topic
with one of `publish`. No token reaches a "$" topic. Only the hash is
stored: the token itself is shown once, when generated. Deleting the file
(`bus-cli tokens revoke`) revokes it: a running gateway reads the directory
again within TOKENS_RECHECK_S and closes the token's connections.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus import protocol
from bus.runner import StartupError
from bus.security import ADMINS, PUBLISHERS, READERS, ROLES

# What a token looks like: a prefix that secret scanners can match, then 32
# random bytes (base64url).
TOKEN_PREFIX = "bus_"
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# How often a running gateway looks whether the directory changed.
TOKENS_RECHECK_S = 1.0
# The most tokens a directory may hold, and prefixes a token may list: what a
# gateway reads each second is bounded.
MAX_TOKENS = 10_000
MAX_TOKEN_PREFIXES = 64
MAX_TOKEN_FILE_BYTES = 64 << 10


class TokenDirectoryError(StartupError):
    """BUS_GATEWAY_TOKENS_DIR cannot be read: the gateway does not start."""


class TokenFileError(ValueError):
    """A token file that is not one `bus-cli tokens generate` writes."""


@dataclass(frozen=True)
class Token:
    """A token's rights, as its file says (the secret is not kept)."""

    name: str
    lists: tuple[str, ...]
    publish: tuple[str, ...]
    read: tuple[str, ...]
    max_connections: int = 0  # 0: the gateway's BUS_GATEWAY_MAX_CONNECTIONS_PER_TOKEN

    def in_lists(self, lists: tuple[str, ...]) -> bool:
        """Whether the token is in one of `lists`, or an admin's."""
        return ADMINS in self.lists or any(name in self.lists for name in lists)

    def may_publish(self, topic: str) -> bool:
        return self.in_lists((PUBLISHERS,)) and not protocol.is_reserved(topic) \
            and any(topic.startswith(prefix) for prefix in self.publish)

    def may_read(self, prefix: str) -> bool:
        """Whether the token may subscribe to `prefix` (every topic it names
        starts with one of the token's `read` prefixes)."""
        return self.in_lists((READERS,)) and not protocol.is_reserved(prefix) \
            and any(prefix.startswith(allowed) for allowed in self.read)


# With no BUS_GATEWAY_TOKENS_DIR every connection has these rights, as every
# local process has with CURVE off: every list's, every topic.
ANONYMOUS = Token("anonymous", (ADMINS, PUBLISHERS, READERS), ("",), ("",))


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _prefixes(value: Any, field: str) -> tuple[str, ...]:
    if not (isinstance(value, list) and len(value) <= MAX_TOKEN_PREFIXES
            and all(isinstance(p, str) and not protocol.is_reserved(p) for p in value)):
        raise TokenFileError(f"'{field}' must be a list of at most {MAX_TOKEN_PREFIXES} topic "
                             "prefixes, none starting with '$'")
    return tuple(value)


def parse(text: str) -> tuple[str, Token]:
    """(hash, token) of a token file's text; TokenFileError if it is not one."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TokenFileError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise TokenFileError("not a JSON object")
    name, sha = data.get("name"), data.get("sha256")
    if not (isinstance(name, str) and TOKEN_NAME.fullmatch(name)):
        raise TokenFileError("'name' must be letters, digits, '.', '_' and '-' (at most 64)")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise TokenFileError("'sha256' must be 64 lowercase hex digits")
    lists = data.get("lists")
    if not (isinstance(lists, list) and lists and all(item in ROLES for item in lists)):
        raise TokenFileError(f"'lists' must name some of {', '.join(ROLES)}")
    limit = data.get("max_connections", 0)
    if type(limit) is not int or not 0 <= limit <= 1 << 20:
        raise TokenFileError("'max_connections' must be an integer from 0")
    return sha, Token(name, tuple(lists), _prefixes(data.get("publish", []), "publish"),
                      _prefixes(data.get("read", []), "read"), limit)


def generate(directory: str | Path, name: str, lists: tuple[str, ...],
             publish: tuple[str, ...], read: tuple[str, ...], max_connections: int = 0,
             now_ns: int = 0) -> tuple[str, Path]:
    """Write DIRECTORY/NAME.json for a new token; returns (the token, the file).
    FileExistsError if NAME has a token (never overwritten)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    data = {"name": name, "sha256": digest(secret), "lists": list(lists),
            "publish": list(publish), "read": list(read), "max_connections": max_connections,
            "created_ns": now_ns}
    parse(json.dumps(data))  # what a gateway would refuse is never written
    target = Path(directory)
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = target / f"{name}.json"
    # Created whole or not at all (O_EXCL: a name is never reused by mistake).
    # Readable by all: it holds the token's SHA-256, not the token (a hash of
    # 32 random bytes gives nothing back), and the gateway runs as a user of
    # its own (the unit's DynamicUser=), not as whoever generated it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.fchmod(fd, 0o644)  # whatever the umask
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
        out.write("\n")
    return secret, path


@dataclass(frozen=True)
class Listed:
    """A token file as `bus-cli tokens ls` shows it."""

    path: Path
    token: Token | None
    problem: str | None
    sha256: str = ""


def listed(directory: str | Path) -> list[Listed]:
    """Every NAME.json of the directory, read (at most MAX_TOKENS)."""
    found = []
    for path in sorted(Path(directory).glob("*.json"))[:MAX_TOKENS]:
        try:
            if path.stat().st_size > MAX_TOKEN_FILE_BYTES:
                raise TokenFileError(f"larger than {MAX_TOKEN_FILE_BYTES} bytes")
            sha, token = parse(path.read_text())
            found.append(Listed(path, token, None, sha))
        except (OSError, UnicodeDecodeError, TokenFileError) as exc:
            found.append(Listed(path, None, str(exc)))
    return found


class TokenStore:
    """The tokens of a BUS_GATEWAY_TOKENS_DIR, read again when it changed
    (looked at every TOKENS_RECHECK_S: each file's name, size and mtime).
    Without a directory, every secret is the ANONYMOUS token."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.by_hash: dict[str, Token] = {}
        self.problems: dict[str, str] = {}  # file -> why it was not taken
        self.reloads = 0
        self._signature: list[tuple[str, int, int]] | None = None
        self._next = 0.0
        if directory:
            try:
                self._signature = self._read_signature()
            except OSError as exc:  # a typo would refuse every connection: say it now
                raise TokenDirectoryError(f"BUS_GATEWAY_TOKENS_DIR {directory[:200]!r}: "
                                          f"{exc.strerror or exc}") from None
            self.reload()

    @property
    def required(self) -> bool:
        return bool(self.directory)

    def lookup(self, secret: str | None) -> tuple[str, Token] | None:
        """(hash, token) of `secret`, or None (none, or not a token)."""
        if not self.directory:
            return "", ANONYMOUS
        if not isinstance(secret, str) or not secret.startswith(TOKEN_PREFIX) \
                or len(secret) > 256:
            return None
        sha = digest(secret)
        token = self.by_hash.get(sha)
        return None if token is None else (sha, token)

    def current(self, sha: str) -> Token | None:
        """The token of hash `sha` as the directory says now (its rights may
        have changed), or None once it is revoked."""
        return ANONYMOUS if not self.directory else self.by_hash.get(sha)

    def names(self) -> set[str]:
        return {token.name for token in self.by_hash.values()}

    def _read_signature(self) -> list[tuple[str, int, int]]:
        signature = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and len(signature) < MAX_TOKENS:
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    signature.append((entry.name, st.st_size, st.st_mtime_ns))
        return sorted(signature)

    def reload(self) -> None:
        by_hash, problems = {}, {}
        for entry in listed(self.directory):
            if entry.token is None:
                problems[entry.path.name] = entry.problem or "unreadable"
                continue
            by_hash[entry.sha256] = entry.token
        self.by_hash, self.problems = by_hash, problems
        self.reloads += 1

    def check(self, now: float) -> set[str] | None:
        """Read the directory again if it changed (at most every
        TOKENS_RECHECK_S); returns the hashes no longer there (revoked), or
        None if nothing was read."""
        if not self.directory or now < self._next:
            return None
        self._next = now + TOKENS_RECHECK_S
        try:
            signature = self._read_signature()
        except OSError as exc:  # the directory gone: every token with it
            signature = []
            self.problems = {self.directory: str(exc)}
        if signature == self._signature:
            return None
        before = set(self.by_hash)
        self._signature = signature
        self.reload()
        return before - set(self.by_hash)
