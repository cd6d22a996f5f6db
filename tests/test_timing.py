"""The timing protocol (divla_eval.timing), `divla-eval bench`'s errors, DiVLA's reasoning reuse."""

from __future__ import annotations

import time

import numpy as np
import pytest

from divla_eval.cli import main
from divla_eval.policy import ActionChunk, Observation, PolicyMetadata
from divla_eval.timing import UNTRAINED, headline_ratio, table, time_policy, time_variants

OBS = Observation({}, np.zeros(11, dtype=np.float32), "move any object")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakePolicy:
    """Each call takes `seconds` on `clock` (or really sleeps) and returns `chunk` actions."""

    timing_variants = None

    def __init__(self, seconds: float, chunk: int, execute_steps: int, clock: FakeClock | None = None):
        self.metadata = PolicyMetadata(name="fake", execute_steps=execute_steps)
        self.seconds, self.chunk, self.clock = seconds, chunk, clock
        self.resets = self.calls = 0
        self.mode = "a"

    def reset(self, instruction, seed):
        self.resets += 1

    def infer(self, obs):
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.seconds * (2 if self.mode == "slow" else 1)
        else:
            time.sleep(self.seconds)
        return ActionChunk(actions=np.zeros((self.chunk, 7)))


@pytest.mark.parametrize(("chunk", "execute", "per_call"), [(16, 8, 8), (4, 8, 4), (1, 1, 1)])
def test_actions_per_second_counts_the_executed_part_of_each_chunk(chunk, execute, per_call):
    clock = FakeClock()
    p = FakePolicy(0.020, chunk, execute, clock)
    row = time_policy(p, OBS, warmup=3, calls=10, threads=1, timer=clock)
    assert p.calls == 13 and p.resets == 2  # warm-up, then reset: the timed calls start an episode
    assert row.policy == "fake" and row.variant == "default" and row.checkpoint == UNTRAINED
    assert (row.calls, row.warmup, row.threads) == (10, 3, 1)
    assert row.mean_ms == pytest.approx(20.0) and row.p50_ms == pytest.approx(20.0)
    assert row.p95_ms == pytest.approx(20.0) and row.p99_ms == pytest.approx(20.0)
    assert row.hz == pytest.approx(50.0)
    assert row.actions_per_call == per_call
    assert row.actions_per_s == pytest.approx(per_call / 0.020)
    assert row.params is None


def test_a_real_sleep_is_measured_and_torch_threads_are_set():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        row = time_policy(FakePolicy(0.005, 16, 8), OBS, warmup=1, calls=5, threads=1)
        assert torch.get_num_threads() == 1 and row.threads == 1
    finally:
        torch.set_num_threads(before)
    assert 5.0 <= row.p50_ms <= row.p95_ms <= row.p99_ms < 200.0
    assert row.actions_per_s == pytest.approx(8 / (row.mean_ms / 1000))


def test_variants_are_timed_one_by_one_and_the_policy_is_restored():
    clock = FakeClock()
    p = FakePolicy(0.010, 16, 8, clock)
    p.timing_variants = {"normal": {"mode": "a"}, "twice as slow": {"mode": "slow"}}
    rows = time_variants(p, OBS, name="fake", warmup=0, calls=4, timer=clock)
    assert [(r.variant, r.settings) for r in rows] == [("normal", "mode=a"), ("twice as slow", "mode=slow")]
    assert rows[1].mean_ms == pytest.approx(2 * rows[0].mean_ms)
    assert p.mode == "a"


def test_headline_ratio_needs_both_policies_and_flags_unequal_sizes():
    def row(policy, aps, params):
        return dict(policy=policy, variant="v", actions_per_s=aps, params=params)

    import pandas as pd

    assert headline_ratio(pd.DataFrame([row("divla", 80.0, 10)])) is None
    same = headline_ratio(pd.DataFrame([row("divla", 80.0, 100), row("openvla", 4.0, 110)]))
    assert "20.0x" in same and "not an equal-size" not in same
    assert "not an equal-size" in headline_ratio(pd.DataFrame([row("divla", 8, 100), row("openvla", 4, 300)]))
    # with backbones, those are what must match: a bigger action head is not a bigger backbone
    rows = [dict(row("divla", 8, 300), backbone_params=90), dict(row("openvla", 4, 100), backbone_params=95)]
    line = headline_ratio(pd.DataFrame(rows))
    assert "backbone parameters 90 vs 95" in line and "not an equal-size" not in line


