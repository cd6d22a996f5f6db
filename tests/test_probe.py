"""scripts/probe.py: its R^2 separates a feature that holds the target from one that does not, and it
captures, for every call of the reach, the features the action head is conditioned on."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import TINY_DIFFUSION_POLICY, TINY_DIVLA, TINY_OCTO, load_script


@pytest.fixture(scope="module")
def probe():
    return load_script("probe")


def test_r2_is_high_for_a_feature_that_holds_the_target_and_low_for_noise(probe):
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(2, 30))  # one map from the target to the feature, for fit and test

    def rows(n):
        target = rng.normal(size=(n, 2))
        mixed = target @ mixing + 0.05 * rng.normal(size=(n, 30))
        return [
            {
                "target": y,
                "group": i // 4,
                "holds": m,
                "noise": rng.normal(size=30),
                "proprio": rng.normal(size=3),
            }
            for i, (y, m) in enumerate(zip(target, mixed, strict=True))
        ]

    scores = probe.r2_scores(rows(200), rows(60))
    assert scores["holds"] > 0.95
    assert scores["noise"] < 0.1


def _divla_checkpoint(tmp_path):
    import torch

    from divla_eval.divla.config import DiVLAConfig
    from divla_eval.divla.model import DiVLAModel
    from divla_eval.divla.policy import save_model
    from divla_eval.divla.tokenizer import build_tokenizer

    torch.manual_seed(0)
    texts = ["grasp the blue toy car", "place it in the basket", "the task is done"]
    save_model(DiVLAModel(DiVLAConfig(**TINY_DIVLA), build_tokenizer(texts, 300)), tmp_path / "divla")
    return tmp_path / "divla"


def _diffusion_policy_checkpoint(tmp_path):
    import torch

    from baselines.diffusion_policy.config import DiffusionPolicyConfig
    from baselines.diffusion_policy.model import DiffusionPolicyModel
    from baselines.diffusion_policy.policy import save_model

    torch.manual_seed(0)
    save_model(
        DiffusionPolicyModel(DiffusionPolicyConfig(image_size=28, **TINY_DIFFUSION_POLICY)), tmp_path / "dp"
    )
    return tmp_path / "dp"


def _octo_checkpoint(tmp_path, **options):
    import torch

    from divla_eval.baselines.octo.config import OctoConfig
    from divla_eval.baselines.octo.model import OctoModel, load_text_encoder
    from divla_eval.baselines.octo.policy import save_model

    torch.manual_seed(0)
    encoder = load_text_encoder(OctoConfig.text_encoder)
    cfg = OctoConfig(**{**TINY_OCTO, "image_size": 28, **options})
    save_model(OctoModel(cfg, text_encoder=encoder), tmp_path / "octo")
    return tmp_path / "octo"


def _octo_keypoints_checkpoint(tmp_path):
    return _octo_checkpoint(tmp_path, keypoint_condition=3, keypoint_channels=(8,), keypoint_feature_dim=5)


@pytest.mark.parametrize(
    "name, checkpoint, features",
    [
        (
            "divla",
            _divla_checkpoint,
            {"visual_tokens", "decoder_visual", "decoder_mean", "action_tokens", "condition"},
        ),
        ("diffusion_policy", _diffusion_policy_checkpoint, {"condition"}),
        ("octo", _octo_checkpoint, {"obs_tokens", "condition"}),
        ("octo", _octo_keypoints_checkpoint, {"obs_tokens", "condition", "keypoints"}),
    ],
)
def test_one_row_per_call_of_the_reach_with_the_hand_relative_target(
    probe, demos, tmp_path, name, checkpoint, features
):
    from divla_eval.policy import make_policy

    options = {"oracle_reasoning": 1} if name == "divla" else {}
    policy = make_policy(name, str(checkpoint(tmp_path)), options=options)
    capture = probe.Capture(policy)
    with h5py.File(demos, "r") as f:
        demo = f["data/demo_0"]
        rows = probe.reach_calls(policy, capture, demo, [10, 11], [0, 1])
        actions, states, proprio = demo["actions"][:], demo["states"][:], demo["obs/proprio"][:]
    first_close = int(np.flatnonzero(actions[:, -1] > 0)[0])
    calls = list(range(0, first_close, policy.metadata.execute_steps))
    assert len(rows) == len(calls) and not capture.rows  # every captured call became a row
    for row, t in zip(rows, calls, strict=True):
        assert set(row) == features | {"proprio", "target", "group"}
        np.testing.assert_allclose(row["target"], states[t, [10, 11]] - proprio[t, [0, 1]])
    if name == "divla":
        cfg = policy.model.cfg
        n_vis, hidden = sum(cfg.view_tokens), cfg.text_hidden
        assert rows[0]["visual_tokens"].shape == rows[0]["decoder_visual"].shape == (n_vis * hidden,)
        assert rows[0]["action_tokens"].shape == (cfg.num_action_tokens * hidden,)
        # the features change with the scene: the probe reads what each call saw
        assert not np.allclose(rows[0]["visual_tokens"], rows[-1]["visual_tokens"])
    if "keypoints" in features:  # the head's condition is the readout, then the keypoint features
        width = policy.model.cfg.width
        assert rows[0]["keypoints"].shape == (2 * 5,)
        np.testing.assert_array_equal(rows[0]["condition"][width:], rows[0]["keypoints"])
        assert not np.allclose(rows[0]["keypoints"], rows[-1]["keypoints"])  # what each call saw


def test_records_replace_their_own_key_and_the_table_is_rebuilt_from_them(probe, tmp_path):
    def record(checkpoint, demos, r2):
        return {
            "policy": "divla",
            "checkpoint": checkpoint,
            "steps": 5000,
            "demos": demos,
            "target": "state [10, 11] less proprio [0, 1]",
            "calls": [10, 4],
            "r2": r2,
        }

    probe.write_records(tmp_path, record("a", "flip", {"proprio": 0.1, "condition": 0.5}))
    probe.write_records(tmp_path, record("a", "cube", {"proprio": 0.2, "condition": 0.3}))
    probe.write_records(tmp_path, record("a", "flip", {"proprio": 0.1, "condition": 0.9}))  # a rerun
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rows = [line for line in (tmp_path / "probe.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| cube", "| flip"]
    assert "0.90" in rows[1] and "0.50" not in rows[1] and rows[1].count(" - ") == 6  # 6 features absent


def test_untrained_keeps_the_architecture_and_the_statistics_and_nothing_learnt(probe, tmp_path):
    import torch

    from divla_eval.policy import make_policy

    checkpoint = _diffusion_policy_checkpoint(tmp_path)
    trained = make_policy("diffusion_policy", str(checkpoint))
    with torch.no_grad():
        for p in trained.model.parameters():
            p.add_(1.0)  # "training": every weight moves
        trained.model.set_stats(-np.ones(7), np.ones(7), np.full(11, 0.5), np.full(11, 2.0))
    fresh = probe.untrained(trained, str(checkpoint), {})
    assert type(fresh) is type(trained) and fresh.model is not trained.model
    for (name, a), (_, b) in zip(
        fresh.model.named_parameters(), trained.model.named_parameters(), strict=True
    ):
        assert a.shape == b.shape and not torch.equal(a, b), name
    for (name, a), (_, b) in zip(fresh.model.named_buffers(), trained.model.named_buffers(), strict=True):
        assert torch.equal(a, b), name


def test_a_missing_checkpoint_is_one_line_and_exit_2(probe, demos, capsys, monkeypatch):
    from divla_eval.errors import run_script

    monkeypatch.setattr("sys.argv", ["probe.py", "--policy", "divla", "/no/such/checkpoint", str(demos)])
    with pytest.raises(SystemExit) as stop:
        run_script(probe.main, "probe.py")
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err
        == "probe.py: error: checkpoint directory /no/such/checkpoint does not exist\n"
    )
