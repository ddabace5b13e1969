"""Examples as plain columns: the table every data source of fedlora returns.

The data path only ever needs a few things of a dataset: its columns, its length,
a subset of its rows in a given order, and a column as a list to tokenize in one
batch. Hugging Face ``datasets`` (with pyarrow and pandas under it) costs about
90 MiB of resident memory per process to import, and every simulated client actor
paid it for data that is a few thousand short strings. So sources return
:class:`Rows`: columns of Python lists, with the names of the ``datasets.Dataset``
methods the data path uses (``num_rows``, ``column_names``, ``select``,
``select_columns``, ``to_dict``, ``to_json``), so code and habits carry over.
``datasets`` is still what reads a Hub dataset (``data.source=hf``), whose rows are
then copied into a :class:`Rows`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload


class Rows:
    """An immutable table of examples held as equally long columns.

    Parameters
    ----------
    columns : Mapping[str, Sequence[Any]]
        Column name -> values, one per row, all of the same length; column order
        is kept.

    Raises
    ------
    ValueError
        If the columns differ in length.
    """

    __slots__ = ("_columns", "_n")

    def __init__(self, columns: Mapping[str, Sequence[Any]]) -> None:
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self._columns = {name: list(values) for name, values in columns.items()}
        self._n = next(iter(lengths.values()), 0)

    @classmethod
    def from_dict(cls, columns: Mapping[str, Sequence[Any]]) -> Rows:
        """Build from ``{name: values}`` (as ``datasets.Dataset.from_dict``)."""
        return cls(columns)

    @property
    def num_rows(self) -> int:
        """Number of rows."""
        return self._n

    @property
    def column_names(self) -> list[str]:
        """Column names in order."""
        return list(self._columns)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, key: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, key: str) -> list[Any]: ...

    def __getitem__(self, key: int | str) -> dict[str, Any] | list[Any]:
        """Row ``key`` as a dict (an int), or column ``key`` as a list (a str)."""
        if isinstance(key, str):
            return self.column(key)
        if not -self._n <= key < self._n:
            raise IndexError(f"row {key} of {self._n}")
        return {name: values[key] for name, values in self._columns.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self._n):
            yield self[i]

    def column(self, name: str) -> list[Any]:
        """Return a copy of one column's values.

        Raises
        ------
        KeyError
            If there is no such column (the message names the columns there are).
        """
        if name not in self._columns:
            raise KeyError(f"no column {name!r}; the columns are {self.column_names}")
        return list(self._columns[name])

    def select(self, indices: Iterable[int]) -> Rows:
        """Return the rows at ``indices``, in that order (repeats allowed)."""
        idx = list(indices)
        for i in idx:
            if not 0 <= i < self._n:
                raise IndexError(f"row {i} of {self._n}")
        return Rows({name: [v[i] for i in idx] for name, v in self._columns.items()})

    def select_columns(self, names: Sequence[str]) -> Rows:
        """Return only the columns ``names``, in that order."""
        return Rows({name: self.column(name) for name in names})

    def to_dict(self) -> dict[str, list[Any]]:
        """``{name: values}`` (copies)."""
        return {name: list(values) for name, values in self._columns.items()}

    def to_json(self, path: str | Path) -> None:
        """Write one JSON object per row (JSON lines, readable as ``source=local``)."""
        with Path(path).open("w", encoding="utf-8") as fh:
            for row in self:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rows) and self._columns == other._columns

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Rows(columns={self.column_names}, num_rows={self._n})"


def as_rows(table: Any) -> Rows:
    """Return ``table`` as :class:`Rows`.

    A :class:`Rows` is returned as is; a ``datasets.Dataset`` (anything with
    ``to_dict()`` returning ``{name: values}``), e.g. what a data source registered
    by a user returns, is copied.
    """
    if isinstance(table, Rows):
        return table
    to_dict = getattr(table, "to_dict", None)
    if to_dict is None:
        raise TypeError(
            f"a data source returned {type(table).__name__}; expected "
            "fedlora.data.rows.Rows or a datasets.Dataset"
        )
    return Rows(to_dict())
