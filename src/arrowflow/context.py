"""The read-only context an agent receives."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["Context"]


class Context(Mapping[str, Any]):
    """A read-only view of the pipeline's fields.

    Agents read fields and return the ones they set; they never mutate the context. The view
    wraps a dict without copying it, and the dict is never changed once an agent has seen it
    (each step builds a new one), so what an agent reads cannot change under it.

    Example:
        >>> ctx = Context({"query": "tech"})
        >>> ctx["query"]
        'tech'
        >>> ctx["query"] = "other"
        Traceback (most recent call last):
        ...
        TypeError: 'Context' object does not support item assignment
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: Mapping[str, Any] = {} if data is None else data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __repr__(self) -> str:
        fields = ", ".join(self._data)
        return f"{type(self).__name__}({fields})"
