"""Name → class registries built from collect hooks; duplicate or malformed names fail startup."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

from stratosd.errors import ConfigError, PluginError

T = TypeVar("T")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class Registry(Generic[T]):
    """Classes by their `name`, with the plugin that provided each (for error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}
        self._owner: dict[str, str] = {}

    def add(self, cls: type[T], owner: str) -> None:
        """Register cls under cls.name; a second class with the same name is an error."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(
                owner, f"stratos_{self.kind}", f"{cls!r} has no valid `name` ClassVar",
                hint="set name = 'kebab-case-name' on the class",
            )
        if name in self._items and self._items[name] is not cls:
            raise PluginError(
                owner, f"stratos_{self.kind}",
                f"{self.kind} name {name!r} is already registered by {self._owner[name]!r}",
                hint="rename one of them, or block one with STRATOS_DISABLE_PLUGINS",
            )
        self._items[name] = cls
        self._owner[name] = owner

    def extend(self, classes: Iterable[type[T]], owner: str) -> None:
        """Add several classes from one plugin."""
        for cls in classes:
            self.add(cls, owner)

    def get(self, name: str) -> type[T]:
        """The class named name, or ConfigError listing what exists."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise ConfigError(
                f"unknown {self.kind} {name!r} (installed: {known})",
                hint="check the spelling in the job spec, or install the plugin that provides it",
                field=self.kind,
            ) from None

    def owner(self, name: str) -> str:
        """The plugin that registered name."""
        return self._owner[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
