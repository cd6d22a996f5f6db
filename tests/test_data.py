"""Demonstration collection and loading: layout, determinism, resume, refusal, samples and chunks."""

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from divla_eval.cli import main
from divla_eval.data.collect import CollectConfig, collect, env_args, split_demos
from divla_eval.errors import DivlaEvalError

CFG = CollectConfig(task="bin_picking", split="seen", episodes=2, seed=1000, image_size=32)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("demos") / "bp.hdf5"
    summary = collect(CFG, path, progress=False)
    return path, summary


def test_collect_writes_robomimic_layout(demo_file):
    path, summary = demo_file
    assert summary.demos == 2 and summary.episodes == 2 and not summary.failed and summary.ran == 2
    with h5py.File(path, "r") as f:
        data = f["data"]
        names = sorted(k for k in data if k.startswith("demo_"))
        assert names == ["demo_0", "demo_1"]
        args = json.loads(data.attrs["env_args"])
        assert args["control_freq"] == 20 and args["camera_names"] == ["front", "wrist"]
        assert args["env_kwargs"]["run_seed"] == 1000 and args["env_kwargs"]["image_size"] == 32
        assert args["split"] == "seen" and args["action_space"]["dim"] == 7 and args["object_library_hash"]
        assert json.loads(data.attrs["packages"])["mujoco"] == "3.9.0"
        assert data.attrs["num_demos"] == 2 and data.attrs["num_failed"] == 0
        total = 0
        for name in names:
            g = data[name]
            t = int(g.attrs["num_samples"])
            total += t
            assert 20 < t <= 300
            assert g["actions"].shape == (t, 7) and g["actions"].dtype == np.float32
            assert g["states"].dtype == np.float64 and g["states"].shape[0] == t
            assert g["obs/front_image"].shape == (t, 32, 32, 3) and g["obs/front_image"].dtype == np.uint8
            assert g["obs/wrist_image"].shape == (t, 32, 32, 3) and g["obs/wrist_image"].dtype == np.uint8
            assert g["obs/proprio"].shape == (t, 11) and g["obs/proprio"].dtype == np.float32
            assert g["rewards"].shape == (t,) and g["rewards"][-1] == 1.0 and g["rewards"][:-1].sum() == 0
            assert g["dones"][-1] == 1 and g["dones"][:-1].sum() == 0
            reasoning = list(g["reasoning"].asstr()[:])
            assert len(reasoning) == t and reasoning[0].startswith("grasp the ")
            assert "place it in the basket" in reasoning
            assert g.attrs["instruction"] == "move any object from the right panel into the left basket"
            assert g.attrs["episode_key"].endswith(f"/{int(name[5:]):05d}")
            assert len(json.loads(g.attrs["object_ids"])) == 3
            assert np.abs(g["actions"][:]).max() <= 1.0
            # images are real renders, not blank frames, and the wrist view moves during the demo
            assert g["obs/front_image"][0].std() > 5
            assert not np.array_equal(g["obs/wrist_image"][0], g["obs/wrist_image"][t - 1])
        assert data.attrs["total"] == total == summary.samples
        train = [n.decode() for n in f["mask/train"][:]]
        valid = [n.decode() for n in f["mask/valid"][:]]
        assert sorted(train + valid) == names and len(valid) == 1
        assert isinstance(f["mask/train"][0], bytes)


def test_bimanual_env_args_describe_both_arms():
    """The metadata must size a 14-column action for the bimanual task, right arm (robot 0) first."""
    space = env_args(CollectConfig(task="bussing"))["action_space"]
    assert space["dim"] == 14 == len(space["dims"])
    assert space["dims"][0] == "right_dx" and space["dims"][7] == "left_dx"
    assert env_args(CollectConfig(task="bin_picking"))["action_space"]["dim"] == 7


def test_demo_replays_from_its_stored_initial_state(demo_file):
    """The stored initial state is the evaluation-style reset, and the actions reproduce the demo."""
    from divla_eval.tasks import make_env
    from divla_eval.tasks.base import EpisodeSpec

    path, _ = demo_file
    with h5py.File(path, "r") as f:
        kwargs = json.loads(f["data"].attrs["env_args"])["env_kwargs"]
        g = f["data/demo_1"]
        states, actions = g["states"][:], g["actions"][:]
        first_images = {c: g[f"obs/{c}_image"][0] for c in ("front", "wrist")}
        seed = int(g.attrs["seed"])
    env = make_env(**kwargs)
    try:
        spec = EpisodeSpec("bin_picking", "seen", 1, 1000, kwargs["difficulty"], ())
        env.reset(options={"episode": spec})
        assert seed == spec.seed("scene")
        np.testing.assert_array_equal(env.get_state(), states[0])
        obs = env.observe(cameras=("front", "wrist"))  # what a policy sees at evaluation = what it learnt
        for cam, image in first_images.items():
            np.testing.assert_array_equal(obs[cam], image)
        for t, action in enumerate(actions):
            if t:
                np.testing.assert_allclose(env.get_state(), states[t], atol=1e-6)
            step = env.advance(action)
        assert step.terminated and step.success
    finally:
        env.close()


