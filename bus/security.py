"""CURVE authentication: libzmq's CURVE with a ZAP handler (pyzmq's zmq.auth).

Off unless BUS_CURVE_DIR names the bus's key directory, in pyzmq's
certificate format (`bus-cli keys generate`):

    server.key, server.key_secret   the key pair of every endpoint the bus binds
                                    (the secret only where a bus process runs)
    proxy.key, proxy.key_secret     the proxy's own pair: the only key the
                                    writer's capture endpoint lets in (not
                                    used with an ipc:// capture endpoint: its
                                    socket file is the bus user's alone)
    publishers/*.key                who may publish (and open producer sessions)
    readers/*.key                   who may subscribe and read history
    admins/*.key                    who may also run the commands that change
                                    state (utxo_*, anchor_*, consumer_delete, flush)

A client names its own secret certificate with BUS_CURVE_KEY and needs
`server.key` from the directory. Every socket the bus binds is a CURVE server
with a ZAP domain (DOMAIN_ROLES says which lists it lets in); each bus process
runs one ZAP handler for its sockets, which counts refused connections per
endpoint and logs each refused key once per endpoint. A key may be in several
lists and has the rights of each. Commands are authorized per key on
the writer's control endpoint (`authorize`): the ZAP handler sets each
message's User-Id to the client's public key.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from bus.config import BusConfig
from bus.logging import RateLimitedLog, get_logger
from bus.runner import StartupError

log = get_logger("security")
_reload_failure_log = RateLimitedLog(log, interval=60.0)

ADMINS, PUBLISHERS, READERS, PROXY = "admins", "publishers", "readers", "proxy"
ROLES = (ADMINS, PUBLISHERS, READERS)

# ZAP domain of each bound endpoint -> the key lists it lets in.
DOMAIN_ROLES: dict[str, tuple[str, ...]] = {
    "pub": (PUBLISHERS, ADMINS),
    "sub": (READERS, ADMINS),
    "notify": (PUBLISHERS, READERS, ADMINS),  # acknowledgements; commit watermarks
    "control": (PUBLISHERS, READERS, ADMINS),  # then per command: authorize()
    "read": (READERS, ADMINS),
    "proxy_control": (PUBLISHERS, READERS, ADMINS),
    "anchor_control": (PUBLISHERS, READERS, ADMINS),
    "capture": (PROXY,),
}

# How many refused keys are remembered, to log each once.
MAX_LOGGED_KEYS = 1000
# How often a running process looks whether the key lists changed.
KEYS_RECHECK_S = 1.0


class SecurityError(StartupError):
    """BUS_CURVE_DIR or BUS_CURVE_KEY is unusable (missing files, wrong format):
    a process cannot start, a command cannot run."""


@dataclass(frozen=True)
class ClientKeys:
    """What a CURVE client socket needs: the server's public key and its own pair."""

    server_public: bytes
    public: bytes
    secret: bytes


