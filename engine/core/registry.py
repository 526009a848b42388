"""Name -> plug-in registries that refuse duplicates and unknown names loudly.

A registry may name a `plugins` package: it is imported on the first lookup, so the
modules that register entries (e.g. `poolscout.engine.methods`) are loaded without the
registry's own module importing them (no import circles).
"""
from __future__ import annotations

import importlib

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Raised for a duplicate registration or a lookup of an unknown name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A named table of plug-ins (detectors, signals, selectors).

    Args:
        kind: what is registered, used in error messages ("signal", "selector", ...).
        plugins: a package imported before the first lookup; its modules register entries.
    """

    def __init__(self, kind: str, plugins: str | None = None):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._plugins = plugins

    def _load(self) -> dict[str, Entry[T]]:
        if self._plugins is not None:
            name, self._plugins = self._plugins, None  # before importing: the plug-ins look names up too
            importlib.import_module(name)
        return self._entries

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return deco

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, obj, dict(meta))

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._load()[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._load()))

    def names(self) -> list[str]:
        return sorted(self._load())