def test_rerun_with_same_args_skips_existing_demos(demo_file):
    path, _ = demo_file
    with h5py.File(path, "r") as f:
        before = f["data/demo_0/actions"][:]
    summary = collect(CFG, path, progress=False)
    assert summary.ran == 0 and summary.skipped == 2 and summary.demos == 2 and summary.new_demos == 0
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data/demo_0/actions"][:], before)
        sessions = json.loads(f["data"].attrs["sessions"])
    assert len(sessions) == 2
    # each session keeps its timing: the collection rate (demos per hour) is read from it
    assert sessions[0]["new_demos"] == 2 and sessions[0]["seconds"] > 0 and sessions[1]["new_demos"] == 0


def test_interrupted_demo_is_redone_on_resume(demo_file, tmp_path):
    """A demo without `num_samples` is what a kill during its write leaves: it is dropped and redone."""
    path, _ = demo_file
    copy = tmp_path / "torn.hdf5"
    shutil.copy(path, copy)
    with h5py.File(copy, "a") as f:
        reference = f["data/demo_1/actions"][:]
        del f["data/demo_1"].attrs["num_samples"]
        del f["data/demo_1/obs/wrist_image"]
    summary = collect(CFG, copy, progress=False)
    assert summary.ran == 1 and summary.skipped == 1 and summary.demos == 2
    with h5py.File(copy, "r") as f:
        np.testing.assert_array_equal(f["data/demo_1/actions"][:], reference)
        assert f["data/demo_1/obs/wrist_image"].shape[0] == len(reference)


