"""JSON round trip for the models' dataclass configs (config.json in every checkpoint directory).

One implementation for DiVLA and every baseline, so an unknown key, a value of the wrong type and a
corrupt file read the same way whichever model it is: the subclass only names itself in `label`.
The same type check serves model options given from Python (`train(TrainConfig(options=...))`) and,
after the command line's typed parser (`divla_eval.options`) has converted them, `divla-eval train
--model-option KEY=VALUE` (`check_values`), so a value the command line refuses is refused in a
config.json too, and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from divla_eval.errors import ConfigMismatchError, CorruptFileError, InvalidValueError
from divla_eval.options import bad_value, unknown_option
from divla_eval.schema import describe, field_types, mismatch, parse_json, problem, short


def check_values(cls: type, values: dict, label: str, source: str = "option") -> None:
    """Refuse values for the config dataclass `cls` that name no field or have the wrong type, judged
    by each field's annotation (nested too: `embodiments: {"panda": [7, 11]}`).

    `source` "option": overrides (`--model-option`), refused with DivlaEvalError in the wording every
    kind of option shares (`divla_eval.options`); "config": a config.json's contents, refused with
    ConfigMismatchError (an unknown key: another model's or a newer version's config) or
    InvalidValueError (a value of the wrong type), which the readers prefix with the file."""
    if not isinstance(values, dict):
        raise InvalidValueError(f"expected a JSON object (a {label} config), got {short(values)}")
    fields = field_types(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        if source == "option":
            raise unknown_option(label, unknown[0], fields)
        raise ConfigMismatchError(f"unknown {label} config keys {unknown}; valid: {sorted(fields)}")
    for name, value in values.items():
        bad = mismatch(value, fields[name], name)
        if bad is None:
            # free-form fields (the HF configs inside) hold whatever transformers writes, -1 included
            negative = None if _free_form(fields[name]) else _first_negative(value, name)
            if negative is None:
                continue
            # no model config has a meaningful negative number (sizes, counts, rates, weights): say
            # so here rather than let one reach a square root or a modulo in the model's code
            bad = (negative[0], "a number >= 0", negative[1])
            if source == "option":
                raise bad_value(label, name, value, "numbers >= 0")
            raise InvalidValueError(problem(*bad))
        if source == "option":
            raise bad_value(label, name, value, describe(fields[name]))
        raise InvalidValueError(problem(*bad))


def _free_form(tp) -> bool:
    """Whether an annotation lets anything through somewhere inside (`dict[str, Any]`)."""
    return tp is Any or any(_free_form(a) for a in typing.get_args(tp))


def _first_negative(value, where: str):
    """(where, value) of the first negative number inside `value` (a config value of the right type)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return (where, value) if value < 0 else None
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, (list, tuple))
        else ()
    )
    for key, item in items:
        found = _first_negative(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}")
        if found is not None:
            return found
    return None


def build(cls: type, values: dict):
    """`cls(**values)`, with the config's own consistency checks (`__post_init__`) failing as a
    ValueError whatever they trip over: a zero divisor or a negative square are values a user
    wrote, not bugs."""
    try:
        return cls(**values)
    except ValueError as exc:
        raise InvalidValueError(" ".join(str(exc).split())) from exc
    except (TypeError, ArithmeticError) as exc:  # e.g. `width % heads` with heads 0
        reason = " ".join(str(exc).split())
        raise InvalidValueError(f"inconsistent values ({reason}): is a size, count or divisor zero?") from exc


class JsonConfig:
    """Mixin for a model config dataclass; `label` (a plain class attribute, not a field) names the
    model in error messages."""

    label = "model"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The config a parsed config.json describes. Unknown keys are a ConfigMismatchError, values
        of the wrong type or inconsistent values an InvalidValueError (a ValueError) naming the field,
        before any of them reaches the model's code."""
        check_values(cls, d, cls.label, source="config")
        return build(cls, d)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path):
        try:
            return cls.from_dict(parse_json(Path(path).read_bytes()))
        except (InvalidValueError, ConfigMismatchError) as exc:
            raise CorruptFileError(f"{path} is not a valid {cls.label} config: {exc}") from exc
        except OSError as exc:
            raise CorruptFileError(f"{path} cannot be read ({exc.strerror or exc})") from exc