def test_table_has_one_row_per_timing():
    clock = FakeClock()
    rows = [time_policy(FakePolicy(0.01, 2, 2, clock), OBS, warmup=0, calls=2, timer=clock)] * 2
    df = table(rows)
    assert len(df) == 2 and {"p99_ms", "actions_per_s", "hz", "params", "checkpoint"} <= set(df.columns)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench", "--policies", "divla,nosuchpolicy"], "unknown policy 'nosuchpolicy'; valid:"),
        (["bench", "--policies", "divla", "--task", "nosuchtask"], "unknown task 'nosuchtask'"),
        (["bench", "--policies", "divla", "--checkpoint", "random=x"], "'random' is not in --policies"),
        (["bench", "--policies", "divla", "--calls", "0"], "positive integer"),
        (["bench", "--policies", "divla", "--checkpoint", "divla=/no/such/dir"], "does not exist"),
        (
            ["bench", "--policies", "divla", "--checkpoint", "divla=x", "--model-option", "text_hidden=64"],
            "excludes --checkpoint",
        ),
        (["bench", "--policies", "random", "--model-option", "text_hidden=64"], "no policy here has a model"),
        (["bench", "--policies", "openvla", "--model-option", "alpha=1"], "valid: action_dim, cameras"),
    ],
)
def test_bench_bad_input_is_one_line_exit_2(argv, needle, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks exit through the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("divla-eval: error:") and needle in err and err.count("\n") == 1
    if "nosuchpolicy" in needle:
        assert "diffusion_policy" in err and "divla" in err


def test_bench_writes_csv_and_markdown_for_a_policy_without_weights(tmp_path, capsys):
    """`random` needs no model: the whole command path (scene, table, files) in a second."""
    out = tmp_path / "bench"
    assert main(["bench", "--policies", "random", "--calls", "3", "--warmup", "1", "--out", str(out)]) == 0
    md = (out / "speed.md").read_text()
    assert "divla-eval bench --policies random --calls 3" in md and "cores" in md and "torch" in md
    import pandas as pd

    df = pd.read_csv(out / "speed.csv")
    assert list(df.policy) == ["random"] and df.calls[0] == 3 and df.actions_per_call[0] == 1
    assert "actions/s" in capsys.readouterr().out


def test_model_options_build_untrained_models_of_that_size(tmp_path):
    """`bench --model-option` times DiVLA and OpenVLA at a backbone size of the user's choosing."""
    pytest.importorskip("torch")
    from divla_eval.timing import backbone_parameter_count, build_policy

    sizes = {"text_hidden": 48, "text_layers": 1, "text_heads": 2, "text_kv_heads": 1, "vision_layers": 1}
    small, label = build_policy("openvla", workdir=tmp_path, model_options=sizes)
    assert "untrained" in label and "text_hidden=48" in label
    assert small.model.cfg.text_hidden == 48 and small.model.cfg.text_layers == 1
    bigger, _ = build_policy("openvla", workdir=tmp_path, model_options={**sizes, "text_layers": 2})
    assert backbone_parameter_count(bigger) > backbone_parameter_count(small)


# --- DiVLA: reasoning reuse ----------------------------------------------------------------------------
@pytest.fixture
def divla_policy():
    pytest.importorskip("torch")
    from test_divla import tiny_model  # the tiny DiVLA of tests/test_divla.py

    from divla_eval.divla.policy import DiVLAPolicy

    model = tiny_model()
    generated = []
    original = model.generate_reasoning

    def counting(prefix):
        out = original(prefix)
        generated.append(out[0])
        return out

    model.generate_reasoning = counting
    return DiVLAPolicy(model), generated


def _obs(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 255, (28, 28, 3), dtype=np.uint8) for c in ("front", "wrist")}
    return Observation(images, rng.normal(size=11).astype(np.float32), "move any object")


@pytest.mark.parametrize(("every", "calls", "expected"), [(1, 5, 5), (3, 7, 3), (4, 8, 2), (0, 6, 1)])
def test_reasoning_is_generated_once_every_k_calls(divla_policy, every, calls, expected):
    policy, generated = divla_policy
    policy.reasoning_every = every
    seen = []
    policy.model.act = _spy(policy.model.act, seen)
    policy.reset("move any object", 0)
    texts, counts = [], []
    for i in range(calls):
        texts.append(policy.infer(_obs(i)).reasoning)
        counts.append(len(generated))
    assert len(generated) == expected
    # between generations the exact ids of the last generated phrase are fed back, and its text reported
    for i, ids in enumerate(seen):
        fresh = i == 0 or (every > 0 and i % every == 0)
        assert (ids is None) == fresh
        if not fresh:
            assert ids == generated[counts[i] - 1]
            assert texts[i] == texts[i - 1]
    policy.reset("move any object", 0)  # a new episode starts with a fresh phrase
    policy.infer(_obs(0))
    assert len(generated) == expected + 1


