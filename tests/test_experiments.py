"""Named experiments (divla_eval/experiments.py): every experiment's commands are ones the CLI accepts,
its names are the ones the reference scripts gave (so existing runs resume), mistakes are one line and
exit 2, and the multitask sub-task list has one source."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import load_script

from divla_eval import experiments as ex
from divla_eval.cli import build_parser, main
from divla_eval.experiments import EXPERIMENTS, Cell, path, plan, select_cells
from divla_eval.tasks.multitask import SUBTASKS

ROOT = Path(__file__).resolve().parents[1]
ALL = [(name, stage) for name in EXPERIMENTS.names() for stage in EXPERIMENTS.get(name).stages]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


@pytest.mark.parametrize("name,stage", ALL, ids=[f"{n}:{s}" for n, s in ALL])
def test_every_command_of_every_experiment_parses(parser, name, stage):
    """Each `divla-eval ...` step is accepted by the CLI's own parser, with names the registries know."""
    from divla_eval.envs.perturbations import PERTURBATIONS
    from divla_eval.policy import POLICIES
    from divla_eval.tasks import TASKS
    from divla_eval.train import parse_model_options

    exp = EXPERIMENTS.get(name)
    steps = plan(exp, stage)
    assert steps
    for step in steps:
        head, *argv = step.command
        if head != "divla-eval":
            assert head in ("python", "cp") and (head == "cp" or argv[0] == ex.SHIP_SCRIPT), step
            assert (ROOT / ex.SHIP_SCRIPT).is_file()
            continue
        args = parser.parse_args(argv)  # a rejected command exits (SystemExit 2) here
        if args.command in ("run", "collect"):
            task = TASKS.get(args.task)
            assert args.split in task.splits, step
            assert (args.difficulty or None) in (*task.difficulties, None), step
        if args.command == "run":
            POLICIES.check_name(args.policy)
            for pert, level in args.perturb:
                PERTURBATIONS.check_name(pert)
                assert level == 3
        if args.command == "train":
            parse_model_options(args.policy, dict(args.model_option))  # typed, known option names
            assert [str(p) for p in args.demos] == [d.file for d in exp.demos]


def test_every_experiment_dry_runs_through_the_cli(capsys):
    for name in EXPERIMENTS.names():
        assert main(["experiment", name, "--dry-run"]) == 0, name
        out = capsys.readouterr().out.splitlines()
        commands = [line for line in out if not line.startswith("#")]
        assert commands and all(re.match(r"(divla-eval|python|cp) ", c) for c in commands), name
        for stage in EXPERIMENTS.get(name).stages:
            assert f"# {name}: {stage}" in out


