"""Runner: records, resume without duplicates, errors recorded and the run continues, determinism."""

import json

import pytest

from divla_eval import runner
from divla_eval.policy import POLICIES, ActionChunk, PolicyMetadata
from divla_eval.records import EpisodeStore
from divla_eval.runner import RunConfig, run


def _cfg(**kw):
    base = dict(task="bin_picking", split="unseen", policy="random", episodes=3, seed=0, max_steps=20)
    base.update(kw)
    return RunConfig(**base)


def test_run_writes_one_record_per_episode_and_manifest(tmp_path):
    summary = run(_cfg(), tmp_path, progress=False)
    records = EpisodeStore(tmp_path / "episodes.jsonl").load()
    assert summary.ran == 3 and len(records) == 3
    assert [r.episode_index for r in records] == [0, 1, 2]
    assert all(r.status == "ok" and r.steps == 20 and not r.success for r in records)
    assert all(r.failure_mode in ("no_grasp", "dropped", "outside_basket", "timeout") for r in records)
    assert records[0].object_ids[0] == "unseen-toy_car-00"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 0 and manifest["object_library_hash"]
    assert manifest["packages"]["mujoco"] == "3.9.0" and manifest["packages"]["robosuite"] == "1.5.2"
    assert manifest["task_version"] == "1" and manifest["run_id"] == records[0].run_id


def test_a_larger_episode_count_extends_a_run_and_a_smaller_one_is_refused(tmp_path):
    from divla_eval.errors import ConfigMismatchError

    run(_cfg(episodes=2, max_steps=5), tmp_path / "a", progress=False)
    summary = run(_cfg(episodes=3, max_steps=5), tmp_path / "a", progress=False)
    assert summary.skipped == 2 and summary.ran == 1
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["config"]["episodes"] == 3 and manifest["extended"][0]["episodes"] == [2, 3]
    # the extension's episodes are those a 3-episode run makes from scratch
    run(_cfg(episodes=3, max_steps=5), tmp_path / "b", progress=False)
    a, b = (EpisodeStore(tmp_path / d / "episodes.jsonl").load() for d in "ab")
    assert [(r.episode_key, r.seed, r.object_ids) for r in a] == [
        (r.episode_key, r.seed, r.object_ids) for r in b
    ]
    with pytest.raises(ConfigMismatchError, match="episodes: 3 -> 2"):
        run(_cfg(episodes=2, max_steps=5), tmp_path / "a", progress=False)
    with pytest.raises(ConfigMismatchError, match="seed: 0 -> 1"):  # other settings still must match
        run(_cfg(episodes=4, max_steps=5, seed=1), tmp_path / "a", progress=False)


def test_interrupted_run_resumes_to_exactly_n_records(tmp_path, monkeypatch):
    real = runner.run_episode
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_episode", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(episodes=4), tmp_path, progress=False)
    assert len(EpisodeStore(tmp_path / "episodes.jsonl").load()) == 2
    # a torn last line, as a kill during the write would leave
    with open(tmp_path / "episodes.jsonl", "a") as f:
        f.write('{"run_id": "trunc')
    monkeypatch.setattr(runner, "run_episode", real)
    with pytest.warns(UserWarning):
        summary = run(_cfg(episodes=4), tmp_path, progress=False)
    records = EpisodeStore(tmp_path / "episodes.jsonl").load()
    assert summary.ran == 2 and summary.skipped == 2
    assert sorted(r.episode_index for r in records) == [0, 1, 2, 3]
    assert len({r.episode_key for r in records}) == 4


class _Exploding:
    metadata = PolicyMetadata(name="exploding")

    def __init__(self, action_dim=7):
        self.action_dim = action_dim

    def reset(self, instruction, seed):
        self.seed = seed

    def infer(self, obs):
        if self.seed % 2 == 0:
            raise RuntimeError("policy blew up")
        return ActionChunk(actions=[[0, 0, 0, 0, 0, 0, -1]])


def test_policy_exception_marks_episode_error_and_run_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(POLICIES._targets, "exploding", _Exploding)
    monkeypatch.setitem(POLICIES._descriptions, "exploding", "")
    summary = run(_cfg(policy="exploding", episodes=4), tmp_path, progress=False)
    records = EpisodeStore(tmp_path / "episodes.jsonl").load()
    assert len(records) == 4
    errors = [r for r in records if r.status == "error"]
    assert errors and summary.errors == len(errors)
    assert all("policy blew up" in r.error and not r.success and r.failure_mode == "error" for r in errors)
    assert any(r.status == "ok" for r in records)


