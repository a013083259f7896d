"""``Registry[T]``: plug-ins by name. A duplicate name is an error; an unknown name says what exists.

Compression methods, tasks and cost models are registered here by decorator or call, so adding one
is a new file, not an edit of the pipeline::

    METHODS = Registry[Method]("compression method", flag="--methods")

    @METHODS.register
    class MyMethod: name = "my_method"; ...

A package installed beside sensplan adds plug-ins through an entry point group
(``sensplan.methods``, ``sensplan.tasks``, ``sensplan.cost_models``): each entry point names a
plug-in class, an instance, or a module that registers its plug-ins when imported.
:meth:`Registry.load_entry_points` loads them once, and :meth:`Registry.origin` says where each
plug-in came from.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from sensplan._errors import SensplanError, UserInputError, first_line

T = TypeVar("T")


class Registry(Generic[T]):
    """Named plug-ins of one kind (``what``), in registration order."""

    def __init__(self, what: str, *, flag: str = "", entry_points: str = "") -> None:
        self.what = what
        self.flag = flag
        self.group = entry_points
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._loaded_entry_points = False
        self._discovered = False
        #: entry points that failed to load: "name = module:attr: what went wrong"
        self.broken: list[str] = []

    def add(self, name: str, item: T, *, replace: bool = False, origin: str = "") -> T:
        """Register ``item`` as ``name``; a taken name raises ``ValueError`` unless ``replace``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"A {self.what} needs a non-empty string name. Got {name!r} instead.")
        if name in self._items and not replace:
            raise ValueError(f"A {self.what} named {name!r} is already registered ({self._origins.get(name)}). "
                             f"Choose another name, or pass replace=True to override it on purpose.")
        self._items[name] = item
        self._origins[name] = origin or _origin_of(item)
        return item

    def register(self, item: Any) -> Any:
        """Decorator form: registers ``item`` under its ``name`` attribute. A class is registered
        as an instance (made with no arguments) and returned unchanged."""
        self.add(str(getattr(item, "name", "")), item() if isinstance(item, type) else item,
                 origin=_origin_of(item))
        return item

    def remove(self, name: str) -> None:
        self._items.pop(name, None)
        self._origins.pop(name, None)

    def origin(self, name: str) -> str:
        """Where the plug-in ``name`` came from: "built-in", "entry point NAME = module:attr
        (distribution VERSION)", or the module that registered it."""
        return self._origins.get(name, "")

    @contextmanager
    def failures(self, name: str, hook: str, fix: str = "Fix the plug-in") -> Iterator[None]:
        """Around a call into the plug-in ``name``: an exception from a plug-in that is not
        built-in becomes one :class:`UserInputError` naming it, where it came from, the ``hook``
        that failed and ``fix`` (a built-in's is a bug in sensplan: it propagates, as do
        sensplan's own errors)."""
        origin = self.origin(name)
        if origin in ("", "built-in"):
            yield
            return
        try:
            yield
        except SensplanError:
            raise
        except Exception as e:  # noqa: BLE001 - the plug-in's code: its failure is its author's to fix
            raise UserInputError(f"The {self.what} {name!r} ({origin}) failed in {hook}: {type(e).__name__}: "
                                 f"{first_line(e)}. {fix} (--verbose shows the traceback).") from e

    def discover(self, package: str, path: Any, kind: type) -> None:
        """Register the built-in plug-ins, then other packages' (once): import every public module
        of ``package`` (its ``__path__``; a built-in registers itself on import, so a new one is a
        new file with no list to edit), then load this registry's entry points, each an instance of
        ``kind`` or a class made with no arguments."""
        if self._discovered:
            return
        self._discovered = True
        import importlib
        import pkgutil

        for info in pkgutil.iter_modules(path):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")

        def make(obj: Any) -> T:
            item: T = obj() if isinstance(obj, type) else obj
            if not isinstance(item, kind):
                raise TypeError(f"{obj!r} is not a sensplan {kind.__name__} (subclass "
                                f"{kind.__module__}.{kind.__name__})")
            return item

        self.load_entry_points(make)

    def load_entry_points(self, make: Callable[[Any], T] | None = None) -> None:
        """Register every plug-in of this registry's entry point group (once). ``make`` turns what
        an entry point loads into a plug-in (default: a class is instantiated, an instance taken
        as it is, a module is assumed to have registered its plug-ins on import). A plug-in that
        fails to load is left out and listed in :attr:`broken`; it never stops sensplan."""
        if self._loaded_entry_points or not self.group:
            return
        self._loaded_entry_points = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            where = f"entry point {ep.name} = {ep.value}" + (
                f" ({dist.metadata['Name']} {dist.version})" if dist is not None else "")
            try:
                obj = ep.load()
                if isinstance(obj, type(sys)):
                    continue  # a module: it registered its plug-ins when it was imported
                name = str(getattr(obj, "name", "") or ep.name)
                have = self._items.get(name)
                if have is not None and (have is obj or type(have) is obj):
                    self._origins[name] = where  # registered on import by its own decorator too
                    continue
                item = make(obj) if make is not None else (obj() if isinstance(obj, type) else obj)
                self.add(name, item, origin=where)
            except Exception as e:  # noqa: BLE001 - a broken plug-in must not stop sensplan
                self.broken.append(f"{ep.name} = {ep.value}: {type(e).__name__}: {first_line(e)}")

    def get(self, name: str, *, named_in: str = "") -> T:
        """The plug-in called ``name``; an unknown name lists what exists and the closest match.

        ``named_in`` says where the name came from when it is not the user's flag (e.g. "the plan"):
        then a missing plug-in is reported as not installed here, not as a typo."""
        try:
            return self._items[name]
        except KeyError:
            broken = next((b for b in self.broken if b.split(" = ", 1)[0] == name), "")
            if broken:
                raise UserInputError(f"The {self.what} {name!r} comes from a plug-in that failed to load "
                                     f"({broken}). Fix or reinstall the package that provides it "
                                     f"(`sensplan methods` lists the plug-ins and their errors).") from None
            known = f"Known: {', '.join(self._items) or 'none'}."
            if named_in:
                raise UserInputError(f"{named_in} uses the {self.what} {name!r}, which is not installed here. "
                                     f"Install the package that provides it (`sensplan methods` lists what is "
                                     f"installed). {known}") from None
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            where = f" for {self.flag}" if self.flag else ""
            raise UserInputError(f"Unknown {self.what} {name!r}{where}.{hint} {known}") from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)



def _origin_of(item: Any) -> str:
    module = getattr(item if isinstance(item, type) else type(item), "__module__", "") or ""
    return "built-in" if module.startswith("sensplan.") else f"registered by {module}"