# The names the scripts gave (scripts/lib/recipes.sh, divla_*.sh, baseline_reference.sh,
# random_reference.sh, learning_curve.sh, reference_runs.sh) before the experiments replaced them:
# (experiment, train | checkpoint | curve | "TASK [DIFFICULTY-]SPLIT [CONDITION]", name).
TODAY = [
    ("divla-bin_picking", "train", "runs/train/divla-bp-v2-s8a1"),
    ("divla-bin_picking", "checkpoint", "checkpoints/divla-bin_picking"),
    ("divla-bin_picking", "bin_picking unseen", "results/divla/bin_picking-unseen-v2"),
    ("divla-bin_picking", "bin_picking seen", "results/divla/bin_picking-seen-v2"),
    ("divla-bin_picking", "bin_picking unseen lighting3", "results/divla/bin_picking-unseen-v2-lighting3"),
    ("divla-bin_picking-noinj", "train", "runs/train/divla-bp-v2-s8a1-noinj"),
    ("divla-bin_picking-noinj", "checkpoint", "checkpoints/divla-bin_picking-noinj"),
    ("divla-bin_picking-noinj", "bin_picking unseen", "results/divla/bin_picking-unseen-noinj"),
    (
        "divla-bin_picking-noinj",
        "bin_picking unseen background3",
        "results/divla/bin_picking-unseen-noinj-background3",
    ),
    ("divla-multitask", "train", "runs/train/divla-multitask"),
    ("divla-multitask", "checkpoint", "checkpoints/divla-multitask"),
    ("divla-multitask", "multitask flip_pot", "results/divla/multitask-flip_pot"),
    ("divla-multitask", "multitask flip_pot distractors3", "results/divla/multitask-flip_pot-distractors3"),
    ("divla-multitask-noinj", "train", "runs/train/divla-multitask-noinj"),
    ("divla-multitask-noinj", "checkpoint", "checkpoints/divla-multitask-noinj"),
    ("divla-multitask-noinj", "multitask cube_in_box", "results/divla/multitask-noinj-cube_in_box"),
    (
        "divla-multitask-noinj",
        "multitask select_object lighting3",
        "results/divla/multitask-noinj-select_object-lighting3",
    ),
    ("divla-sorting", "train", "runs/train/divla-sorting"),
    ("divla-sorting", "sorting hard-mixed", "results/divla/sorting-hard-mixed"),
    ("divla-sorting-noinj", "checkpoint", "checkpoints/divla-sorting-noinj"),
    ("divla-bussing", "checkpoint", "checkpoints/divla-bussing"),
    ("divla-bussing", "bussing seen", "results/divla/bussing-seen"),
    ("openvla-bin_picking", "train", "runs/train/openvla-bp-v2-7k"),
    ("openvla-bin_picking", "checkpoint", "checkpoints/openvla-bp-v2"),
    ("openvla-bin_picking", "bin_picking unseen", "results/openvla/bin_picking-unseen-7k"),
    (
        "openvla-bin_picking",
        "bin_picking unseen lighting3",
        "results/openvla/bin_picking-unseen-lighting3-7k",
    ),
    ("diffusion_policy-multitask", "train", "runs/train/diffusion_policy-multitask-7k"),
    ("diffusion_policy-multitask", "checkpoint", "checkpoints/diffusion_policy-multitask"),
    (
        "diffusion_policy-multitask",
        "multitask cube_in_box",
        "results/diffusion_policy/multitask-cube_in_box-7k",
    ),
    (
        "diffusion_policy-multitask",
        "multitask cube_in_box background3",
        "results/diffusion_policy/multitask-cube_in_box-background3-7k",
    ),
    ("octo-sorting", "sorting easy-mixed", "results/octo/sorting-easy-mixed-7k"),
    ("octo-bussing", "checkpoint", "checkpoints/octo-bussing"),
    ("random-multitask", "multitask flip_pot", "results/random/multitask-flip_pot"),
    ("random-multitask", "multitask flip_pot lighting3", "results/random/multitask-flip_pot-lighting3"),
    ("random-bussing", "bussing mixed", "results/random/bussing-mixed"),
    ("diffusion_policy-multitask-curve", "train", "runs/train/diffusion_policy-multitask-curve"),
    ("diffusion_policy-multitask-curve", "curve", "results/curves/diffusion_policy-multitask"),
    ("divla-multitask-curve", "checkpoint", "checkpoints/divla-multitask-v2"),
    ("experts", "bin_picking unseen distractors3", "results/experts/bin_picking-unseen-distractors3"),
    ("experts", "novel_instruction train visual3", "results/experts/novel_instruction-train-visual3"),
    ("experts-sorting", "sorting hard-unseen visual3", "results/experts/sorting-hard-unseen-visual3"),
]
CONDITIONS = {c.name: c for c in (*ex.VISUAL_CONDITIONS, ex.ALL_VISUAL)}


@pytest.mark.parametrize("name,what,expected", TODAY, ids=[t[2] for t in TODAY])
def test_names_are_the_ones_the_scripts_gave(name, what, expected):
    exp = EXPERIMENTS.get(name)
    if " " not in what:
        assert path(exp, what) == expected
        return
    task, cell, *condition = what.split()
    difficulty, _, split = cell.rpartition("-")
    cell = Cell(task, split, difficulty or None, condition=CONDITIONS[condition[0]] if condition else None)
    assert path(exp, "result", cell) == expected
    # and the experiment runs that cell (`run --out` of its eval or eval-visual stage) under that name
    outs = [step.command[-1] for stage in exp.stages if "eval" in stage for step in plan(exp, stage)]
    assert expected in outs


