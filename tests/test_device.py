"""Devices and real scale: `--device`, gradient accumulation, data-parallel sharding, checkpoints that load
on any device, and DiVLA's options for real backbones. CPU only (CI has no GPU): the GPU branches are
reached by faking what torch reports, and DDP runs as two CPU processes (gloo) in the slow test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from divla_eval.cli import main  # noqa: E402
from divla_eval.device import DEVICE_CHOICES, resolve_device  # noqa: E402
from divla_eval.errors import DivlaEvalError  # noqa: E402
from divla_eval.policy import ActionChunk, PolicyMetadata  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Shared 2-core machines: one torch thread (see tests/test_diffusion_policy.py for why)."""
    set_threads, before = torch.set_num_threads, torch.get_num_threads()
    set_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("DIVLA_EVAL_TORCH_THREADS", "1")
    yield
    set_threads(before)


# --- resolve_device -----------------------------------------------------------------------------------
def test_cpu_and_auto_resolve_to_the_cpu_here():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == "cpu"


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:", "cuda:x", "cuda:-1", "mps:0", "auto:1"])
def test_a_bad_spelling_lists_the_valid_choices(spec):
    with pytest.raises(DivlaEvalError, match=r"unknown --device .*valid: auto, cpu, cuda, cuda:N, mps"):
        resolve_device(spec)


def test_absent_cuda_names_the_problem_and_what_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:3"):
        with pytest.raises(
            DivlaEvalError, match=rf"--device {spec}: no CUDA GPU is visible .*valid here: auto, cpu$"
        ):
            resolve_device(spec)


def test_gpus_that_exist_resolve_and_one_past_them_does_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(DivlaEvalError, match=r"has 2 CUDA GPU\(s\), cuda:0 to cuda:1; valid here: .*cuda:1"):
        resolve_device("cuda:3")
    assert "cuda:N" in DEVICE_CHOICES


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("divla-eval: error: ") and needle in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--policy", "random", "--episodes", "1"],
        ["bench", "--policies", "random", "--calls", "1"],
    ],
)
def test_run_and_bench_refuse_a_missing_gpu_in_one_line(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*argv, "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    _one_line_error(capsys, "--device cuda: no CUDA GPU is visible")
    assert main([*argv, "--out", str(tmp_path / "out"), "--device", "tpu"]) == 2
    _one_line_error(capsys, "unknown --device 'tpu'; valid: auto, cpu, cuda, cuda:N, mps")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_run_records_its_device_in_the_manifest_and_not_in_its_key(tmp_path):
    from divla_eval.runner import RunConfig, run

    cfg = RunConfig(task="bin_picking", split="unseen", policy="random", episodes=1, max_steps=2)
    run(cfg, tmp_path, progress=False, device="cpu")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["device"] == "cpu" and "device" not in manifest["config"]
    assert run(cfg, tmp_path, progress=False, device="auto").skipped == 1  # another device resumes


# --- training -----------------------------------------------------------------------------------------
def _train(demos, out, steps, *extra):
    opts = [f"--model-option={k}={json.dumps(v)}" for k, v in TINY.items()]
    argv = ["train", "--demos", str(demos), "--out", str(out), "--steps", str(steps), "--batch-size", "2"]
    return main([*argv, "--checkpoint-every", "2", "--no-progress", "--threads", "1", *opts, *extra])


def test_train_on_cpu_with_gradient_accumulation_resumes_and_loads_on_cpu(demos, tmp_path, capsys):
    out = tmp_path / "divla"
    assert _train(demos, out, 2, "--device", "cpu", "--grad-accum", "2") == 0
    meta = json.loads((out / "divla_meta.json").read_text())
    assert meta["device"] == "cpu" and meta["processes"] == 1 and meta["mixed_precision"] == "no"
    assert meta["train_config"]["grad_accum"] == 2 and "device" not in meta["train_config"]
    # the device is no part of the recipe: another one resumes; another accumulation does not
    assert _train(demos, out, 3, "--device", "auto", "--grad-accum", "2") == 0
    assert json.loads((out / "divla_meta.json").read_text())["steps"] == 3
    assert _train(demos, out, 4, "--device", "cpu") == 2
    _one_line_error(capsys, "grad_accum differ")
    assert _train(demos, out, 4, "--device", "cuda:3", "--grad-accum", "2") == 2
    _one_line_error(capsys, "--device cuda:3")

    from divla_eval.policy import make_policy

    policy = make_policy("divla", str(out), device="cpu")
    assert policy.device == "cpu" and next(policy.model.parameters()).device.type == "cpu"


def test_the_resume_key_of_default_runs_is_unchanged(tmp_path):
    """Runs started before `device` and `grad_accum` existed must still resume."""
    from divla_eval.train import TrainConfig

    key = TrainConfig(
        policy="divla", demos=tmp_path / "d.hdf5", out=tmp_path / "o", device="cuda"
    ).resume_key()
    assert "device" not in key and "grad_accum" not in key
    assert (
        TrainConfig(policy="divla", demos=tmp_path / "d.hdf5", out=tmp_path, grad_accum=4).resume_key()[
            "grad_accum"
        ]
        == 4
    )


class _Toy(torch.nn.Module):
    """A linear map from proprioception to the action chunk: a loss with no randomness, so that two
    ways of computing the same gradient can be compared exactly."""

    def __init__(self, proprio_dim: int = 11, outputs: int = 8 * 7):
        super().__init__()
        self.cfg = None
        self.lin = torch.nn.Linear(proprio_dim, outputs)

    def forward(self, proprio, actions):
        return {"loss": torch.nn.functional.mse_loss(self.lin(proprio[:, -1]), actions.flatten(1))}


def _toy_recipe():
    from safetensors.torch import load_file, save_file

    from divla_eval.train import Recipe

    def save(model, path, meta):
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, f"{path}/w.st")

    def load(path):
        model = _Toy()
        model.load_state_dict(load_file(f"{path}/w.st"))
        return model

    return Recipe(
        build=lambda dataset, options: _Toy(),
        loss=lambda model, batch, generator: model(batch["proprio"], batch["actions"]),
        save=save,
        load=load,
        dataset_kwargs=lambda options: {"chunk": 8, "obs_horizon": 1, "cameras": ()},
    )


