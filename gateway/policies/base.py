"""What every routing policy shares: the request it routes, the protocol it implements, and the
registry it is chosen from by name. Policy modules import this, never the package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, Sequence, TypeVar

from gateway.replicaset import Replica

T = TypeVar("T")


@dataclass
class RouteRequest:
    """What routing knows about one request."""

    model: str
    num_prompt_tokens: int = 0  # an estimate (characters / chars_per_token)
    session_key: str | None = None
    adapter: str | None = None
    priority: str = "normal"
    exclude: set[Replica] = field(default_factory=set)


class RoutingPolicy(Protocol):
    name: str

    def select(self, candidates: Sequence[Replica], request: RouteRequest) -> Replica | None: ...


class Registry(Generic[T]):
    """Named factories; an unknown name is an error that lists the supported ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self._items[name] = factory
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; supported: {', '.join(sorted(self._items))}") \
                from None

    def names(self) -> list[str]:
        return sorted(self._items)


POLICIES: Registry[RoutingPolicy] = Registry("routing policy")
