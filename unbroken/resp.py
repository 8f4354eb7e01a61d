"""The Redis protocol (RESP2) for the project's own hot paths: kvsync's block reader and the
gateway's stream-state writer talk to Redis on their own sockets, where redis-py's per-command cost
matters. Everything else uses redis-py."""

from __future__ import annotations


def encode_command(*args: str | bytes) -> bytes:
    """One command: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts += [b"$%d\r\n" % len(b), b, b"\r\n"]
    return b"".join(parts)


def setup_commands(username: str | None, password: str | None, db: int | str | None) -> list[bytes]:
    """What a new connection sends before its work, as redis-py does for the same URL: ``AUTH``
    (with the user when there is one) when there is a password, ``SELECT`` for a database other than 0.
    Each is answered ``+OK``; the caller reads one line per command."""
    setup: list[bytes] = []
    if password is not None and password != "":
        setup.append(encode_command("AUTH", *([username] if username else []), password))
    if str(db or 0) != "0":
        setup.append(encode_command("SELECT", str(db)))
    return setup
