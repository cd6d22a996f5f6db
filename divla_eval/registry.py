"""A small generic name -> object registry with lazy ``"module:attr"`` targets.

Tasks, perturbations and policies register by name. Targets given as strings are imported only on first
``get``, so ``import divla_eval`` and ``divla-eval list`` never pull in torch or robosuite.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from divla_eval.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind (e.g. ``Registry[type[Task]]("task")``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._targets: dict[str, Any] = {}  # name -> object, or "module:attr" not yet resolved
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, target: str | T, *, description: str = "") -> None:
        """Add ``name``; a duplicate is an error because silently replacing one would change results."""
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"lazy {self.kind} target {target!r} must look like 'module.path:attr'")
        self._targets[name] = target
        self._descriptions[name] = description

    def check_name(self, name: str) -> None:
        """Validate ``name`` without importing anything (cheap CLI argument checking)."""
        if name not in self._targets:
            close = difflib.get_close_matches(name, self.names(), n=1)
            raise UnknownNameError(self.kind, name, self.names(), close[0] if close else None)

    def get(self, name: str) -> T:
        """Return the object for ``name``, importing a lazy target once and caching it."""
        self.check_name(name)
        target = self._targets[name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._targets[name] = target = obj
        return target

    def names(self) -> list[str]:
        return sorted(self._targets)

    def describe(self) -> list[tuple[str, str]]:
        """(name, description) pairs in name order, for ``divla-eval list``."""
        return [(name, self._descriptions[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._targets)
