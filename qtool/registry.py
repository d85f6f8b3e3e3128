"""Name -> object registries (calibrators, models, backbones, backends, dataset formats).

Third-party plugins join through Python entry points; an unknown name raises a
:class:`~qtool.errors.RegistryError` that lists what is available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

from qtool.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of plugins of one kind.

    Args:
        kind: what the registry holds, used in error messages ("calibrator").
        entry_point_group: optional entry-point group scanned lazily on first lookup.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name``."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; re-registering the same object is a no-op."""
        if name in self._items and self._items[name] is not obj:
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                continue
            try:
                self._items[ep.name] = ep.load()
            except Exception as e:  # a broken plugin must not hide the others
                raise RegistryError(
                    f"{self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {e}"
                ) from e

    def get(self, name: str) -> T:
        """Return the plugin named ``name``.

        Raises:
            RegistryError: if no plugin has that name; the message lists the available ones.
        """
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Sorted names of every registered plugin."""
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