def test_an_error_record_has_the_fields_of_an_ok_record(tmp_path, monkeypatch):
    """Both paths build one EpisodeOutcome: an error keeps the episode's objects, instruction and its
    perturbations with their parameters, exactly as the ok episode of the same scene would."""
    monkeypatch.setitem(POLICIES._targets, "exploding", _Exploding)
    monkeypatch.setitem(POLICIES._descriptions, "exploding", "")
    cfg = _cfg(policy="exploding", episodes=2, perturbations=(("lighting", 2),))
    run(cfg, tmp_path / "a", progress=False)
    run(_cfg(episodes=2, perturbations=(("lighting", 2),)), tmp_path / "b", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "a" / "episodes.jsonl").read_text().splitlines()]
    ok = {
        json.loads(line)["episode_key"]: json.loads(line)
        for line in (tmp_path / "b" / "episodes.jsonl").open()
    }
    error = next(r for r in lines if r["status"] == "error")
    assert set(error) == set(ok[error["episode_key"]])
    for key in ("object_ids", "instruction", "perturbations"):
        assert error[key] == ok[error["episode_key"]][key], key
    assert error["perturbations"][0]["name"] == "lighting" and len(error["perturbations"][0]) > 2


def test_envs_import_nothing_from_tasks():
    """Dependencies point one way (tasks -> envs): the env is handed a Task instance."""
    import ast
    from pathlib import Path

    import divla_eval.envs

    for path in Path(divla_eval.envs.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("divla_eval.tasks"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("divla_eval.tasks") for a in node.names), path.name


def test_same_seed_gives_same_results(tmp_path):
    a = run(_cfg(episodes=2), tmp_path / "a", progress=False).records
    b = run(_cfg(episodes=2), tmp_path / "b", progress=False).records
    assert [(r.seed, r.success, r.failure_mode, r.steps) for r in a] == [
        (r.seed, r.success, r.failure_mode, r.steps) for r in b
    ]


def test_episode_seeds_depend_only_on_run_seed_and_name():
    plan = runner.plan_episodes(_cfg(episodes=5))
    again = runner.plan_episodes(_cfg(episodes=3))
    assert [s.seed() for s in plan[:3]] == [s.seed() for s in again]
    assert len({s.seed() for s in plan}) == 5
    assert plan[0].seed() != runner.plan_episodes(_cfg(seed=1))[0].seed()


def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    def key(records):
        return sorted((r.episode_key, r.seed, r.success, r.failure_mode, r.steps) for r in records)

    serial = run(_cfg(episodes=3), tmp_path / "serial", progress=False, workers=1).records
    parallel = run(_cfg(episodes=3), tmp_path / "parallel", progress=False, workers=2)
    assert parallel.ran == 3 and key(parallel.records) == key(serial)
    assert len(EpisodeStore(tmp_path / "parallel" / "episodes.jsonl").load()) == 3


def test_reasoning_is_scored_against_the_shadow_expert():
    from divla_eval.reasoning import normalize_phrase, reasoning_accuracy

    trace = [
        {"step": 0, "text": "Grasp the red  block.", "expert": "grasp the red block"},
        {"step": 8, "text": "grasp the red block", "expert": "place it in the basket"},
        {"step": 16, "text": "no expert here"},
    ]
    assert normalize_phrase("Grasp the red  block.") == "grasp the red block"
    assert reasoning_accuracy(trace) == 0.5
    assert reasoning_accuracy([{"step": 0, "text": "x"}]) is None


def test_reasoning_fields_separate_phase_from_object():
    from divla_eval.reasoning import phrase_fields, reasoning_scores

    assert phrase_fields("Grasp the blue cup with the left arm.") == ("grasp", "blue cup")
    assert phrase_fields("place it in the basket") == ("place", "basket")
    assert phrase_fields("the task is done") == ("the", "task is done")
    trace = [
        {"step": 0, "text": "grasp the red block", "expert": "grasp the blue toy car"},  # phase right
        {"step": 8, "text": "grasp the blue toy car", "expert": "grasp the blue toy car again"},
        {"step": 16, "text": "place it in the basket", "expert": "grasp the blue toy car"},
    ]
    assert reasoning_scores(trace) == {"exact": 0.0, "subtask": 2 / 3, "object": 1 / 3}


def test_video_has_one_captioned_frame_per_step(tmp_path):
    import cv2

    run(_cfg(policy="scripted", episodes=1, max_steps=6, image_size=32), tmp_path, progress=False, video=True)
    videos = list((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 1
    cap = cv2.VideoCapture(str(videos[0]))
    frames = []
    ok, frame = cap.read()
    while ok:
        frames.append(frame)
        ok, frame = cap.read()
    assert len(frames) == 6
    assert frames[0].shape == (320 + 24, 320, 3)  # scaled up 10x, with the reasoning strip under it
    assert frames[0][-20:].mean() < 254  # the strip carries text, not just white


def test_a_run_dir_in_use_or_of_another_task_version_is_refused(tmp_path):
    from divla_eval.errors import DivlaEvalError

    # two processes resuming one directory would each append the missing episodes
    with runner.exclusive(tmp_path):
        with pytest.raises(DivlaEvalError, match="another divla-eval process is running episodes"):
            run(_cfg(episodes=1, max_steps=5), tmp_path, progress=False)
    assert not (tmp_path / "episodes.jsonl").exists()
    run(_cfg(episodes=1, max_steps=5), tmp_path, progress=False)  # the lock is released with its holder
    # a directory written by an older version of the task is not resumed into
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "task_version": "0"}))
    with pytest.raises(DivlaEvalError, match="holds episodes of bin_picking version 0, but this"):
        run(_cfg(episodes=1, max_steps=5), tmp_path, progress=False)
    assert len(EpisodeStore(tmp_path / "episodes.jsonl").load()) == 1


