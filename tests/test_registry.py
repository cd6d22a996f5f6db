"""Registry: lazy targets, duplicate names, helpful unknown-name errors."""

from __future__ import annotations

import json
import pickle
import sys

import pytest

from divla_eval.errors import DivlaEvalError, UnknownNameError
from divla_eval.registry import Registry


def test_lazy_string_target_resolves_on_get_and_is_cached() -> None:
    reg: Registry[object] = Registry("codec")
    reg.register("dumps", "json:dumps", description="JSON encoder")
    assert reg.get("dumps") is json.dumps
    assert reg.get("dumps") is json.dumps
    assert reg.describe() == [("dumps", "JSON encoder")]


def test_lazy_target_is_not_imported_until_get() -> None:
    reg: Registry[object] = Registry("task")
    reg.register("ghost", "nonexistent_mod_for_divla_tests:x")
    reg.register("real", object())
    assert reg.names() == ["ghost", "real"]
    assert "ghost" in reg and list(reg) == ["ghost", "real"]
    reg.check_name("ghost")  # must not import
    assert "nonexistent_mod_for_divla_tests" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        reg.get("ghost")


def test_object_target_and_dotted_attr() -> None:
    reg: Registry[object] = Registry("thing")
    sentinel = object()
    reg.register("obj", sentinel)
    reg.register("path_join", "os:path.join")
    assert reg.get("obj") is sentinel
    import os.path

    assert reg.get("path_join") is os.path.join


def test_duplicate_name_raises() -> None:
    reg: Registry[object] = Registry("task")
    reg.register("bin_picking", "json:dumps")
    with pytest.raises(ValueError, match="bin_picking"):
        reg.register("bin_picking", "json:loads")
    assert reg.get("bin_picking") is json.dumps


def test_unknown_name_lists_valid_names_and_closest_match() -> None:
    reg: Registry[object] = Registry("task")
    reg.register("bin_picking", "json:dumps")
    reg.register("sorting", "json:loads")
    with pytest.raises(UnknownNameError) as info:
        reg.get("bin_pickng")
    err = info.value
    assert isinstance(err, DivlaEvalError)
    assert str(err) == "unknown task 'bin_pickng'; valid: bin_picking, sorting (did you mean 'bin_picking'?)"
    assert (err.kind, err.name, err.valid, err.closest) == (
        "task",
        "bin_pickng",
        ["bin_picking", "sorting"],
        "bin_picking",
    )
    # Survives pickling, as it must when raised in a worker process.
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.closest == "bin_picking"


def test_unknown_name_without_close_match() -> None:
    reg: Registry[object] = Registry("policy")
    reg.register("random", "json:dumps")
    with pytest.raises(UnknownNameError) as info:
        reg.check_name("zzzzzz")
    assert info.value.closest is None
    assert "did you mean" not in str(info.value)
    assert "valid: random" in str(info.value)


_LEARNED = ("divla", "diffusion_policy", "openvla", "octo")


@pytest.mark.parametrize(("given", "actual"), [(g, a) for g in _LEARNED for a in _LEARNED if g != a])
def test_a_checkpoint_given_to_the_wrong_policy_names_the_right_one(tmp_path, given, actual):
    """Each policy's checker recognises the other three policies' configs (by a key only they have)."""
    import importlib

    from divla_eval.checkpoint import LABELS, SIGNATURE_KEYS, CheckpointError

    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("")
    (tmp_path / "config.json").write_text(json.dumps({SIGNATURE_KEYS[actual]: 1}))
    module = "divla_eval.divla.policy" if given == "divla" else f"divla_eval.baselines.{given}.policy"
    expected = f"is a {LABELS[actual]} checkpoint: evaluate it with --policy {actual}"
    with pytest.raises(CheckpointError, match=expected):
        importlib.import_module(module).check_checkpoint(tmp_path)