def test_demo_files_are_the_ones_the_scripts_collected():
    files = {name: [d.file for d in EXPERIMENTS.get(name).demos] for name in EXPERIMENTS.names()}
    assert files["divla-bin_picking"] == files["octo-bin_picking"] == ["data/bin_picking-seen-300-v2.hdf5"]
    assert files["divla-multitask"] == [f"data/multitask-{s}-60.hdf5" for s in SUBTASKS]
    assert files["openvla-sorting"] == ["data/sorting-easy-seen-150.hdf5", "data/sorting-hard-seen-150.hdf5"]
    assert files["divla-bussing-noinj"] == ["data/bussing-seen-300.hdf5"]
    assert files["octo-multitask-curve"] == [f"data/multitask-{s}-200.hdf5" for s in SUBTASKS]
    assert "data/rates/sorting-seen-hard.hdf5" in files["demo-rates"]


@pytest.mark.parametrize(
    "name", ["divla-multitask", "divla-multitask-noinj", "octo-multitask", "diffusion_policy-multitask"]
)
def test_the_recorded_multitask_runs_are_the_ones_the_experiments_name(name):
    """Every cell of these experiments already has its records in the repository: a rerun resumes them."""
    exp = EXPERIMENTS.get(name)
    assert (ROOT / path(exp, "checkpoint")).is_dir()
    for stage in ("eval", "eval-visual"):
        outs = [step.command[-1] for step in plan(exp, stage) if step.command[1] == "run"]
        assert len(outs) == (5 if stage == "eval" else 15)
        missing = [out for out in outs if not (ROOT / out / "episodes.jsonl").is_file()]
        assert not missing


def test_the_commands_are_those_of_the_scripts():
    """Spot checks against the scripts' own commands, flag for flag."""
    steps = plan(EXPERIMENTS.get("divla-bin_picking-noinj"), "train")
    assert str(steps[0]) == (
        "divla-eval train --policy divla --task bin_picking --demos data/bin_picking-seen-300-v2.hdf5 "
        "--out runs/train/divla-bp-v2-s8a1-noinj --steps 7000 --threads 1 --no-progress "
        "--model-option diffusion_samples=8 --model-option alpha=1.0 --model-option reasoning_injection=false"
    )
    assert steps[1].command[:4] == (
        "python",
        "scripts/ship_checkpoint.py",
        "runs/train/divla-bp-v2-s8a1-noinj",
        "checkpoints/divla-bin_picking-noinj",
    )
    assert steps[1].command[-1] == str(steps[0])  # the training command, for the shipped record
    curve = plan(EXPERIMENTS.get("octo-multitask-curve"), "curve", ex.Overrides(episodes=10, curve_every=2))
    assert str(curve[0]) == (
        "divla-eval curve runs/train/octo-multitask-curve --task multitask --episodes 10 --every 2 "
        "--workers 1 --threads 1 --no-progress --out results/curves/octo-multitask"
    )
    (run, report) = plan(EXPERIMENTS.get("random-sorting"), "eval", ex.Overrides(cells=("hard-mixed",)))
    assert str(run) == (
        "divla-eval run --task sorting --split mixed --difficulty hard --policy random --episodes 100 "
        "--workers 2 --threads 1 --no-progress --out results/random/sorting-hard-mixed"
    )
    assert str(report) == "divla-eval report results/random/sorting-hard-mixed"
    experts = plan(EXPERIMENTS.get("experts"), "eval")
    assert str(experts[-1]) == "divla-eval summary results/experts"
    assert sum(s.command[1] == "run" for s in experts) == 2 + 5 + 3 + 4 * 8 + 2 + 2  # the script's 46 runs
    assert "--matched-control" in experts[0].command


