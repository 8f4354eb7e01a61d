"""Session affinity: a session key (``X-Session-ID`` or the OpenAI ``user`` field) maps to a replica
by consistent hashing with bounded load.

The ring holds every known replica (``ring_members``), healthy or not, with ``ring_vnodes`` points
each, so a replica that fails only moves its own sessions. A session goes to its *home*: the
recorded placement when there is one, else the first replica clockwise from the key's hash. When
the home is out of rotation, the walk continues clockwise and the replica it lands on is recorded
as the session's new placement, so the session stays there even after the old one comes back (its
KV now lives on the new one). A home that is merely busy (load above ``bounded_load_factor`` x the
mean) spills to the next replica on the ring for this request only.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from typing import Callable, Sequence

from gateway.config import RoutingSection
from gateway.policies.base import RouteRequest, RoutingPolicy
from gateway.replicaset import Replica


def ring_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, members: Sequence[Replica], vnodes: int) -> None:
        points: list[tuple[int, int]] = []
        for idx, rep in enumerate(members):
            for v in range(vnodes):
                points.append((ring_hash(f"{rep.ring_token}#{v}"), idx))
        points.sort()
        self.members = list(members)
        self._hashes = [p[0] for p in points]
        self._owners = [p[1] for p in points]

    def walk(self, key_hash: int):  # type: ignore[no-untyped-def]
        """Distinct replicas clockwise from ``key_hash``."""
        n = len(self._hashes)
        if n == 0:
            return
        start = bisect.bisect_left(self._hashes, key_hash) % n
        seen: set[int] = set()
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner not in seen:
                seen.add(owner)
                yield self.members[owner]
                if len(seen) == len(self.members):
                    return


class SessionPlacementStore:
    """Where sessions were moved to (``gateway/sessions.py`` implements it, with Redis)."""

    def get(self, session_key: str) -> str | None: ...

    def set(self, session_key: str, replica_url: str) -> None: ...


class SessionAffinityPolicy:
    name = "session_affinity"

    def __init__(self, config: RoutingSection, fallback: RoutingPolicy,
                 members: Callable[[], list[Replica]], placements: SessionPlacementStore,
                 on_move: Callable[[str, Replica | None, Replica], None] | None = None) -> None:
        self.config = config
        self.fallback = fallback
        self._members = members
        self.placements = placements
        self._on_move = on_move
        self._ring: HashRing | None = None
        self._ring_members: list[Replica] | None = None

    def ring(self) -> HashRing:
        members = self._members()
        if members is not self._ring_members or self._ring is None:
            self._ring = HashRing(members, self.config.ring_vnodes)
            self._ring_members = members
        return self._ring

    def home(self, session_key: str) -> Replica | None:
        """The replica a session belongs to right now (recorded placement, else ring owner)."""
        ring = self.ring()
        url = self.placements.get(session_key)
        if url is not None:
            for rep in ring.members:
                if rep.url == url:
                    return rep
        for rep in ring.walk(ring_hash(session_key)):
            return rep
        return None

    def select(self, candidates: Sequence[Replica], request: RouteRequest) -> Replica | None:
        key = request.session_key
        if not key:
            return self.fallback.select(candidates, request)
        if not candidates:
            return None
        ring = self.ring()
        home = self.home(key)
        cand = set(candidates)
        total = sum(r.num_inflight for r in candidates)
        bound = max(1, math.ceil(self.config.bounded_load_factor * (total + 1) / len(candidates)))
        if home is not None and home in cand and home.num_inflight + 1 <= bound:
            return home
        home_failed = home is None or home not in cand
        # Walk from the key's own point: a failed replica's sessions spread over the replicas that
        # follow each of its points on the ring, instead of all landing on one successor.
        start = ring_hash(key)
        chosen: Replica | None = None
        spill: Replica | None = None
        for rep in ring.walk(start):
            if rep is home or rep not in cand:
                continue
            if request.num_prompt_tokens and not rep.has_kv_headroom(request.num_prompt_tokens):
                continue
            if rep.num_inflight + 1 <= bound:
                chosen = rep
                break
            if spill is None:
                spill = rep
        if chosen is None:
            chosen = spill if spill is not None else (home if home in cand else None)
        if chosen is None:
            return self.fallback.select(candidates, request)
        if home_failed and chosen is not home:
            self.placements.set(key, chosen.url)
            if self._on_move is not None:
                self._on_move(key, home, chosen)
        return chosen
