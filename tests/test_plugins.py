"""Policies from other packages: `--policy package.module:factory`, the `divla_eval.policies` entry-point
group, and `divla_eval.evaluate` with a policy object (in-process and in spawned workers).

The plugin is a tiny package written into tmp_path with a `*.dist-info` directory, which is what
importlib.metadata finds on sys.path (or PYTHONPATH) for an installed distribution.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from divla_eval.cli import main
from divla_eval.policy import POLICIES, ActionChunk, PolicyMetadata, RandomPolicy
from divla_eval.records import EpisodeStore

PLUGIN = "divla_test_plugin"

POLICIES_PY = '''
import numpy as np

from divla_eval.policy import ActionChunk, PolicyMetadata


class HoldStill:
    """Zero motion; the gripper command is an inference option (no checkpoint)."""

    INFERENCE_OPTIONS = {"gripper": float}

    def __init__(self, action_dim=7, gripper=-1.0):
        self.action_dim, self.gripper = action_dim, gripper
        self.metadata = PolicyMetadata(name="hold_still")

    def reset(self, instruction, seed):
        pass

    def infer(self, obs):
        actions = np.zeros((1, self.action_dim))
        actions[:, 6] = self.gripper
        return ActionChunk(actions)


def make_policy(action_dim=7):
    return HoldStill(action_dim)


def not_a_policy(action_dim=7):
    return object()


CONSTANT = 3
'''

ENTRY_POINTS = """
[divla_eval.policies]
hold_still = divla_test_plugin.policies:HoldStill
broken_plugin = divla_test_plugin.broken:Policy
random = divla_test_plugin.policies:HoldStill
twice = divla_test_plugin.policies:make_policy
"""


def _write_plugin(root: Path) -> None:
    pkg = root / PLUGIN
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "policies.py").write_text(POLICIES_PY)
    (pkg / "broken.py").write_text("import no_such_dependency_for_divla_tests\n")
    for dist, version, entry_points in [
        ("divla-test-plugin", "0.1", ENTRY_POINTS),
        (
            "divla-other-plugin",
            "0.2",
            "[divla_eval.policies]\ntwice = divla_test_plugin.policies:HoldStill\n",
        ),
    ]:
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """The plugin package in tmp_path/site (not yet on sys.path); imports and loaded plugins are
    forgotten afterwards, so that each test imports its own copy."""
    site = tmp_path / "site"
    site.mkdir()
    _write_plugin(site)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(POLICIES, "_loaded", {})
    yield site
    for name in [m for m in sys.modules if m == PLUGIN or m.startswith(PLUGIN + ".")]:
        del sys.modules[name]


@pytest.fixture
def plugin(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    return plugin_dir


def _run(argv, capsys):
    code = main(["run", "--episodes", "2", "--max-steps", "3", "--no-progress", "--threads", "1", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_module_factory_through_the_cli_names_the_records_and_resumes(plugin, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(["--policy", f"{PLUGIN}.policies:make_policy", "--out", str(out)], capsys)
    assert code == 0 and "ran 2, resumed past 0" in stdout
    records = EpisodeStore(out / "episodes.jsonl").load()
    assert [r.policy for r in records] == [f"{PLUGIN}.policies:make_policy"] * 2
    assert (
        json.loads((out / "manifest.json").read_text())["config"]["policy"]
        == f"{PLUGIN}.policies:make_policy"
    )
    code, stdout, _ = _run(["--policy", f"{PLUGIN}.policies:make_policy", "--out", str(out)], capsys)
    assert code == 0 and "ran 0, resumed past 2" in stdout


def test_entry_point_name_and_policy_options_through_the_cli(plugin, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(
        ["--policy", "hold_still", "--policy-option", "gripper=1", "--out", str(out)], capsys
    )
    assert code == 0 and "policy=hold_still (gripper=1.0)" in stdout
    records = EpisodeStore(out / "episodes.jsonl").load()
    assert [(r.policy, r.policy_options) for r in records] == [("hold_still", {"gripper": 1.0})] * 2
    # a plugin cannot take a built-in's name: `random` stays ours
    assert POLICIES.get("random") is RandomPolicy


def test_module_factory_is_found_in_the_current_directory(plugin_dir, monkeypatch, capsys):
    """As `python -m` would: the console script's sys.path lacks the current directory."""
    monkeypatch.chdir(plugin_dir)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(plugin_dir))])
    code, stdout, _ = _run(["--policy", f"{PLUGIN}.policies:HoldStill", "--episodes", "1"], capsys)
    assert code == 0
    # the default run directory is named after the policy without ':' (nor nesting)
    assert (
        plugin_dir / "runs" / f"bin_picking-unseen-{PLUGIN}.policies_HoldStill-seed0" / "episodes.jsonl"
    ).is_file()