def test_mismatched_rerun_is_refused(demo_file, capsys):
    path, _ = demo_file
    with pytest.raises(DivlaEvalError, match="different arguments.*image_size"):
        collect(CollectConfig(**{**CFG.__dict__, "image_size": 48}), path, progress=False)
    code = main(["collect", "--task", "bin_picking", "--episodes", "2", "--out", str(path), "--seed", "7"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("divla-eval: error:") and "run_seed" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "bin_pickin"], "unknown task"),
        (["--split", "nowhere"], "unknown split"),
        (["--perturb", "nosuch:1"], "unknown perturbation"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "x.hdf5"
    code = main(["collect", "--episodes", "1", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()  # nothing is written before the arguments are known to be good


def test_cli_unwritable_or_foreign_output_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    assert main(["collect", "--episodes", "1", "--out", str(blocker / "d.hdf5")]) == 2
    assert "cannot create" in capsys.readouterr().err
    assert main(["collect", "--episodes", "1", "--out", str(blocker)]) == 2
    assert "cannot open" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["collect", "--episodes", "0", "--out", str(tmp_path / "y.hdf5")])
    assert exc.value.code == 2


def test_dataset_items_and_chunks(demo_file):
    from divla_eval.data.dataset import DemoDataset

    path, summary = demo_file
    ds = DemoDataset(path, chunk=16, obs_horizon=2)
    assert len(ds) == summary.samples
    with h5py.File(path, "r") as f:
        acts = f["data/demo_0/actions"][:]
        front = f["data/demo_0/obs/front_image"][:]
        proprio = f["data/demo_0/obs/proprio"][:]
        reasoning = list(f["data/demo_0/reasoning"].asstr()[:])
    item = ds[0]
    assert item["demo"] == "demo_0" and item["t"] == 0
    front_item = item["images"]["front"]
    assert front_item.shape == (2, 3, 32, 32) and str(front_item.dtype) == "torch.uint8"
    # t=0 with a horizon of 2: the missing earlier frame repeats frame 0 and is flagged
    assert item["obs_pad_mask"].tolist() == [True, False]
    np.testing.assert_array_equal(item["images"]["front"][1].numpy(), front[0].transpose(2, 0, 1))
    np.testing.assert_array_equal(item["actions"].numpy(), acts[:16])
    assert not item["action_pad_mask"].any()
    assert item["instruction"].startswith("move any object") and item["reasoning"] == reasoning[0]
    t = len(acts) - 5
    item = ds[t]
    assert item["t"] == t
    np.testing.assert_array_equal(item["actions"][:5].numpy(), acts[t:])
    np.testing.assert_array_equal(item["actions"][5:].numpy(), np.repeat(acts[-1:], 11, axis=0))
    assert item["action_pad_mask"].tolist() == [False] * 5 + [True] * 11
    np.testing.assert_array_equal(item["proprio"].numpy(), proprio[t - 1 : t + 1])
    np.testing.assert_array_equal(item["images"]["front"][0].numpy(), front[t - 1].transpose(2, 0, 1))
    assert item["reasoning"] == reasoning[t]
    # the next index starts demo_1
    assert ds[len(acts)]["demo"] == "demo_1" and ds[len(acts)]["t"] == 0
    ds.close()


def test_dataset_masks_and_dataloader_workers(demo_file):
    import torch

    from divla_eval.data.dataset import DemoDataset, collate

    path, summary = demo_file
    train, valid = DemoDataset(path, demos="train"), DemoDataset(path, demos="valid")
    assert len(train) + len(valid) == summary.samples and set(train.demos).isdisjoint(valid.demos)
    ds = DemoDataset(path, chunk=8, cameras=("wrist",))
    ds[0]  # opens the file in this process; workers must open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=2, collate_fn=collate)
    n = 0
    for batch in loader:
        b = len(batch["instruction"])
        assert isinstance(batch["instruction"], list) and isinstance(batch["reasoning"], list)
        assert batch["images"]["wrist"].shape == (b, 1, 3, 32, 32) and set(batch["images"]) == {"wrist"}
        assert batch["actions"].shape == (b, 8, 7) and batch["action_pad_mask"].dtype == torch.bool
        n += b
    assert n == len(ds)
    ds.close()


def test_action_stats(demo_file):
    from divla_eval.data.dataset import action_stats

    path, _ = demo_file
    stats = action_stats(path)
    with h5py.File(path, "r") as f:
        acts = np.concatenate([f[f"data/demo_{i}/actions"][:] for i in range(2)])
    assert set(stats) == {"min", "max", "mean", "std", "q01", "q99"}
    assert all(v.shape == (7,) for v in stats.values())
    np.testing.assert_allclose(stats["mean"], acts.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["q99"], np.percentile(acts, 99, axis=0), atol=1e-5)
    assert np.all(stats["min"] <= stats["q01"]) and np.all(stats["q01"] <= stats["q99"])
    assert np.all(stats["q99"] <= stats["max"]) and stats["min"][6] == -1.0 and stats["max"][6] == 1.0


def test_split_demos_is_deterministic_and_about_ten_percent():
    names = [f"demo_{i}" for i in range(40)]
    train, valid = split_demos(names)
    assert len(valid) == 4 and sorted(train + valid, key=lambda n: int(n[5:])) == names
    assert split_demos(list(reversed(names))) == (train, valid)
    assert split_demos(["demo_3"]) == (["demo_3"], [])


def test_importing_collect_does_not_import_torch():
    code = "import sys, divla_eval.data, divla_eval.data.collect; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_failed_episodes_are_counted_named_and_not_retried(tmp_path, capsys):
    out = tmp_path / "fail.hdf5"
    argv = ["collect", "--episodes", "1", "--image-size", "16", "--max-steps", "5", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "collected 0 demos from 1 episodes (1 failed: bin_picking/seen/-/none/00000 (no_grasp))" in text
    with h5py.File(out, "r") as f:
        assert not [k for k in f["data"] if k.startswith("demo_")] and f["data"].attrs["total"] == 0
        assert f["data"].attrs["num_failed"] == 1 and f["data"].attrs["num_episodes"] == 1
        assert json.loads(f["data"].attrs["failed_episodes"]) == {"bin_picking/seen/-/none/00000": "no_grasp"}
    summary = collect(CollectConfig(episodes=1, image_size=16, max_steps=5), out, progress=False)
    assert summary.ran == 0 and summary.skipped == 1 and len(summary.failed) == 1


def _relabelled_copy(path, dest, **env_kwargs):
    """A copy of a demos file whose env_args claim other settings (cheaper than collecting them)."""
    shutil.copy(path, dest)
    with h5py.File(dest, "r+") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        env_args["env_kwargs"].update(env_kwargs)
        f["data"].attrs["env_args"] = json.dumps(env_args)
    return dest


def test_dataset_over_several_files(demo_file, tmp_path):
    """One dataset over several files (one per task or sub-task); demos keep which file they are from."""
    from divla_eval.data.dataset import DemoDataset, action_stats

    path, summary = demo_file
    other = _relabelled_copy(path, tmp_path / "multitask.hdf5", task="multitask", split="flip_pot")
    both = DemoDataset([path, other], chunk=4)
    assert len(both) == 2 * summary.samples
    assert both.demos == ["0/demo_0", "0/demo_1", "1/demo_0", "1/demo_1"]
    first, again = both[0], both[summary.samples]  # demo_0 of each file
    assert (first["demo"], again["demo"]) == ("0/demo_0", "1/demo_0")
    np.testing.assert_array_equal(first["images"]["front"].numpy(), again["images"]["front"].numpy())
    assert len(DemoDataset([path, other], demos=["1/demo_1"])) == len(DemoDataset(path, demos=["demo_1"]))
    stats = action_stats([path, other])
    np.testing.assert_allclose(stats["mean"], action_stats(path)["mean"], atol=1e-6)
    with pytest.raises(KeyError, match="no demos"):
        DemoDataset([path, other], demos=["2/demo_0"])
    both.close()


@pytest.mark.parametrize(
    "change, needle",
    [({"task": "bussing"}, "share the embodiment"), ({"image_size": 64}, "image_size=64")],
)
def test_files_that_cannot_train_together_are_refused(demo_file, tmp_path, change, needle):
    from divla_eval.data.dataset import DemoDataset

    path, _ = demo_file
    other = _relabelled_copy(path, tmp_path / "other.hdf5", **change)
    with pytest.raises(ValueError, match=needle):
        DemoDataset([path, other])