def test_bin_picking_runs_every_object_unless_told():
    (run, _) = plan(EXPERIMENTS.get("octo-bin_picking"), "eval")
    assert "--episodes" not in run.command
    (run, _) = plan(EXPERIMENTS.get("octo-bin_picking"), "eval", ex.Overrides(episodes=10, workers=1))
    assert run.command[run.command.index("--episodes") + 1] == "10"
    assert run.command[run.command.index("--workers") + 1] == "1"


def test_visual_conditions_run_on_the_visual_cells_only():
    outs = [s.command[-1] for s in plan(EXPERIMENTS.get("divla-bin_picking"), "eval-visual")]
    assert outs[::2] == [
        f"results/divla/bin_picking-unseen-v2-{c}3" for c in ("distractors", "background", "lighting")
    ]


def test_cells_filter_keeps_only_the_named_cells_in_table_order():
    exp = EXPERIMENTS.get("divla-sorting")
    assert [c.name for c in exp.cells] == ["easy-seen", "easy-mixed", "hard-seen", "hard-mixed"]
    assert [c.name for c in select_cells(exp, ["easy-mixed", "easy-seen"])] == ["easy-seen", "easy-mixed"]
    assert [c.name for c in EXPERIMENTS.get("random-bussing").cells] == ["seen", "mixed"]
    assert [c.name for c in EXPERIMENTS.get("openvla-multitask").cells] == list(SUBTASKS)


