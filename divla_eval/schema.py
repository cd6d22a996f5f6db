"""Type checks of what divla-eval reads from disk, against the annotations of the types that hold it.

Every file kind divla-eval reads back (episode records, manifests, checkpoint configs, trainer states,
the metadata of demonstration files) was written by divla-eval as JSON, but a user can hand it anything
with the right name: a list where an object belongs, a string where a flag belongs, bytes that are not
text, JSON nested a million levels deep. Checking each value against the annotation of the field it
lands in, at the one place that reads the file, turns all of those into one line naming the file, the
field and what was expected, instead of an AttributeError or TypeError far away from the file (in a
report table, or halfway through a resumed run).

The annotations are the schema: a dataclass's fields (an `EpisodeRecord`, a model config) or a
`TypedDict` for plain JSON objects (optional keys with `total=False`; keys it does not name pass, so
newer writers stay readable). Understood: bool, int, float (finite; an int is accepted), str, None,
Any, Path (a string), Literal, unions, list[X], tuple[X, ...], tuple[X, Y], dict[str, X], TypedDict.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from divla_eval.errors import CorruptFileError, InvalidValueError

_UNION_TYPES = (typing.Union, types.UnionType)
MISSING = object()
"""What `mismatch` reports as found for a required key that is absent."""


def describe(tp: Any) -> str:
    """What a value of type `tp` looks like in JSON, for error messages (`int`, `list of str`, ...)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return "any value"
    if tp is type(None) or tp is None:
        return "null"
    if origin in _UNION_TYPES:
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if tp is float:
        return "a finite number"
    if tp is Path:
        return "str"
    if typing.is_typeddict(tp) or tp is dict or origin is dict:
        if origin is dict and len(args) == 2 and args[1] is not Any:
            return f"an object of {describe(args[1])}"
        return "an object"
    if tp in (list, tuple):
        return "a list"
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list [{', '.join(describe(a) for a in args)}]"
        return f"a list of {describe(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def short(value: Any) -> str:
    """A value as it would appear in the file, cut to 40 characters (messages stay one line)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:37] + "..."


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def mismatch(value: Any, tp: Any, where: str = "") -> tuple[str, str, Any] | None:
    """(where, expected, found) of the first part of `value` that does not fit `tp`, or None.

    `where` names the part as a path (`embodiments.panda[1]`), so a message can point at it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    wrong = (where, describe(tp), value)
    if tp is Any or tp is object:
        return None
    if tp is type(None) or tp is None:
        return None if value is None else wrong
    if origin in _UNION_TYPES:
        for option in args:
            if mismatch(value, option, where) is None:
                return None
        # one non-null option: report the deeper mismatch inside it (a list holding a wrong item)
        real = [a for a in args if a is not type(None)]
        if len(real) == 1 and value is not None and _shape_matches(value, real[0]):
            return mismatch(value, real[0], where)
        return wrong
    if origin is typing.Literal:
        ok = any(value == a and type(value) is type(a) for a in args)
        return None if ok else wrong
    if tp is bool:
        return None if isinstance(value, bool) else wrong
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else wrong
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return wrong
        return None if isinstance(value, int) or math.isfinite(value) else wrong
    if tp is str or tp is Path:
        return None if isinstance(value, (str, Path)) else wrong
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            return wrong
        hints = _hints(tp)
        for key in sorted(getattr(tp, "__required_keys__", ())):
            if key not in value:
                return (_join(where, key), describe(hints[key]), MISSING)
        for key, item in value.items():
            if key in hints:
                bad = mismatch(item, hints[key], _join(where, key))
                if bad is not None:
                    return bad
        return None
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            return wrong
        if origin is dict and len(args) == 2:
            for key, item in value.items():
                if not isinstance(key, str):
                    return (where, "an object with string keys", value)
                bad = mismatch(item, args[1], _join(where, key))
                if bad is not None:
                    return bad
        return None
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):  # JSON has lists; in memory a config may hold tuples
            return wrong
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return wrong
            items = list(zip(value, args))
        else:
            items = [(v, args[0]) for v in value] if args else []
        for i, (item, item_tp) in enumerate(items):
            bad = mismatch(item, item_tp, _join(where, i))
            if bad is not None:
                return bad
        return None
    if isinstance(tp, type):
        return None if isinstance(value, tp) else wrong
    return None  # an annotation we do not model: nothing to check


def _shape_matches(value: Any, tp: Any) -> bool:
    """Whether `value` is the right container for `tp`, so that a mismatch is better reported inside."""
    origin = typing.get_origin(tp)
    if typing.is_typeddict(tp) or tp is dict or origin is dict:
        return isinstance(value, dict)
    if tp in (list, tuple) or origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return False


@functools.cache
def _hints(tp: Any) -> dict[str, Any]:
    return typing.get_type_hints(tp)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their annotations (evaluated: the modules use postponed annotations)."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def problem(where: str, expected: str, found: Any) -> str:
    """The text of one mismatch: `field 'success': expected bool, got "maybe"`."""
    if found is MISSING:
        return f"field '{where}' is missing (expected {expected})"
    return f"field '{where}': expected {expected}, got {short(found)}"


def check_value(value: Any, tp: Any, where: str = "") -> None:
    """Raise InvalidValueError naming the first part of `value` that does not fit `tp`."""
    bad = mismatch(value, tp, where)
    if bad is not None:
        if not bad[0]:
            raise InvalidValueError(f"expected {bad[1]}, got {short(bad[2])}")
        raise InvalidValueError(problem(*bad))


def check_fields(cls: type, data: Any, what: str, unknown: str = "ignore", prefix: str = "") -> None:
    """Refuse `data` (parsed JSON) meant for the dataclass `cls` that is not an object, lacks a field
    without a default, or holds a value of the wrong type in one (InvalidValueError).

    `unknown`: "ignore" keys `cls` does not have (a newer writer's fields, e.g. in episode records),
    or "error" (a model config, where an unknown key is a typo or another model's config). `prefix`
    names where `data` sits in its file (`config`), for the messages."""
    if not isinstance(data, dict):
        where = f"field '{prefix}': " if prefix else ""
        raise InvalidValueError(f"{where}expected a JSON object ({what}), got {short(data)}")
    fields = field_types(cls)
    if unknown == "error":
        extra = sorted(set(data) - set(fields))
        if extra:
            raise InvalidValueError(f"unknown {what} field(s) {extra}; valid: {', '.join(sorted(fields))}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise InvalidValueError(f"missing field(s) {missing} of {what}")
    for name, value in data.items():
        if name in fields:
            check_value(value, fields[name], _join(prefix, name))


def parse_json(text: str | bytes) -> Any:
    """JSON from text or UTF-8 bytes; every way it can fail is an InvalidValueError with a one-line
    reason (json's own errors, bytes that are not UTF-8, nesting too deep for the parser, integers too
    long to convert)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidValueError("not UTF-8 text (binary data?)") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidValueError("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing thousands of digits
        raise InvalidValueError(f"not valid JSON ({' '.join(str(exc).split())})") from None


def read_json(path: Path, error: type[Exception] = CorruptFileError) -> Any:
    """The parsed contents of a JSON file; a file that cannot be read or parsed raises `error` with one
    line naming it (a directory in its place, binary bytes, broken JSON)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        return parse_json(data)
    except InvalidValueError as exc:
        raise error(f"{path} is damaged: {exc}") from None
