"""A small generic name -> object registry with lazy ``"module:attr"`` targets.

Tasks, perturbations and policies register by name. Targets given as strings are imported only on first
``get``, so ``import divla_eval`` and ``divla-eval list`` never pull in torch or robosuite.

A registry can also take names this package does not ship (the policy registry does both, so that a
researcher's policy needs no edit of divla-eval):

- ``entry_point_group``: installed distributions declare names in that ``importlib.metadata`` group.
  The group is read only when a name is not built in, or when listing, so plugins cost nothing (and a
  broken one breaks nothing) otherwise. A built-in name always wins: a plugin must not change what
  ``--policy divla`` means in published numbers; the shadowed entry point is listed as ignored. A
  name that several distributions declare is refused as ambiguous.
- ``import_paths``: a name ``"package.module:attr"`` is imported as it stands.

Either kind of failure (not importable, no such attribute, a plugin that fails to load) is one
``DivlaEvalError`` line naming what was tried, not a traceback.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from divla_eval.errors import DivlaEvalError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind (e.g. ``Registry[type[Task]]("task")``)."""

    def __init__(
        self, kind: str, *, entry_point_group: str | None = None, import_paths: bool = False
    ) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.import_paths = import_paths
        self._targets: dict[str, Any] = {}  # name -> object, or "module:attr" not yet resolved
        self._descriptions: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}  # plugin or import-path name -> object, once loaded

    def register(self, name: str, target: str | T, *, description: str = "") -> None:
        """Add ``name``; a duplicate is an error because silently replacing one would change results."""
        if name in self._targets:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if isinstance(target, str) and ":" not in target:
            raise ValueError(f"lazy {self.kind} target {target!r} must look like 'module.path:attr'")
        self._targets[name] = target
        self._descriptions[name] = description

    def check_name(self, name: str) -> None:
        """Validate ``name`` without importing anything (cheap CLI argument checking); an import path
        is only checked for its form, a plugin only for being declared (once)."""
        if name in self._targets:
            return
        if self.import_paths and ":" in name:
            _split_import_path(self.kind, name)
            return
        plugins = self.plugins()
        if name in plugins:
            self._one_plugin(name, plugins[name])
            return
        valid = self.names() + sorted(n for n in plugins if n not in self._targets)
        close = difflib.get_close_matches(name, valid, n=1)
        hint = "or a 'package.module:attr' import path" if self.import_paths else ""
        raise UnknownNameError(self.kind, name, valid, close[0] if close else None, hint)

    def get(self, name: str) -> T:
        """Return the object for ``name``, importing a lazy target, plugin or import path once and
        caching it."""
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._targets:
            self.check_name(name)  # an unknown name fails here, before anything is imported
            if ":" in name and self.import_paths:
                obj = _import_path(self.kind, name)
            else:
                obj = self._load_plugin(name)
            self._loaded[name] = obj
            return obj
        target = self._targets[name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self._targets[name] = target = obj
        return target

    def names(self) -> list[str]:
        """The built-in names (plugins: `plugins`)."""
        return sorted(self._targets)

    def plugins(self) -> dict[str, list]:
        """Entry points of ``entry_point_group`` by name, from the installed distributions' metadata
        (nothing is imported). Read afresh each time: a package may be installed, or put on sys.path,
        while this process runs."""
        if self.entry_point_group is None:
            return {}
        from importlib.metadata import entry_points

        found: dict[str, list] = {}
        for ep in entry_points(group=self.entry_point_group):
            found.setdefault(ep.name, []).append(ep)
        return {name: sorted(eps, key=_distribution) for name, eps in found.items()}  # not sys.path order

    def _one_plugin(self, name: str, eps: list):
        if len(eps) > 1:
            paths = " or ".join(ep.value for ep in eps)
            raise DivlaEvalError(
                f"{self.kind} {name!r} is declared by several packages "
                f"({', '.join(_distribution(ep) for ep in eps)}): give the one you mean by its import "
                f"path, {paths}"
            )
        return eps[0]

    def _load_plugin(self, name: str) -> Any:
        ep = self._one_plugin(name, self.plugins()[name])
        try:
            return ep.load()
        except Exception as exc:
            raise DivlaEvalError(
                f"{self.kind} {name!r} from package {_distribution(ep)} (entry point '{ep.name} = "
                f"{ep.value}' in group {ep.group}) failed to load: {_one_line(exc)}"
            ) from exc

    def describe(self) -> list[tuple[str, str]]:
        """(name, description) pairs for ``divla-eval list``: the built-ins in name order, then each
        plugin with the distribution that declares it (a shadowed or ambiguous one marked so)."""
        rows = [(name, self._descriptions[name]) for name in self.names()]
        for name, eps in sorted(self.plugins().items()):
            for ep in eps:
                text = f"plugin from package {_distribution(ep)}: {ep.value}"
                if name in self._targets:
                    text += " (ignored: a built-in has this name; use the import path)"
                elif len(eps) > 1:
                    text += " (ambiguous: several packages declare this name; use the import path)"
                rows.append((name, text))
        return rows

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._targets)


def _distribution(ep) -> str:
    """The distribution (pip package) that declares an entry point, with its version."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "(unknown package)"
    return f"{dist.name} {dist.version}"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _split_import_path(kind: str, name: str) -> tuple[str, str]:
    module_name, _, attr = name.partition(":")
    parts = [*module_name.split("."), *attr.split(".")]
    if not all(part.isidentifier() for part in parts):
        raise DivlaEvalError(f"{kind} {name!r} is not an import path of the form 'package.module:attr'")
    return module_name, attr


def _import_path(kind: str, name: str) -> Any:
    """Import ``"package.module:attr"``; a missing module or attribute is one line, not a traceback."""
    module_name, attr = _split_import_path(kind, name)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise DivlaEvalError(
                f"{kind} {name!r}: no module named {exc.name!r} (is its package installed, or its folder "
                "on PYTHONPATH?)"
            ) from exc
        raise DivlaEvalError(f"{kind} {name!r}: importing {module_name} failed: {_one_line(exc)}") from exc
    except Exception as exc:
        raise DivlaEvalError(f"{kind} {name!r}: importing {module_name} failed: {_one_line(exc)}") from exc
    where = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise DivlaEvalError(f"{kind} {name!r}: {where} has no attribute {part!r}{guess}")
        obj = getattr(obj, part)
        where = f"{where}.{part}"
    return obj
