"""One typed KEY=VALUE parser for the three kinds of option on the command line.

- task options (`run`/`collect --task-option KEY=VALUE`): the fields of the task's dataclass;
- a learned policy's inference options (`run`/`serve`/`bench --policy-option`): its `INFERENCE_OPTIONS`;
- model config overrides (`train`/`bench --model-option`): the fields of the model's config dataclass.

Each value is converted to the declared type of the field it sets, never guessed from the text: bool
takes true/false/yes/no/1/0 (any case) and nothing else ("ture" is refused, not read as False); int and
float (finite) take what Python's constructors take; a str is the text without surrounding spaces (or a
JSON string, `"..."`, as `json.dumps` writes it); lists, tuples, dicts and free-form (`Any`) fields take
JSON, checked against the annotation (`divla_eval.schema`); `X | None` takes `null`. Values that are not
text (from Python: the `evaluate` API, a manifest being resumed) are checked against the same
annotation, not converted.

An unknown key and a bad value read the same for every kind:
`unknown <kind> option 'x' for <owner>; valid: a, b, c` and
`<kind> option k='v' for <owner>: expected int` (DivlaEvalError; the CLI prints it as one line, exit 2).
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from divla_eval.errors import DivlaEvalError, InvalidValueError
from divla_eval.schema import describe, mismatch, parse_json

_UNION_TYPES = (typing.Union, types.UnionType)
_BOOL_TEXT = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def split_option(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (KEY, VALUE) (the value may itself hold `=`); DivlaEvalError when there is no `=`
    or no key."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise DivlaEvalError(f"expected KEY=VALUE, got {_shown(text)}")
    return key, value


def _shown(value: Any) -> str:
    """A value as the messages show it: its repr, cut to 60 characters (a message stays one line)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _for(owner: str | None) -> str:
    return f" for {owner}" if owner else ""


def unknown_option(kind: str, key: str, valid, owner: str | None = None) -> DivlaEvalError:
    """The one error for a key that names no option."""
    names = ", ".join(sorted(valid)) or "none"
    return DivlaEvalError(f"unknown {kind} option {key!r}{_for(owner)}; valid: {names}")


def bad_value(kind: str, key: str, value: Any, expected: str, owner: str | None = None) -> DivlaEvalError:
    """The one error for a value of the wrong type (`expected` says what was wanted)."""
    return DivlaEvalError(f"{kind} option {key}={_shown(value)}{_for(owner)}: expected {expected}")


class _Refused(Exception):
    """Text that does not convert to the type asked for (internal; `parse_value` reports it)."""


def _from_text(text: str, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        try:  # free-form: JSON when it parses (3, 0.5, false, [36, 16], {"a": 1}), else the text
            return parse_json(text)
        except InvalidValueError:
            return text
    if origin in _UNION_TYPES:
        if type(None) in args and text.strip() == "null":
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _from_text(text, option)
            except _Refused:
                continue
        raise _Refused
    if origin is typing.Literal:
        for option in args:
            try:
                if _from_text(text, type(option)) == option:
                    return option
            except _Refused:
                continue
        raise _Refused
    if tp is bool:
        try:
            return _BOOL_TEXT[text.strip().lower()]
        except KeyError:
            raise _Refused from None
    if tp is int:
        try:
            return int(text)
        except ValueError:  # not an integer, or more digits than Python converts
            raise _Refused from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise _Refused from None
        if not math.isfinite(value):
            raise _Refused
        return value
    if tp is str:
        text = text.strip()
        if text.startswith('"') and text.endswith('"') and len(text) >= 2:
            try:  # a JSON string, as `json.dumps` writes it
                value = parse_json(text)
            except InvalidValueError:
                return text
            return value if isinstance(value, str) else text
        return text
    # lists, tuples, dicts, TypedDicts, anything else the schema checks: JSON, then the annotation
    try:
        value = parse_json(text)
    except InvalidValueError:
        raise _Refused from None
    if mismatch(value, tp) is not None:
        raise _Refused
    return value


def parse_value(value: Any, tp: Any, *, kind: str, key: str, owner: str | None = None) -> Any:
    """`value` for an option declared as `tp`: text (from the command line) converted to `tp`, anything
    else checked against it. Raises DivlaEvalError (`bad_value`) and nothing else."""
    if isinstance(value, str):
        try:
            return _from_text(value, tp)
        except (_Refused, RecursionError):
            raise bad_value(kind, key, value, describe(tp), owner) from None
    try:
        wrong = mismatch(value, tp)
    except RecursionError:
        wrong = True
    if wrong is not None:
        raise bad_value(kind, key, value, describe(tp), owner)
    return value


def parse_options(values: dict, types_: dict[str, Any], *, kind: str, owner: str | None = None) -> dict:
    """Every `values` key checked against `types_` (name -> annotation) and its value parsed
    (`parse_value`); the first unknown key or bad value raises DivlaEvalError."""
    parsed = {}
    for key, value in values.items():
        if key not in types_:
            raise unknown_option(kind, key, types_, owner)
        parsed[key] = parse_value(value, types_[key], kind=kind, key=key, owner=owner)
    return parsed


def positive_int(text: str) -> int:
    """argparse `type=` for counts (--episodes, --workers, ...): a positive integer or argparse's error."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
