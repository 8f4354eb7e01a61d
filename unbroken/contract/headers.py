"""HTTP header names shared by clients, the gateway and the replicas, and how both ends read them."""

from __future__ import annotations

from typing import Mapping

SESSION_ID = "X-Session-ID"  # a conversation's key: routes it to its KV and names its kept transcript
SESSION_HISTORY = "X-Session-History"  # "server": the replica keeps the conversation, the client sends new turns
PRIORITY = "X-Priority"  # critical | normal | batch
REQUEST_ID = "X-Request-ID"
REPLICA_ID = "X-Replica-ID"
RETRIES = "X-Unbroken-Retries"
FAILOVERS = "X-Unbroken-Failovers"
DEGRADED = "X-Unbroken-Degraded"

# Forwarded by the gateway to the replica as the client sent them.
FORWARDED = (SESSION_ID, SESSION_HISTORY, PRIORITY)


def session_id(headers: Mapping[str, str]) -> str | None:
    """The request's ``X-Session-ID`` without surrounding blanks; None when absent or blank."""
    return (headers.get(SESSION_ID) or "").strip() or None


def server_keeps_history(headers: Mapping[str, str]) -> bool:
    """``X-Session-History: server``: the replica keeps the transcript, so ``messages`` may be empty."""
    return (headers.get(SESSION_HISTORY) or "").strip().lower() == "server"
