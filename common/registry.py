"""One registry mechanism for the whole project (solvers, architectures, controllers, tasks).

Lives in ``common``, the package below all others (``experiments -> halting -> {models,
fixedpoint} -> common``); it imports nothing of the project, so every package imports ``Registry``
from here and there is exactly one implementation (STYLE.md, habit 5).

Example:
    >>> SOLVERS = Registry("solver")
    >>> @SOLVERS.register("plain")
    ... def plain(f, z0): ...
    >>> SOLVERS.get("nope")  # KeyError: "unknown solver 'nope'; known: plain"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object map whose lookups fail with a message listing the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        """Return the object registered as ``name``; a ``KeyError`` lists the known names."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise KeyError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's temporary registration); a ``KeyError`` if it is unknown."""
        self.get(name)
        del self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)


def call_with_known(fn: Callable[..., Any], kind: str, name: str, **kwargs: Any) -> Any:
    """Call ``fn(**kwargs)``; an unexpected keyword becomes a ``TypeError`` naming ``kind name``."""
    try:
        return fn(**kwargs)
    except TypeError as err:
        raise TypeError(f"{kind} {name!r}: {err}") from None