def test_run_config_round_trips_through_its_manifest_form():
    cfg = _cfg(episodes=3, perturbations=(("distractors", 3),), policy_options={"reasoning_every": 4})
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.as_dict())))
    assert again == cfg
    assert runner.plan_episodes(again) == runner.plan_episodes(cfg)


def _interrupt_inside_c_code() -> SystemError:
    """What an interrupt landing inside robosuite's numba controller looks like from Python (measured
    with opspace_matrices and SIGTERM: SystemError, from SystemError, from the KeyboardInterrupt)."""
    inner = SystemError("<function _numba_unpickle> returned a result with an exception set")
    inner.__context__ = KeyboardInterrupt()
    outer = SystemError("CPUDispatcher(<function opspace_matrices>) returned a result with an exception set")
    outer.__cause__ = inner
    return outer


class _InterruptedInC(_Exploding):
    """Runs its first episode, then is interrupted inside C code during the second."""

    calls = 0

    def reset(self, instruction, seed):
        type(self).calls += 1

    def infer(self, obs):
        if type(self).calls == 2:
            raise _interrupt_inside_c_code()
        return ActionChunk(actions=[[0, 0, 0, 0, 0, 0, -1]])


def test_an_interrupt_turned_into_system_error_stops_the_run_and_records_nothing(tmp_path, monkeypatch):
    from divla_eval.errors import raise_if_interrupted

    raise_if_interrupted(RuntimeError("an ordinary fault"))  # not an interrupt: returns
    with pytest.raises(KeyboardInterrupt):
        raise_if_interrupted(_interrupt_inside_c_code())
    monkeypatch.setattr(_InterruptedInC, "calls", 0)  # counts this test's episodes only
    monkeypatch.setitem(POLICIES._targets, "interrupted", _InterruptedInC)
    monkeypatch.setitem(POLICIES._descriptions, "interrupted", "")
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(policy="interrupted", episodes=3, max_steps=5), tmp_path, progress=False)
    # the finished episode is kept; the interrupted one is not recorded (as an error) but left to resume
    records = EpisodeStore(tmp_path / "episodes.jsonl").load()
    assert [(r.episode_index, r.status) for r in records] == [(0, "ok")]


def test_an_interrupt_inside_robosuites_numba_controller_is_recognised():
    """The real thing: a signal handler raising KeyboardInterrupt while the operational-space controller
    runs. Nearly every such interrupt lands inside the jitted call and surfaces as SystemError."""
    import signal

    import numpy as np
    from robosuite.utils.control_utils import opspace_matrices

    from divla_eval.errors import raise_if_interrupted

    def interrupt(*_):
        raise KeyboardInterrupt

    mass, jac = np.eye(7), np.random.default_rng(0).random((6, 7))
    opspace_matrices(mass, jac, jac[:3], jac[3:])  # compile before the timer starts
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                while True:
                    opspace_matrices(mass, jac, jac[:3], jac[3:])
            except Exception as exc:  # the SystemError a per-episode handler would see
                raise_if_interrupted(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _CountsThreads(_Exploding):
    """Builds like a learned policy (takes its torch thread share) and records what torch then has."""

    built_with: list[int] = []

    def __init__(self, action_dim=7):
        import torch

        from divla_eval.policy import use_torch_thread_share

        super().__init__(action_dim)
        use_torch_thread_share()
        _CountsThreads.built_with.append(torch.get_num_threads())

    def infer(self, obs):
        return ActionChunk(actions=[[0, 0, 0, 0, 0, 0, -1]])


def test_threads_sets_the_torch_threads_of_a_learned_policy(tmp_path, monkeypatch):
    import torch

    from divla_eval.errors import DivlaEvalError
    from divla_eval.policy import TORCH_THREADS_ENV

    monkeypatch.setitem(POLICIES._targets, "counts_threads", _CountsThreads)
    monkeypatch.setitem(POLICIES._descriptions, "counts_threads", "")
    monkeypatch.setenv(TORCH_THREADS_ENV, "2")  # a share set earlier must not win over --threads
    before = torch.get_num_threads()
    try:
        _CountsThreads.built_with = []
        run(_cfg(policy="counts_threads", episodes=1, max_steps=2), tmp_path / "a", progress=False, threads=1)
        assert _CountsThreads.built_with == [1]
        with pytest.raises(DivlaEvalError, match="--threads must be a positive integer"):
            run(_cfg(policy="counts_threads"), tmp_path / "b", progress=False, threads=0)
    finally:
        torch.set_num_threads(before)
