"""A PostgreSQL URL as libpq reads it, for showing it without its secrets.

A pattern over the text cannot know what libpq will make of it: libpq
percent-decodes query keys (`?pass%77ord=` is `password`), takes secrets under
other names (`sslpassword`), and the last of a repeated key. So the URL is
parsed by libpq itself (psycopg.conninfo.conninfo_to_dict calls
PQconninfoParse) and shown rebuilt from what it read, with the value of every
option libpq itself would not show (PQconninfoOption.dispchar "*", a password,
or "D", a debug option: the SCRAM keys) replaced by `***`.

psycopg is imported here only for a postgresql:// URL: a tenth of a second
and about 10 MB that SQLite users need not pay.
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import quote

SCHEMES = ("postgresql://", "postgres://")
HIDDEN = "***"
# What a URL libpq cannot read, or would misread, is shown as: no part of it.
UNREADABLE = "<a postgresql:// URL libpq cannot read (not shown: it may hold a password)>"
# The options libpq marks as secret in every version this runs with, should
# asking libpq itself fail (PQconndefaults reads PGSERVICE's file, say).
KNOWN_SECRETS = frozenset({"password", "sslpassword", "oauth_client_secret",
                           "scram_client_key", "scram_server_key"})


@functools.cache
def secret_options() -> frozenset[str]:
    """The libpq options whose value is never shown: those libpq's own
    PQconndefaults marks "*" (password) or "D" (debug: not shown by default)."""
    try:
        from psycopg import pq
        marked = {option.keyword.decode() for option in pq.Conninfo.get_defaults()
                  if option.dispchar}
    except Exception:  # libpq unavailable or its defaults unreadable: the known ones
        marked = set()
    return KNOWN_SECRETS | marked


def options(url: str) -> dict[str, str] | None:
    """libpq's options from a postgresql:// URL, or None when libpq cannot
    parse it or would misread it (see misread)."""
    try:
        from psycopg.conninfo import conninfo_to_dict
        parsed: dict[str, Any] = conninfo_to_dict(url)
    except Exception:  # psycopg missing, or libpq's parse error (which quotes the URL)
        return None
    parsed = {key: str(value) for key, value in parsed.items()}
    return None if misread(url, parsed) else parsed


def misread(url: str, parsed: dict[str, str]) -> bool:
    """Whether libpq read a password as something else: its user info ends at
    the first '@' before any '/', so a password holding an unencoded '/' or
    '@' becomes the host, port or database (postgresql://u:pa/ss@h/db is host
    u, port "pa", database "ss@h/db"), which would then be shown. Such a URL
    has an '@' before its query that libpq did not take as the end of the
    user info, or a port that is not a number."""
    rest = url.partition("://")[2]
    ends = [i for i in (rest.find("@"), rest.find("/")) if i >= 0]
    if ends and rest[min(ends)] == "@":
        rest = rest[min(ends) + 1:]
    return "@" in rest.partition("?")[0] or any(
        port and not port.isdigit() for port in parsed.get("port", "").split(","))


def problem(url: str) -> str | None:
    """Why libpq cannot be given this postgresql:// URL, or None. Its own
    message is not repeated: it quotes the URL, password included."""
    if options(url) is not None:
        return None
    return ("libpq cannot read it as a URL, or reads part of the password as the host, "
            "port or database: percent-encode any '@', '/', ':', '?', '%' or '&' in the "
            "user name and password (%40 %2F %3A %3F %25 %26)")


def redact(url: str) -> str:
    """The URL rebuilt from what libpq reads in it, every secret option's
    value as ***; UNREADABLE when libpq cannot read it or would misread it."""
    read = options(url)
    if read is None:
        return UNREADABLE
    secret = secret_options()
    shown = {key: HIDDEN if key in secret else quote(value, safe="/:,")
             for key, value in read.items()}
    user, password = read.pop("user", None), read.pop("password", None)
    shown.pop("user", None), shown.pop("password", None)
    userinfo = "" if user is None and password is None else \
        f"{quote(user or '', safe='')}{'' if password is None else ':' + HIDDEN}@"
    netloc = ""
    host = read.get("host", "")
    if host and "," not in host and "/" not in host and "," not in read.get("port", ""):
        netloc = f"[{host}]" if ":" in host else quote(host, safe="")
        shown.pop("host")
        if "port" in read:
            netloc += f":{shown.pop('port')}"
    path = f"/{quote(read['dbname'], safe='')}" if "dbname" in read else ""
    shown.pop("dbname", None)
    query = "&".join(f"{key}={value}" for key, value in shown.items())
    scheme = url.partition("://")[0]
    return f"{scheme}://{userinfo}{netloc}{path}{'?' + query if query else ''}"