def _spy(act, seen):
    def wrapped(*a, **kw):
        seen.append(kw.get("reasoning_ids"))
        return act(*a, **kw)

    return wrapped


def test_reasoning_every_1_gives_the_actions_of_a_plain_generating_call(divla_policy):
    import torch

    policy, _ = divla_policy
    policy.reasoning_every = 1
    policy.reset("move any object", 7)
    got = [policy.infer(_obs(i)).actions for i in range(3)]
    g = torch.Generator().manual_seed(7)
    for i in range(3):  # what DiVLAPolicy.infer did before reasoning_every existed
        o = _obs(i)
        images = {c: torch.from_numpy(o.images[c]).permute(2, 0, 1)[None].float().div(255) for c in o.images}
        out = policy.model.act(images, torch.as_tensor(o.proprio)[None], o.instruction, "panda", generator=g)
        np.testing.assert_array_equal(got[i], out.actions[0].numpy().astype(np.float64))


def test_the_backbone_is_the_vision_and_language_model(divla_policy):
    from divla_eval.timing import backbone_parameter_count, parameter_count

    policy, _ = divla_policy
    m = policy.model
    expected = sum(
        p.numel() for mod in (m.vision, m.mm_projector, m.decoder, m.lm_head) for p in mod.parameters()
    )
    assert backbone_parameter_count(policy) == expected < parameter_count(policy)
    assert backbone_parameter_count(FakePolicy(0.0, 1, 1)) is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_reasoning_every_must_be_a_non_negative_integer(divla_policy, bad):
    policy, _ = divla_policy
    with pytest.raises(ValueError, match="reasoning_every"):
        policy.reasoning_every = bad


# --- profile_policy: where a call's time goes -------------------------------------------------------------
def test_profile_splits_a_divla_call_into_its_labelled_stages(divla_policy):
    from divla_eval.divla.model import STAGES
    from divla_eval.timing import profile_policy

    policy, generated = divla_policy
    df = profile_policy(policy, _obs(0), warmup=1, calls=3)
    assert list(df.columns) == ["label", "calls", "ms", "share"] and list(df.label[-2:]) == ["other", "total"]
    rows = df.set_index("label")
    stages = [label for label in df.label if label.startswith("divla.")]
    assert stages == [s for s in STAGES if s in stages]  # in the order a call runs them
    assert {"divla.vision", "divla.prompt", "divla.reasoning_prefix", "divla.action_pass"} <= set(stages)
    assert {"divla.condition", "divla.ddim"} <= set(stages) and "divla.forced_pass" not in stages
    for once_per_call in ("divla.vision", "divla.reasoning_prefix", "divla.ddim"):
        assert rows.loc[once_per_call, "calls"] == 3
    tokens = sum(len(ids) for ids in generated[-3:])  # the timed calls' phrases
    if tokens:
        assert rows.loc["divla.reasoning_token", "calls"] == tokens
    else:  # a phrase that ends at once has no token passes
        assert "divla.reasoning_token" not in rows.index
    parts = df[df.label != "total"]
    assert parts.share.sum() == pytest.approx(1.0) and rows.loc["total", "share"] == 1.0
    assert parts.ms.sum() == pytest.approx(rows.loc["total", "ms"]) and rows.loc["divla.ddim", "ms"] > 0
    assert 0 <= rows.loc["other", "share"] < 1

    policy.reasoning_every = 0  # one generation per episode, then the reused phrase's single pass
    rows = profile_policy(policy, _obs(0), warmup=0, calls=3).set_index("label")
    assert rows.loc["divla.reasoning_prefix", "calls"] == 1 and rows.loc["divla.forced_pass", "calls"] == 2
    assert rows.loc["divla.ddim", "calls"] == 3


def test_a_policy_without_labels_gets_only_its_total():
    from divla_eval.timing import profile_policy

    df = profile_policy(FakePolicy(0.002, 4, 2), OBS, warmup=1, calls=3)
    assert list(df.label) == ["total"] and df.calls[0] == 3 and df.share[0] == 1.0 and df.ms[0] >= 2.0


def test_bench_profile_prints_and_writes_the_stage_table(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--policies", "random", "--calls", "2", "--warmup", "0", "--no-progress", "--profile"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "actions/s" in printed and "random (default), no weights" in printed and "total" in printed
    md = (out / "profile.md").read_text()
    assert "--profile" in md and "load average" in md and "1 thread(s)" in md and "| total |" in md


# benchmarks/compare.py (the speed gate) is tested in tests/test_regression_gate.py.