@pytest.mark.parametrize(
    "policy, needle",
    [
        ("no_such_module_for_divla_tests:make", "no module named 'no_such_module_for_divla_tests'"),
        (f"{PLUGIN}.policies:nope", f"{PLUGIN}.policies has no attribute 'nope'"),
        (f"{PLUGIN}.policies:CONSTANT", "is an object of type int, not a factory"),
        (f"{PLUGIN}.policies:not_a_policy", "is not a policy (object: no reset(), no infer(), no metadata)"),
        (f"{PLUGIN}.policies:make_policy:x", "is not an import path of the form 'package.module:attr'"),
        (
            "broken_plugin",
            "'broken_plugin' from package divla-test-plugin 0.1 (entry point 'broken_plugin = "
            f"{PLUGIN}.broken:Policy' in group divla_eval.policies) failed to load: ModuleNotFoundError",
        ),
        ("twice", "declared by several packages (divla-other-plugin 0.2, divla-test-plugin 0.1)"),
        ("hold_stil", "did you mean 'hold_still'?); or a 'package.module:attr' import path"),
        (f"{PLUGIN}.policies:make_policy --policy-option gripper=1", "declares no INFERENCE_OPTIONS"),
    ],
)
def test_a_policy_that_cannot_be_used_is_one_line_exit_2(plugin, tmp_path, capsys, policy, needle):
    name, *rest = policy.split(" ")
    code, _, err = _run(["--policy", name, *rest, "--out", str(tmp_path / "run")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("divla-eval: error:"), lines
    assert needle in lines[0]


def test_list_and_errors_in_a_cli_subprocess(plugin_dir):
    """What a user sees: the plugin listed with its package, and a broken one as one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(plugin_dir)}
    cli = [sys.executable, "-m", "divla_eval.cli"]
    listed = subprocess.run([*cli, "list", "policies"], env=env, capture_output=True, text=True, check=True)
    rows = {tuple(line.split(None, 1)) for line in listed.stdout.splitlines()}
    assert ("hold_still", f"plugin from package divla-test-plugin 0.1: {PLUGIN}.policies:HoldStill") in rows
    shadowed = [d for n, d in rows if n == "random" and "plugin" in d]
    assert shadowed and "ignored: a built-in has this name" in shadowed[0]
    assert ("random", "uniform random actions (lower bound)") in rows
    broken = subprocess.run(
        [*cli, "run", "--policy", "broken_plugin"], env=env, capture_output=True, text=True
    )
    assert broken.returncode == 2
    assert broken.stderr.strip().startswith("divla-eval: error: policy 'broken_plugin' from package")
    assert len(broken.stderr.strip().splitlines()) == 1 and "Traceback" not in broken.stderr


class _Still:
    """Defined in this test module: the policy object of a researcher's script."""

    def __init__(self, gripper: float = -1.0):
        self.gripper = gripper
        self.metadata = PolicyMetadata(name="still")

    def reset(self, instruction, seed):
        pass

    def infer(self, obs):
        return ActionChunk(np.array([[0, 0, 0, 0, 0, 0, self.gripper]], dtype=float))


def test_evaluate_a_policy_object_in_process(tmp_path):
    import divla_eval

    result = divla_eval.evaluate(_Still(), episodes=2, max_steps=3, out=tmp_path / "run")
    assert (result.episodes, result.successes, result.ran, result.errors) == (2, 0, 2, 0)
    assert result.success_rate == 0.0 and result.ci95[0] == 0.0 and 0.5 < result.ci95[1] < 0.7
    assert result.policy == "still" and [r.policy for r in result.records] == ["still", "still"]
    again = divla_eval.evaluate(_Still(), episodes=2, max_steps=3, out=tmp_path / "run")
    assert again.ran == 0 and again.episodes == 2  # resumed
    by_name = divla_eval.evaluate("random", episodes=1, max_steps=3)  # a temporary run directory
    try:
        assert by_name.episodes == 1 and (by_name.run_dir / "episodes.jsonl").is_file()
        assert by_name.run_dir.parent == Path(tempfile.gettempdir())
    finally:
        shutil.rmtree(by_name.run_dir)


@pytest.mark.parametrize(
    "policy, kwargs, needle",
    [
        (_Still, {}, "is a class: pass an instance, or its import path"),
        (object(), {}, "the object given as policy is not a policy (object: no reset(), no infer()"),
        (_Still(), {"checkpoint": "x"}, "a policy object is already built"),
        (_Still(), {"workers": 0}, "workers must be a positive integer"),
    ],
)
def test_evaluate_refuses_what_it_cannot_run(tmp_path, policy, kwargs, needle):
    from divla_eval import evaluate
    from divla_eval.errors import DivlaEvalError

    with pytest.raises(DivlaEvalError) as info:
        evaluate(policy, episodes=1, max_steps=2, out=tmp_path / "run", **kwargs)
    assert needle in str(info.value)
    assert not (tmp_path / "run" / "episodes.jsonl").exists()


def test_evaluate_an_importable_object_with_two_workers(plugin, tmp_path):
    """Each worker process gets its own pickled copy (the gripper setting travels with it)."""
    import importlib

    from divla_eval import evaluate

    HoldStill = importlib.import_module(f"{PLUGIN}.policies").HoldStill  # written by the fixture
    serial = evaluate(HoldStill(gripper=1.0), episodes=2, max_steps=3, out=tmp_path / "a", threads=1)
    parallel = evaluate(
        HoldStill(gripper=1.0), episodes=2, max_steps=3, out=tmp_path / "b", workers=2, threads=1
    )

    def key(records):
        return sorted((r.episode_key, r.success, r.failure_mode, r.steps, r.policy) for r in records)

    assert parallel.ran == 2 and key(parallel.records) == key(serial.records)


SCRIPT = """
import numpy as np

import divla_eval
from divla_eval.policy import ActionChunk, PolicyMetadata


class Still:
    def __init__(self):
        self.metadata = PolicyMetadata(name="still")

    def reset(self, instruction, seed):
        pass

    def infer(self, obs):
        return ActionChunk(np.array([[0, 0, 0, 0, 0, 0, -1.0]]))


"""
CALL = "result = divla_eval.evaluate(Still(), episodes={n}, max_steps=2, workers=2, threads=1, out={out!r})\n"


def _python(args, tmp_path, stdin=None):
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, input=stdin, capture_output=True, text=True, timeout=300
    )


def test_a_script_with_the_main_guard_runs_its_own_class_in_two_workers(tmp_path):
    body = SCRIPT + 'if __name__ == "__main__":\n' + textwrap.indent(CALL.format(n=2, out="run"), "    ")
    (tmp_path / "guarded.py").write_text(body + '    print("episodes", result.episodes)\n')
    done = _python(["guarded.py"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "episodes 2" in done.stdout
    assert [r.policy for r in EpisodeStore(tmp_path / "run" / "episodes.jsonl").load()] == ["still", "still"]


def test_a_script_without_the_guard_is_refused_before_any_worker_starts(tmp_path):
    (tmp_path / "unguarded.py").write_text(SCRIPT + CALL.format(n=2, out="run"))
    done = _python(["unguarded.py"], tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert (
        "unguarded.py starts a parallel run at its top level: put the code that starts the run under " in last
    )
    assert 'if __name__ == "__main__":' in last and "or use workers=1" in last
    assert not (tmp_path / "run").exists()
    # read from stdin, a script has no file for the workers to re-run: refused too
    done = _python(
        ["-"], tmp_path, stdin=SCRIPT + 'if __name__ == "__main__":\n    ' + CALL.format(n=2, out="run")
    )
    assert "a script read from stdin?): save the script to a file" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_a_class_defined_in_python_c_reaches_a_worker(tmp_path):
    """Like a notebook: no file to re-run, so the class travels by value (cloudpickle)."""
    done = _python(
        ["-c", SCRIPT + CALL.format(n=1, out="run") + "print('episodes', result.episodes)"], tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "episodes 1" in done.stdout


def test_import_divla_eval_stays_light():
    code = (
        "import sys, divla_eval; divla_eval.evaluate, divla_eval.EvaluationResult; "
        "print([m for m in ('torch', 'robosuite', 'mujoco') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
