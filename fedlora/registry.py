"""Small validated registries: the single source of option names.

Every user-facing choice (model preset, data source, adapter variant, quantisation,
aggregation strategy) is a key in one registry, so CLI choices and error messages
are generated from the keys rather than typed by hand in several places.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[V]):
    """A name -> value mapping that rejects duplicates and badly formed names.

    Parameters
    ----------
    kind : str
        What the entries are ("model preset", "adapter variant"); used in errors.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, V] = {}

    def register(self, name: str, value: V) -> V:
        """Add ``value`` under ``name``; names are lower_snake_case and unique."""
        if not _NAME.match(name):
            raise ValueError(
                f"{self.kind} name {name!r} must be lower_snake_case "
                "(letters, digits, underscores; starts with a letter)"
            )
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = value
        return value

    def get(self, name: str) -> V:
        """Return the entry or raise KeyError listing every registered name."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"Unknown {self.kind} {name!r}; registered: {self.names()}"
            ) from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