def _error(capsys, *argv: str) -> str:
    assert main(["experiment", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("divla-eval: error: "), captured.err
    return lines[0]


def test_unknown_names_stages_and_cells_are_one_line_and_exit_2(capsys):
    line = _error(capsys, "divla-multitsk")
    assert "unknown experiment 'divla-multitsk'" in line and "divla-multitask" in line
    line = _error(capsys, "divla-multitask", "--stage", "curve")
    assert "no stage 'curve'; valid: collect, train, eval, eval-visual, all" in line
    line = _error(capsys, "divla-multitask", "--stage", "train,shipit", "--dry-run")
    assert "'shipit'" in line
    line = _error(capsys, "random-bussing", "--cells", "hard-seen", "--dry-run")
    assert "valid: seen, mixed" in line
    line = _error(capsys, "demo-rates", "--cells", "seen")
    assert "no evaluation cells" in line
    assert "valid: demo-rates" in _error(capsys)
    assert "has no curve stage" in _error(capsys, "divla-multitask", "--curve-every", "2")
    assert "has no train stage" in _error(capsys, "random-multitask", "--steps", "100")
    assert "has no train stage" in _error(capsys, "random-multitask", "--init-from", "checkpoints/x")
    line = _error(
        capsys, "divla-multitask-keypoints-curve", "--stage", "curve", "--init-from", "checkpoints/x"
    )
    assert "--init-from: only the train stage uses it" in line


def test_init_from_continues_a_lost_training_from_its_shipped_copy(capsys):
    """`--init-from` (a training whose runs/ was lost) is passed to `train`, and replaces the
    experiment's own source (a wsd branch's)."""
    ship = "checkpoints/divla-multitask-keypoints-v2"
    argv = ["experiment", "divla-multitask-keypoints-curve", "--stage", "train", "--dry-run"]
    assert main([*argv, "--init-from", ship]) == 0
    train = capsys.readouterr().out.splitlines()[-1].split()
    assert train[train.index("--init-from") + 1] == ship and train.count("--init-from") == 1
    assert main(argv) == 0
    assert "--init-from" not in capsys.readouterr().out
    argv = ["experiment", "diffusion_policy-multitask-wsd35k", "--stage", "train", "--dry-run"]
    assert main([*argv, "--init-from", "runs/train/elsewhere"]) == 0
    train = capsys.readouterr().out.splitlines()[1].split()
    assert train[train.index("--init-from") + 1] == "runs/train/elsewhere" and train.count("--init-from") == 1


def test_an_unknown_experiment_from_the_shell_is_one_line(tmp_path):
    out = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "-m", "divla_eval.cli", "experiment", "nope", "--stage", "eval"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and not list(tmp_path.iterdir())


def test_list(capsys):
    for argv in (["ls"], ["--list"]):
        assert main(["experiment", *argv]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == EXPERIMENTS.names()
        assert any(re.match(r"divla-multitask +\[collect train eval eval-visual\] DiVLA", ln) for ln in lines)


def test_stages_run_in_the_experiments_order(capsys):
    assert (
        main(
            [
                "experiment",
                "openvla-multitask-curve",
                "--stage",
                "ship",
                "--stage",
                "curve,train",
                "--dry-run",
            ]
        )
        == 0
    )
    heads = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("#")]
    assert heads == [f"# openvla-multitask-curve: {s}" for s in ("train", "curve", "ship")]


def test_run_executes_each_step_and_stops_at_the_first_failure(tmp_path, monkeypatch, capsys):
    """`run` without --dry-run: each step in a process (faked here), in order; the ship stage names the
    last snapshot there is and copies the training log; a failed step's exit code ends the experiment."""
    monkeypatch.chdir(tmp_path)
    exp = EXPERIMENTS.get("divla-multitask-curve")
    calls = []

    def fake_call(argv, capture=False):
        calls.append(argv)
        return 0, []

    monkeypatch.setattr(ex, "_call", fake_call)
    with pytest.raises(ex.DivlaEvalError, match="collect the demonstrations first"):
        ex.run(exp, ["train"])
    assert calls == []
    with pytest.raises(ex.DivlaEvalError, match="no snapshots yet"):
        ex.run(exp, ["ship"])
    train = Path(path(exp, "train"))
    for step in (5000, 10000):
        (train / "snapshots" / f"step-{step:07d}").mkdir(parents=True)
    (train / "train_log.jsonl").write_text("{}\n")
    Path(path(exp, "checkpoint")).mkdir(parents=True)
    assert ex.run(exp, ["curve", "ship"]) == 0
    assert calls[0][1:4] == ["-m", "divla_eval.cli", "curve"]
    assert calls[1][1:4] == [ex.SHIP_SCRIPT, str(train / "snapshots/step-0010000"), path(exp, "checkpoint")]
    assert calls[1][-1].endswith("(snapshot step-0010000)")
    assert (Path(path(exp, "checkpoint")) / "train_log.jsonl").read_text() == "{}\n"

    calls.clear()
    monkeypatch.setattr(ex, "_call", lambda argv, capture=False: (calls.append(argv), (130, []))[1])
    assert ex.run(EXPERIMENTS.get("random-multitask"), ["eval", "eval-visual"]) == 130
    assert len(calls) == 1  # the interrupted run; nothing after it


def test_demo_rates_writes_each_collects_rate_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_call(argv, capture=False):
        assert capture
        seen.append(argv)
        return 0, ["collected 3 demos", f"rate: 3 new demos in 9 s = {len(seen)}00 demos/hour (1 workers)"]

    monkeypatch.setattr(ex, "_call", fake_call)
    assert ex.run(EXPERIMENTS.get("demo-rates"), ["collect"], ex.Overrides(episodes=3)) == 0
    table = (tmp_path / "results/demo_rates.md").read_text()
    assert "`divla-eval experiment demo-rates --stage collect --episodes 3`" in table
    assert "| sorting hard | seen | rate: 3 new demos in 9 s = 300 demos/hour (1 workers) |" in table
    assert table.count("demos/hour") == len(seen) == 10
    assert all(argv[argv.index("--episodes") + 1] == "3" for argv in seen)


def test_the_multitask_sub_tasks_have_one_source():
    from divla_eval import paper

    assert paper.MULTITASK_SUBTASKS is SUBTASKS
    module = load_script("multitask_conditions")
    assert module.SUBTASKS is SUBTASKS
    assert module.CONDITIONS == ("", "-distractors3", "-background3", "-lighting3")
    # no other file spells the list out (in Python or in bash)
    spelled = re.compile(r"select_object\W+flip_pot\W+cube_to_colour_box")
    files = [
        *ROOT.glob("divla_eval/**/*.py"),
        *ROOT.glob("scripts/**/*"),
        *ROOT.glob("tasks/*.py"),
        ROOT / "noxfile.py",
    ]
    copies = [
        str(f.relative_to(ROOT))
        for f in files
        if f.is_file() and spelled.search(f.read_text(errors="replace"))
    ]
    assert copies == ["tasks/multitask.py"]
    assert not (ROOT / "scripts" / "lib" / "recipes.sh").exists()


WRAPPERS = [
    ("divla_reference.sh", [], {}, ["divla-bin_picking --stage collect,train,eval"]),
    (
        "divla_multitask.sh",
        ["demos"],
        {"NOINJ": "1", "EPISODES": "20", "CELLS": "flip_pot cube_in_box"},
        ["divla-multitask-noinj --stage collect --episodes 20 --cells flip_pot cube_in_box"],
    ),
    (
        "divla_multitask.sh",
        ["eval-visual"],
        {"WORKERS": "1"},
        ["divla-multitask --stage eval-visual --workers 1"],
    ),
    ("divla_task.sh", ["sorting", "eval"], {"EPISODES": "20"}, ["divla-sorting --stage eval --episodes 20"]),
    ("divla_task.sh", ["bussing"], {"NOINJ": "1"}, ["divla-bussing-noinj --stage all"]),
    (
        "baseline_reference.sh",
        ["octo", "openvla"],
        {"TASK": "multitask", "STAGE": "eval-visual", "EPISODES": "20"},
        [
            "octo-multitask --stage eval-visual --episodes 20",
            "openvla-multitask --stage eval-visual --episodes 20",
        ],
    ),
    (
        "baseline_reference.sh",
        [],
        {"STAGE": "all"},
        [f"{p}-bin_picking --stage train,eval,eval-visual" for p in ("openvla", "octo", "diffusion_policy")],
    ),
    (
        "random_reference.sh",
        [],
        {"TASK": "sorting", "CELLS": "easy-seen"},
        ["random-sorting --stage eval --cells easy-seen"],
    ),
    ("reference_runs.sh", ["sorting"], {}, ["experts-sorting"]),
    ("reference_runs.sh", [], {}, ["experts", "experts-sorting"]),
    ("demo_rates.sh", ["5"], {}, ["demo-rates --episodes 5"]),
    (
        "divla_ablation.sh",
        [],
        {},
        [
            "divla-bin_picking-noinj --stage train,eval,eval-visual",
            "divla-bin_picking --stage eval,eval-visual --cells unseen",
        ],
    ),
    (
        "learning_curve.sh",
        ["octo", "demos"],
        {"STEPS": "90000", "CURVE_EVERY": "2"},
        ["octo-multitask-curve --stage collect --steps 90000 --curve-every 2"],
    ),
]


@pytest.mark.parametrize(
    "script,args,env,expected", WRAPPERS, ids=[f"{w[0]} {' '.join(w[1])}" for w in WRAPPERS]
)
def test_the_scripts_are_wrappers_of_the_experiments(tmp_path, capsys, script, args, env, expected):
    """Each script's documented usage becomes `divla-eval experiment ...` (here a stand-in that prints
    its arguments), and each such command dry-runs."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / script).write_text((ROOT / "scripts" / script).read_text())
    fake = tmp_path / ".venv" / "bin" / "divla-eval"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/usr/bin/env bash\necho "$*"\n')
    fake.chmod(0o755)
    environ = {"PATH": os.environ["PATH"], **env}
    out = subprocess.run(
        ["bash", str(tmp_path / "scripts" / script), *args], env=environ, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"experiment {e}" for e in expected]
    for line in out.stdout.splitlines():
        assert main([*shlex.split(line), "--dry-run"]) == 0, line
    capsys.readouterr()
