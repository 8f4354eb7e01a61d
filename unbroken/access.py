"""Who may talk to a process: bearer tokens on the data plane, and the refusal to listen on a
non-loopback address without one.

Shared by the replica and the kvsync sidecar (and any other process that serves a token-checked
HTTP API). The token is compared in constant time; it never appears in a log line or an error.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket

from unbroken.config import ConfigError

# Routes every process leaves open: a liveness probe carries no data.
OPEN_PATHS = frozenset({"/health", "/healthz"})


def bearer_matches(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>`` (constant time)."""
    return hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode())


def auth_header(token: str) -> dict[str, str]:
    """The header that carries ``token`` (none when it is empty)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable only from this machine.

    ``""``, ``0.0.0.0`` and ``::`` are every interface (not loopback); a name is resolved and is
    loopback only when every address it has is.
    """
    host = host.strip().strip("[]")
    if host in ("", "0.0.0.0", "::"):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_exposure(process: str, host: str, token: str, allow_insecure: bool, *, token_field: str,
                   allow_field: str) -> None:
    """Refuse (``ConfigError``) to listen on a non-loopback ``host`` without a token, unless the
    operator said so explicitly with ``allow_field``."""
    if token or allow_insecure or is_loopback(host):
        return
    raise ConfigError(
        f"{process}: refusing to listen on {host!r} (not loopback) without a token: set {token_field} "
        f"(or its environment variable), or set {allow_field} = true to serve unauthenticated on purpose")


__all__ = ["OPEN_PATHS", "auth_header", "bearer_matches", "check_exposure", "is_loopback"]
