"""One typed KEY=VALUE parser (`divla_eval.options`) for task, policy and model options, the three
flags that use it, and the small command-line things a new user hit (issue 27)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from divla_eval.cli import build_parser, main
from divla_eval.errors import DivlaEvalError
from divla_eval.options import parse_options, parse_value, split_option
from divla_eval.tasks import get_task, parse_task_options


def _one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("divla-eval: error:"), err
    return err[0]


def _parse(text, tp):
    return parse_value(text, tp, kind="test", key="k")


# --- the parser: text -> the declared type --------------------------------------------------------------
@pytest.mark.parametrize(
    "text, value",
    [
        ("true", True),
        ("TRUE", True),
        (" Yes ", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("0", False),
    ],
)
def test_bool_takes_the_usual_words_in_any_case(text, value):
    assert _parse(text, bool) is value


@pytest.mark.parametrize("text", ["ture", "", "2", "on", "t", "false!", "nope"])
def test_bool_refuses_anything_else(text):
    with pytest.raises(DivlaEvalError, match=r"^test option k=.*: expected bool$"):
        _parse(text, bool)


@pytest.mark.parametrize(
    "text, tp, value",
    [
        ("3", int, 3),
        (" 3 ", int, 3),
        ("-2", int, -2),
        ("0.5", float, 0.5),
        ("2", float, 2.0),
        ("named", str, "named"),
        (" named ", str, "named"),
        ('"named"', str, "named"),  # as json.dumps writes a string
        ("123", str, "123"),  # a str option is never read as a number
        ("null", str | None, None),
        ("/models/x", str | None, "/models/x"),
        ("[36, 16]", tuple[int, ...], [36, 16]),
        ('{"panda": [7, 11]}', dict[str, tuple[int, int]], {"panda": [7, 11]}),
        ('{"a": 1}', dict[str, Any] | None, {"a": 1}),
        ("3", Any, 3),
        ("free text", Any, "free text"),
        ("b", Literal["a", "b"], "b"),
    ],
)
def test_text_becomes_the_declared_type(text, tp, value):
    parsed = _parse(text, tp)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "text, tp, expected",
    [
        ("many", int, "int"),
        ("2.5", int, "int"),
        ("true", int, "int"),
        ("nan", float, "a finite number"),
        ("inf", float, "a finite number"),
        ("x", float, "a finite number"),
        ("[4, 1.5]", tuple[int, ...], "a list of int"),
        ("4", tuple[int, ...], "a list of int"),
        ("[" * 100_000, tuple[int, ...], "a list of int"),  # nested too deeply for the JSON parser
        ("c", Literal["a", "b"], '"a" or "b"'),
        ("[1]", dict[str, Any] | None, "an object or null"),
    ],
)
def test_bad_text_is_refused_naming_the_type(text, tp, expected):
    with pytest.raises(DivlaEvalError) as exc:
        _parse(text, tp)
    assert str(exc.value).endswith(f": expected {expected}")
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 200


def test_values_that_are_not_text_are_checked_not_converted():
    assert _parse(3, int) == 3 and _parse(2, float) == 2 and _parse([1, 2], tuple[int, ...]) == [1, 2]
    for value, tp in [(True, int), (1, bool), (["3"], tuple[int, ...]), (3, str), (None, int)]:
        with pytest.raises(DivlaEvalError, match="expected"):
            _parse(value, tp)


def test_split_option():
    assert split_option("a=b=c") == ("a", "b=c") and split_option("a=") == ("a", "")
    for text in ("novalue", "=3", ""):
        with pytest.raises(DivlaEvalError, match="expected KEY=VALUE"):
            split_option(text)


TYPES = {
    "flag": bool,
    "count": int,
    "rate": float,
    "name": str,
    "path": str | None,
    "dims": tuple[int, ...],
    "extra": dict[str, Any] | None,
    "heads": dict[str, tuple[int, int]],
    "free": Any,
    "mode": Literal["a", "b"],
}


@settings(max_examples=int(os.environ.get("DIVLA_HYPOTHESIS_EXAMPLES", "300")), deadline=None, database=None)
@given(text=st.text(max_size=40) | st.sampled_from(["[" * 5000, "9" * 5000, "1e999", "-0", '"\\ud800"']))
def test_the_parser_raises_only_divla_eval_errors_for_any_text(text):
    """Whatever a user types after KEY=, the answer is a value or one DivlaEvalError (the CLI's one-line
    message), never a traceback."""
    for key in TYPES:
        try:
            parse_options({key: text}, TYPES, kind="test")
        except DivlaEvalError as exc:
            assert "\n" not in str(exc)
    try:
        parse_options(dict([split_option(text)]), TYPES, kind="test")
    except DivlaEvalError:
        pass


# --- one wording for the three kinds --------------------------------------------------------------------
def test_unknown_keys_and_bad_values_read_the_same_for_every_kind(capsys):
    unknown = {
        "task": _one_line_error(["run", "--task-option", "bogus=1"], capsys),
        "policy": _one_line_error(["run", "--policy", "divla", "--policy-option", "bogus=1"], capsys),
        "model": _one_line_error(
            ["train", "--demos", "x.hdf5", "--out", "x", "--model-option", "bogus=1"], capsys
        ),
    }
    pattern = (
        r"^divla-eval: error: unknown (task|policy|DiVLA) option 'bogus'( for \w+)?; valid: \w+(, \w+)*$"
    )
    for kind, err in unknown.items():
        assert re.match(pattern, err), (kind, err)
    bad = {
        "task": _one_line_error(["run", "--task-option", "num_objects=x"], capsys),
        "policy": _one_line_error(
            ["run", "--policy", "divla", "--policy-option", "inference_steps=x"], capsys
        ),
        "model": _one_line_error(
            ["train", "--demos", "x.hdf5", "--out", "x", "--model-option", "chunk=x"], capsys
        ),
    }
    pattern = r"^divla-eval: error: (task|policy|DiVLA) option \w+='x'( for \w+)?: expected int$"
    for kind, err in bad.items():
        assert re.match(pattern, err), (kind, err)


def test_model_options_are_typed_by_the_models_config():
    from divla_eval.train import parse_model_options

    parsed = parse_model_options(
        "divla",
        {"reasoning_injection": "False", "alpha": "1", "view_tokens": "[4, 1]", "vlm_pretrained": "null"},
    )
    assert parsed == {
        "reasoning_injection": False,
        "alpha": 1.0,
        "view_tokens": [4, 1],
        "vlm_pretrained": None,
    }
    with pytest.raises(DivlaEvalError, match="DiVLA option reasoning_injection='ture': expected bool"):
        parse_model_options("divla", {"reasoning_injection": "ture"})
    with pytest.raises(DivlaEvalError, match="unknown trainable policy 'scripted'"):
        parse_model_options("scripted", {"alpha": "1"})


def test_task_options_keep_their_values_and_refuse_typos():
    assert parse_task_options("bin_picking", {"num_objects": "2", "variant": "named"}) == {
        "num_objects": 2,
        "variant": "named",
    }
    assert parse_task_options("bin_picking", {"num_objects": 2}) == {"num_objects": 2}  # from Python
    with pytest.raises(DivlaEvalError, match="unknown task option 'colour' for bin_picking"):
        get_task("bin_picking", colour="red")


# --- the flags: new names, old spellings kept as deprecated aliases -------------------------------------
@pytest.mark.parametrize(
    "argv, dest",
    [
        (["run"], "task_option"),
        (["collect", "--episodes", "1", "--out", "x.hdf5"], "task_option"),
        (["train", "--demos", "x.hdf5", "--out", "x"], "model_option"),
    ],
)
def test_option_is_a_deprecated_alias_that_warns_once(argv, dest, capsys):
    args = build_parser().parse_args([*argv, "--option", "a=1", "--option", "b=2"])
    assert getattr(args, dest) == [("a", "1"), ("b", "2")]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--option is deprecated" in err[0] and f"--{dest.replace('_', '-')}" in err[0]
    new = build_parser().parse_args([*argv, f"--{dest.replace('_', '-')}", "a=1"])
    assert getattr(new, dest) == [("a", "1")] and capsys.readouterr().err == ""


def test_deprecated_alias_still_runs(capsys):
    with pytest.raises(SystemExit):
        sys.exit(main(["run", "--option", "colour=red"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert "deprecated" in err[0] and "unknown task option 'colour' for bin_picking" in err[1]


def _subcommands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_flag_of_every_subcommand_has_help():
    parser = build_parser()
    missing = [
        a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._SubParsersAction)
    ]
    for action in parser._actions:  # each subcommand's one line in `divla-eval --help`
        if isinstance(action, argparse._SubParsersAction):
            missing += [f"command {c.dest}" for c in action._choices_actions if not c.help]
    for name, sub in _subcommands(parser):
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:  # a hidden deprecated alias
                assert action.option_strings == ["--option"], (name, action.option_strings)
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"divla-eval {version('divla-eval')}"


def test_run_help_says_what_the_default_policy_is():
    text = " ".join(dict(_subcommands(build_parser()))["run"].format_help().split())
    assert "until a model ships" not in text
    assert "checkpoints/divla-TASK when the task has one, else the scripted expert" in text


# --- default splits, run directories and the summary line ---------------------------------------------
def test_every_task_has_a_default_split():
    from divla_eval.tasks import TASKS
    from divla_eval.tasks.multitask import SUBTASKS

    defaults = {name: get_task(name).default_split for name, _ in TASKS.describe()}
    assert defaults == {
        "bin_picking": "unseen",
        "bussing": "seen",
        "multitask": SUBTASKS[0],
        "novel_instruction": "novel",
        "sorting": "unseen",
    }
    for name in defaults:
        task = get_task(name)
        assert set(task.default_splits) <= set(task.splits)
    assert get_task("multitask").default_splits == SUBTASKS


@pytest.fixture
def fake_run(monkeypatch):
    """`divla_eval.runner.run` replaced: records (config, out) and reports one failed episode."""
    import divla_eval.runner

    calls = []

    def run(resolved, out, **kwargs):
        calls.append((resolved.cfg, Path(out)))
        records = [SimpleNamespace(success=False)]
        return SimpleNamespace(records=records, ran=1, skipped=0, errors=0)

    monkeypatch.setattr(divla_eval.runner, "run", run)
    return calls


def test_multitask_without_split_runs_every_sub_task(fake_run, tmp_path, capsys):
    from divla_eval.tasks.multitask import SUBTASKS

    assert main(["run", "--task", "multitask", "--policy", "random", "--no-progress"]) == 0
    assert [cfg.split for cfg, _ in fake_run] == list(SUBTASKS)
    assert [out for _, out in fake_run] == [Path("runs") / f"multitask-{s}-random-seed0" for s in SUBTASKS]
    captured = capsys.readouterr()
    assert "--split NAME runs one" in captured.err
    assert captured.out.count("success 0/1") == 5 and "multitask [flip_pot] policy=random" in captured.out
    fake_run.clear()
    assert main(["run", "--task", "multitask", "--policy", "random", "--out", str(tmp_path / "mt")]) == 0
    assert [out for _, out in fake_run] == [tmp_path / "mt" / s for s in SUBTASKS]
    fake_run.clear()
    assert main(["run", "--task", "multitask", "--split", "flip_pot", "--policy", "random"]) == 0
    assert [(cfg.split, out) for cfg, out in fake_run] == [
        ("flip_pot", Path("runs/multitask-flip_pot-random-seed0"))
    ]


def test_difficulty_shows_in_the_summary_and_the_default_directory(fake_run, capsys):
    assert main(["run", "--task", "sorting", "--policy", "random"]) == 0
    cfg, out = fake_run[-1]
    assert cfg.difficulty == "easy" and out == Path("runs/sorting-easy-unseen-random-seed0")
    assert "sorting [easy, unseen] policy=random" in capsys.readouterr().out
    assert (
        main(["run", "--task", "sorting", "--difficulty", "hard", "--split", "mixed", "--policy", "random"])
        == 0
    )
    assert fake_run[-1][1] == Path("runs/sorting-hard-mixed-random-seed0")
    # a task without difficulties: as before
    assert main(["run", "--policy", "random"]) == 0
    assert fake_run[-1][1] == Path("runs/bin_picking-unseen-random-seed0")
    assert "bin_picking [unseen] policy=random" in capsys.readouterr().out


def test_the_checkpoint_names_the_default_directory():
    from divla_eval.cli import _default_run_dir
    from divla_eval.runner import RunConfig

    task = get_task("bin_picking")
    for ckpt, name in [
        ("runs/train/mine", "bin_picking-unseen-divla-mine-seed0"),
        ("runs/train/mine/", "bin_picking-unseen-divla-mine-seed0"),
        ("/abs/other ckpt", "bin_picking-unseen-divla-other_ckpt-seed0"),
        ("checkpoints/divla-bin_picking", "bin_picking-unseen-divla-divla-bin_picking-seed0"),
    ]:
        cfg = RunConfig(policy="divla", checkpoint=ckpt)
        assert _default_run_dir(cfg, task) == Path("runs") / name
    cfg = RunConfig(policy="divla", checkpoint="runs/train/mine", policy_options={"inference_steps": 5})
    assert _default_run_dir(cfg, task).name == "bin_picking-unseen-divla-mine-inference_steps5-seed0"
    assert _default_run_dir(RunConfig(policy="random"), task).name == "bin_picking-unseen-random-seed0"