@dataclass
class Keyring:
    """The keys of one BUS_CURVE_DIR, as z85 bytes."""

    server_public: bytes
    server_secret: bytes | None
    members: dict[str, frozenset[bytes]]  # role -> public keys (and PROXY -> the proxy's)
    denied: dict[str, int] = field(default_factory=dict)  # ZAP domain -> refusals
    _logged: set[tuple[str, bytes]] = field(default_factory=set)
    root: Path | None = None  # BUS_CURVE_DIR, whose lists refresh() reads again
    reloads: int = 0          # times the lists changed since start
    reload_failures: int = 0  # looks that could not read the lists (no descriptor)
    _signature: tuple[Any, ...] = ()
    _checked_at: float = 0.0
    _reloading: threading.Lock = field(default_factory=threading.Lock)

    def refresh(self, now: float | None = None) -> bool:
        """Read the lists again if a file in them was added, removed or changed
        since the last look (at most once a KEYS_RECHECK_S); True if they were.
        Called from the ZAP handler's thread and the process's own: one reads
        while the other may look, and `members` is replaced whole. A file that
        cannot be read any more is logged and its key left out."""
        if self.root is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._checked_at < KEYS_RECHECK_S or not self._reloading.acquire(False):
            return False
        try:
            self._checked_at = now
            try:
                signature = _lists_signature(self.root)
                if signature == self._signature:
                    return False
                members = {role: _readable_public_keys(self.root / role) for role in ROLES}
            except OSError as exc:
                # No descriptor to read the lists with (EMFILE, ENFILE): the
                # lists stay as they are and are read again at the next look.
                # Never a key left out for it, and never an exception in the
                # ZAP handler's thread, which would stop every handshake.
                self.reload_failures += 1
                _reload_failure_log.warning("key_lists_unreadable", "key_lists_unreadable",
                                            error=str(exc), reload_failures=self.reload_failures,
                                            action="kept the lists as they were; read again "
                                                   f"in {KEYS_RECHECK_S:g} s")
                return False
            members[PROXY] = self.members[PROXY]
            before = frozenset().union(*(self.members[role] for role in ROLES))
            after = frozenset().union(*(members[role] for role in ROLES))
            self.members, self._signature = members, signature
            self.reloads += 1
            log.info("keys_reloaded", **{role: len(members[role]) for role in ROLES},
                     keys_added=len(after - before), keys_revoked=len(before - after))
            return True
        finally:
            self._reloading.release()

    def roles_of(self, public_key: str | bytes | None) -> set[str]:
        """The lists a public key (z85) is in (a key may be in several)."""
        if public_key is None:
            return set()
        key = public_key.encode() if isinstance(public_key, str) else public_key
        return {role for role in ROLES if key in self.members[role]}

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: may `key` connect to `domain`?"""
        self.refresh()
        if any(key in self.members[role] for role in DOMAIN_ROLES.get(domain, ())):
            return True
        self.denied[domain] = self.denied.get(domain, 0) + 1
        if (domain, key) in self._logged:
            return False
        if len(self._logged) < MAX_LOGGED_KEYS:
            self._logged.add((domain, key))
            log.warning("connection_refused", endpoint=domain, client_key=key.decode(),
                        reason="key in none of the lists this endpoint allows",
                        allowed=list(DOMAIN_ROLES.get(domain, ())))
        elif len(self._logged) == MAX_LOGGED_KEYS:
            self._logged.add((domain, b""))  # once: say that the log stops here
            log.warning("connection_refused_not_logged", endpoint=domain,
                        reason=f"over {MAX_LOGGED_KEYS} refused keys: further ones are "
                               "counted in stats, not logged")
        return False


# Errors that say nothing of a file, only that the process has no descriptor
# to open it with: never a reason to take a key out of a list.
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def _load_pair(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        if exc.errno in OUT_OF_DESCRIPTORS:
            raise
        raise SecurityError(f"cannot read CURVE certificate {path}: {exc}") from None
    except ValueError as exc:
        raise SecurityError(f"cannot read CURVE certificate {path}: {exc}") from None
    for key in (public, secret):
        if key is not None and not _is_z85_key(key):
            raise SecurityError(f"{path}: a CURVE key is 40 Z85 characters")
    if secret is not None and zmq.curve_public(secret) != public:
        raise SecurityError(f"{path}: its public key does not belong to its secret key")
    return public, secret


def _is_z85_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def _key_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.key")) if directory.is_dir() else []


def _public_keys(directory: Path) -> frozenset[bytes]:
    return frozenset(_load_pair(path)[0] for path in _key_files(directory))


def _readable_public_keys(directory: Path) -> frozenset[bytes]:
    """The keys of a list read again while running: a file that cannot be read
    is logged and left out (at start it stops the process instead)."""
    keys = set()
    for path in _key_files(directory):
        try:
            keys.add(_load_pair(path)[0])
        except SecurityError as exc:
            log.error("key_file_unreadable", path=str(path), error=str(exc),
                      action="left out of the list")
    return frozenset(keys)


def _lists_signature(root: Path) -> tuple[Any, ...]:
    """What changes when a key file of a list is added, removed, renamed or
    rewritten: each file's name, inode, size and modification time."""
    entries: list[tuple[Any, ...]] = []
    for role in ROLES:
        for path in _key_files(root / role):
            try:
                info = path.stat()
            except OSError:  # removed meanwhile: the next look sees it gone
                continue
            entries.append((role, path.name, info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(entries)


@dataclass(frozen=True)
class ListedKey:
    role: str            # admins, publishers or readers
    name: str            # the file's name without .key
    public: str | None   # z85; None if the file cannot be read
    problem: str | None = None


def listed_keys(curve_dir: str | os.PathLike[str]) -> list[ListedKey]:
    """Every key file of the three lists (`bus-cli keys ls`), by list and name."""
    listed = []
    for role in ROLES:
        for path in _key_files(Path(curve_dir) / role):
            try:
                listed.append(ListedKey(role, path.stem, _load_pair(path)[0].decode()))
            except SecurityError as exc:
                listed.append(ListedKey(role, path.stem, None, str(exc)))
    return listed


@functools.lru_cache(maxsize=4)
def load_keyring(curve_dir: str) -> Keyring:
    root = Path(curve_dir)
    server_public, _ = _load_pair(root / "server.key")
    secret_file = root / "server.key_secret"
    server_secret = None
    if secret_file.exists():
        public, server_secret = _load_pair(secret_file)
        if public != server_public:
            raise SecurityError(f"{root}/server.key is not the public half of "
                                "server.key_secret")
    signature = _lists_signature(root)
    members = {role: _public_keys(root / role) for role in ROLES}
    proxy_file = root / "proxy.key"
    members[PROXY] = frozenset([_load_pair(proxy_file)[0]]) if proxy_file.exists() \
        else frozenset()
    return Keyring(server_public, server_secret, members, root=root, _signature=signature,
                   _checked_at=time.monotonic())


def enabled(cfg: BusConfig) -> bool:
    return bool(cfg.curve_dir)


def capture_by_file_permissions(cfg: BusConfig) -> bool:
    """Is the capture hop guarded by its socket file (CURVE on or off)? An
    ipc:// capture endpoint is bound owner-only (0600) in a directory only the
    bus's user can write: only processes of that user can connect, the same
    ones that could read proxy.key_secret, so with CURVE on it is not a CURVE
    hop (CURVE would add no protection there, only the cost of encrypting
    every frame once more: see bench/acked_compare.py). Not an abstract
    socket (ipc://@name): it has no file, and anyone may connect."""
    return cfg.capture_endpoint.startswith("ipc://") \
        and not cfg.capture_endpoint.startswith("ipc://@")


def check_capture_directory(cfg: BusConfig) -> None:
    """With the capture hop guarded by its socket file, the file's directory
    must be writable by this user alone, and every directory above it by this
    user or root alone (sticky ones excepted: nobody else can rename what is in
    them): otherwise another user could put a socket of its own at the path,
    and the proxy, no longer a CURVE client there, would send it every message."""
    if not capture_by_file_permissions(cfg):
        return
    directory = Path(os.path.realpath(Path(cfg.capture_endpoint[len("ipc://"):]).parent))
    me = os.geteuid()
    for path in (directory, *directory.parents):
        try:
            info = path.stat()
        except OSError as exc:
            raise SecurityError(f"capture endpoint {cfg.capture_endpoint}: {exc}") from None
        if info.st_uid not in (me, 0):
            problem = f"owned by uid {info.st_uid}"
        elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (
                path == directory or not info.st_mode & stat.S_ISVTX):
            problem = "writable by other users"
        else:
            continue
        raise SecurityError(f"capture endpoint {cfg.capture_endpoint}: {path} is {problem}; "
                            "an ipc capture needs a directory only the bus's user can write "
                            "(e.g. the units' RuntimeDirectory /run/bus, 0700)")


def keyring(cfg: BusConfig) -> Keyring | None:
    return load_keyring(cfg.curve_dir) if cfg.curve_dir else None


def client_keys(cfg: BusConfig, own_key: str | None = None) -> ClientKeys | None:
    """The keys of a client of the bus (own_key: a certificate file instead of
    BUS_CURVE_KEY, e.g. the proxy's), or None when CURVE is off."""
    ring = keyring(cfg)
    if ring is None:
        return None
    path = own_key or cfg.curve_key
    if not path:
        raise SecurityError("BUS_CURVE_DIR is set: name this client's secret certificate "
                            "with BUS_CURVE_KEY (bus-cli keys generate)")
    public, secret = _load_pair(Path(path))
    if secret is None:
        raise SecurityError(f"{path} holds no secret key (use the .key_secret file)")
    return ClientKeys(ring.server_public, public, secret)


def secure_server(sock: zmq.Socket, cfg: BusConfig, domain: str) -> None:
    """Make a socket about to be bound a CURVE server of ZAP domain `domain`."""
    ring = keyring(cfg)
    if ring is None:
        return
    if ring.server_secret is None:
        raise SecurityError(f"{cfg.curve_dir}/server.key_secret is missing: a bus process "
                            "that binds endpoints needs the server's secret key")
    if domain == "capture" and not ring.members[PROXY]:
        raise SecurityError(f"{cfg.curve_dir}/proxy.key is missing: the capture endpoint "
                            "would let no proxy in, and nothing would be stored")
    sock.curve_secretkey = ring.server_secret
    sock.curve_publickey = ring.server_public
    sock.curve_server = True
    sock.zap_domain = domain.encode()


def secure_client(sock: zmq.Socket, keys: ClientKeys | None) -> None:
    """Make a socket about to connect a CURVE client (nothing when keys is None)."""
    if keys is None:
        return
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def start_authenticator(ctx: zmq.Context, cfg: BusConfig) -> ThreadAuthenticator | None:
    """The ZAP handler of a process that binds CURVE endpoints; started before
    any of them is bound (libzmq asks it about every new connection)."""
    ring = keyring(cfg)
    if ring is None:
        return None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    for domain in DOMAIN_ROLES:  # pyzmq looks providers up by the exact domain
        auth.configure_curve_callback(domain, credentials_provider=ring)
    return auth


def authorize(cfg: BusConfig, user_id: str | None, cmd: str,
              roles: Iterable[str]) -> str | None:
    """Why the key `user_id` may not run the command `cmd`, which keys in the
    lists `roles` or in admins/ may run (its declaration in the process's
    command table, bus/control.py), or None if it may (always, with CURVE off)."""
    ring = keyring(cfg)
    if ring is None:
        return None
    ring.refresh()
    held = ring.roles_of(user_id)
    allowed = [role for role in (PUBLISHERS, READERS) if role in roles]
    if ADMINS in held or held & set(allowed):
        return None
    return f"{cmd!r} needs a key in {'/ or '.join([*allowed, ADMINS])}/; this key is in " \
           f"{'/, '.join(sorted(held)) + '/' if held else 'no list (revoked?)'}"


def admitted(cfg: BusConfig, domain: str, user_id: str | None) -> str | None:
    """Why a request from the key `user_id` on the endpoint of ZAP domain
    `domain` is refused, or None if it is not (always, with CURVE off): the
    key was let in when it connected, and may have been revoked since."""
    ring = keyring(cfg)
    if ring is None:
        return None
    ring.refresh()
    allowed = DOMAIN_ROLES.get(domain, ())
    key = user_id.encode() if user_id else None
    if key is not None and any(key in ring.members[role] for role in allowed):
        return None
    return f"this key is in none of {', '.join(role + '/' for role in allowed)} (revoked?)"


def snapshot(cfg: BusConfig) -> dict[str, Any]:
    """For `stats`: whether CURVE is on, and the refused connections per endpoint."""
    ring = keyring(cfg)
    if ring is None:
        return {"curve": False, "note": "authentication is off: set BUS_CURVE_DIR"}
    ring.refresh()
    return {"curve": True, "keys": {role: len(ring.members[role]) for role in ROLES},
            "key_reloads": ring.reloads, "key_reload_failures": ring.reload_failures,
            "capture": "ipc socket file, owner only" if capture_by_file_permissions(cfg)
            else "curve, proxy.key only",
            "connections_refused": dict(ring.denied)}


def user_id(frames: Iterable[zmq.Frame]) -> str | None:
    """The client's public key (z85) that the ZAP handler attached to a message."""
    first = next(iter(frames), None)
    if first is None:
        return None
    try:
        return first.get("User-Id")
    except zmq.ZMQError:  # no ZAP handler: CURVE off
        return None
