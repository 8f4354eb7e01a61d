"""The secrets of a local stack: made on first use, kept in files only their owner can read.

:func:`load_or_create` reads ``<dir>/<name>`` for each secret (mode 0600, the folder 0700) and
writes the ones that are missing with fresh random values. They travel to child processes by
environment variables or files, never on a command line, and are never logged: use
:func:`redact_url` for any URL that may carry a password.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


@dataclass(frozen=True)
class StackSecrets:
    """What each protects (docs/security.md has the whole story)."""

    api_key: str  # clients -> gateway (/v1/*)
    admin_key: str  # operator -> gateway (/admin/*)
    replica_token: str  # gateway -> replicas
    sidecar_token: str  # replica -> its kvsync sidecar
    kvsync_hmac_secret: str  # MAC of KV blocks and manifests in Redis
    session_secret: str  # gateway: X-Session-ID scoped to the key (HMAC)
    redis_password: str  # everyone -> Redis

    def __repr__(self) -> str:  # never print the values by accident
        return f"StackSecrets({', '.join(f.name for f in fields(self))}: redacted)"


_PREFIXES = {"api_key": "ub-key-", "admin_key": "ub-admin-", "replica_token": "ub-replica-",
             "sidecar_token": "ub-sidecar-"}


def _new_value(name: str) -> str:
    # Hex after a letter prefix: no character needs quoting in a URL, a shell or a YAML env value.
    return _PREFIXES.get(name, "ub") + secrets.token_hex(32)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def load_or_create(directory: str | os.PathLike[str]) -> tuple[StackSecrets, list[str]]:
    """The secrets kept in ``directory`` and the names of those made now (empty when all existed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    values: dict[str, str] = {}
    created: list[str] = []
    for f in fields(StackSecrets):
        path = d / f.name
        value = path.read_text().strip() if path.is_file() else ""
        if not value:
            value = _new_value(f.name)
            _write_private(path, value + "\n")
            created.append(f.name)
        elif path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        values[f.name] = value
    return StackSecrets(**values), created


def write_private_file(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _write_private(p, text)
    return p


def redact_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://:***@host:6379/0`` (a URL without one is unchanged)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None and not parts.username:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