def toy_config(demos, out, **kw):
    """Registers the toy recipe (in this process) and returns a config for it."""
    import divla_eval.train as train_module
    from divla_eval.registry import Registry

    if "toy" not in train_module.RECIPES:
        recipes = Registry("trainable policy")
        recipes.register("toy", _toy_recipe())
        train_module.RECIPES = recipes
    base = dict(steps=3, batch_size=4, lr=0.05, warmup_steps=1, ema_decay=0.0, threads=1, device="cpu")
    return train_module.TrainConfig(policy="toy", demos=demos, out=out, log_every=1, **{**base, **kw})


def _weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{out}/w.st")


def test_two_accumulated_half_batches_make_the_step_of_one_whole_batch(demos, tmp_path, monkeypatch):
    import divla_eval.train as train_module

    monkeypatch.setattr(train_module, "RECIPES", train_module.RECIPES)  # restored after the test
    train_module.train(toy_config(demos, tmp_path / "whole"), progress=False)
    train_module.train(toy_config(demos, tmp_path / "halves", batch_size=2, grad_accum=2), progress=False)
    whole, halves = _weights(tmp_path / "whole"), _weights(tmp_path / "halves")
    for k in whole:
        torch.testing.assert_close(whole[k], halves[k], rtol=1e-5, atol=1e-6)
    rows = [
        [json.loads(x)["loss"] for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()]
        for d in ("whole", "halves")
    ]
    assert rows[0] == pytest.approx(rows[1], rel=1e-5)


def test_processes_share_each_batch_row_by_row(demos, tmp_path):
    """Under DDP every process loads rows rank, rank + world, ... of the batch one process would load."""
    from divla_eval.data.dataset import DemoDataset
    from divla_eval.train import TrainConfig, _batches

    cfg = TrainConfig(policy="divla", demos=demos, out=tmp_path, batch_size=4, seed=3)
    dataset = DemoDataset(demos, chunk=8, cameras=())
    try:
        whole = _batches(dataset, cfg, 5)
        shards = [_batches(dataset, cfg, 5, rank, 2) for rank in (0, 1)]
        for _ in range(3):
            one, (a, b) = next(whole)["actions"], (next(s)["actions"] for s in shards)
            assert torch.equal(one[0::2], a) and torch.equal(one[1::2], b)
    finally:
        dataset.close()


def test_make_policy_passes_the_device_only_to_loaders_that_take_one(monkeypatch, tmp_path):
    import divla_eval.policy as policy_module
    from divla_eval.policy import PolicyMetadata

    seen = {}

    class Plugin:
        metadata = PolicyMetadata(name="plugin")

        def reset(self, instruction, seed): ...

        def infer(self, obs): ...

        @classmethod
        def from_pretrained(cls, path, **options):  # a bare **kwargs: no device
            seen["options"] = options
            return cls()

    monkeypatch.setattr(policy_module, "policy_factory", lambda name: Plugin)
    monkeypatch.setattr(policy_module, "parse_policy_options", lambda name, options: dict(options))
    policy_module.make_policy("plugin", str(tmp_path), device="cpu")
    assert seen["options"] == {}


# --- DiVLA at scale: options for real backbones ------------------------------------------------------
def test_a_bf16_backbone_directory_loads_as_float32_and_trains(tmp_path):
    """Qwen2-VL-2B ships bf16 weights and transformers loads a checkpoint's dtype by default: the model
    must come out float32 (trainable, and the same dtype as the projectors) on the CPU too."""
    from test_divla import TEXTS, batch, tiny_config
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from divla_eval.divla.model import DiVLAModel
    from divla_eval.divla.tokenizer import build_tokenizer

    tok = build_tokenizer(TEXTS, 300)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok),
            num_key_value_heads=1,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
            **text,
        )
    ).to(torch.bfloat16).save_pretrained(tmp_path / "qwen2")
    SiglipVisionModel(SiglipVisionConfig(image_size=28, patch_size=14, **text)).to(
        torch.bfloat16
    ).save_pretrained(tmp_path / "siglip")
    cfg = tiny_config(
        vision_pretrained=str(tmp_path / "siglip"),
        vlm_pretrained=str(tmp_path / "qwen2"),
        freeze_vision=True,
        lora_rank=2,
        lora_alpha=8,
        lora_targets=["q_proj", "v_proj", "up_proj"],
    )
    model = DiVLAModel(cfg, tok)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    lora = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("decoder.")}
    assert lora and all("lora_" in n for n in lora)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj", "up_proj"}
    assert model.decoder.peft_config["default"].lora_alpha == 8
    model(**batch())["loss"].backward()


