"""``Registry[T]``: plug-ins by name. A duplicate name is an error; an unknown name says what exists.

Compression methods, tasks and cost models are registered here by decorator or call, so adding one
is a new file, not an edit of the pipeline::

    METHODS = Registry[Method]("compression method", flag="--methods")

    @METHODS.register
    class MyMethod: name = "my_method"; ...
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from sensplan._errors import UserInputError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named plug-ins of one kind (``what``), in registration order."""

    def __init__(self, what: str, *, flag: str = "") -> None:
        self.what = what
        self.flag = flag
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T, *, replace: bool = False) -> T:
        """Register ``item`` as ``name``; a taken name raises ``ValueError`` unless ``replace``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"A {self.what} needs a non-empty string name. Got {name!r} instead.")
        if name in self._items and not replace:
            raise ValueError(f"A {self.what} named {name!r} is already registered. Choose another "
                             f"name, or pass replace=True to override it on purpose.")
        self._items[name] = item
        return item

    def register(self, item: Any) -> Any:
        """Decorator form: registers ``item`` under its ``name`` attribute. A class is registered
        as an instance (made with no arguments) and returned unchanged."""
        self.add(str(getattr(item, "name", "")), item() if isinstance(item, type) else item)
        return item

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """The plug-in called ``name``; an unknown name lists what exists and the closest match."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            where = f" for {self.flag}" if self.flag else ""
            raise UserInputError(f"Unknown {self.what} {name!r}{where}.{hint} Known: "
                                 f"{', '.join(self._items) or 'none'}.") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