def test_gradient_checkpointing_changes_no_number():
    from test_divla import batch, tiny_model

    grads = []
    for checkpointing in (False, True):
        model = tiny_model(gradient_checkpointing=checkpointing).train()
        active = any(getattr(m, "gradient_checkpointing", False) for m in model.decoder.modules())
        assert active == checkpointing
        torch.manual_seed(1)
        loss = model(**batch())["loss"]
        loss.backward()
        grads.append((loss.detach(), model.decoder.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("name", ["divla", "diffusion_policy", "openvla", "octo"])
def test_every_recipe_trains_under_bf16_autocast(demos, name):
    """What CUDA training runs (accelerate's bf16 autocast), here on the CPU: mixed dtypes must meet
    without an error and the loss must come out float32 and finite."""
    from test_diffusion_policy import TINY as DP
    from test_octo import TINY as OCTO
    from test_openvla import TINY as OPENVLA

    from divla_eval.data.dataset import DemoDataset, collate
    from divla_eval.train import RECIPES

    options = {"divla": TINY, "diffusion_policy": DP, "openvla": OPENVLA, "octo": OCTO}[name]
    recipe = RECIPES.get(name)
    dataset = DemoDataset(demos, **recipe.dataset_kwargs(dict(options)))
    try:
        model = recipe.build(dataset, dict(options)).train()
        batch = collate([dataset[i] for i in range(3)])
    finally:
        dataset.close()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = recipe.loss(model, batch, torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.slow
def test_two_cpu_processes_under_torchrun_train_like_one(demos, tmp_path):
    """The multi-GPU path (DDP through accelerate) on two CPU processes with gloo: each process
    takes half of every batch and DDP averages the gradients, so the weights equal a one-process
    run's on the whole batches. `accelerate launch --multi_gpu` starts processes the same way."""
    import divla_eval.train as train_module

    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_device import toy_config\n"
        "import divla_eval.train as t\n"
        f"s = t.train(toy_config({str(demos)!r}, {str(tmp_path / 'ddp')!r}), progress=False)\n"
        "print('main' if s['main_process'] else 'other', s['steps'])\n"
    )
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent), "HOME": str(tmp_path)}
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.split()) == ["3", "3", "main", "other"]
    original = train_module.RECIPES
    try:
        train_module.train(toy_config(demos, tmp_path / "one"), progress=False)
    finally:
        train_module.RECIPES = original
    one, ddp = _weights(tmp_path / "one"), _weights(tmp_path / "ddp")
    for k in one:
        torch.testing.assert_close(one[k], ddp[k], rtol=1e-5, atol=1e-6)
    meta_rows = (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()
    assert len(meta_rows) == 3  # one writer


class _PluginOnDevice:
    """A plugin that builds its model from options alone (no checkpoint) on the device it is given."""

    def __init__(self, action_dim=7, device="cpu"):
        self.metadata = PolicyMetadata(name="plugin")

    def reset(self, instruction, seed):
        pass

    def infer(self, obs):
        return ActionChunk(np.zeros((1, 7)))


@pytest.mark.parametrize(
    "policy, share",
    [("random", None), ("scripted", None), ("test_device:_PluginOnDevice", "auto")],
)
def test_a_ray_actor_reserves_a_gpu_share_when_its_policy_computes_on_cuda(
    policy, share, tmp_path, monkeypatch, capsys
):
    """What the policy declares decides (`uses_device = False`: no model in the actor), not whether a
    checkpoint was given: a plugin built from options gets its GPU share too."""
    import divla_eval.backends as backends
    from divla_eval.cli import main
    from divla_eval.policy import computes_on_device, policy_factory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    asked = {}

    def get_backend(name, **kwargs):
        asked.update(kwargs)
        raise DivlaEvalError("stopped by the test before any actor starts")

    monkeypatch.setattr(backends, "get_backend", get_backend)
    argv = ["run", "--task", "multitask", "--split", "flip_pot", "--policy", policy, "--episodes", "1"]
    assert main([*argv, "--device", "cuda", "--backend", "ray", "--out", str(tmp_path / "r")]) == 2
    assert "stopped by the test" in capsys.readouterr().err
    assert asked["gpus_per_actor"] == share
    for name in ("remote", "vla_eval_remote"):  # their model runs on their server
        assert not computes_on_device(policy_factory(name))
    assert computes_on_device(policy_factory("divla"))
