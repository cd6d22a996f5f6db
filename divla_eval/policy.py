"""The Policy protocol, the two reference policies (scripted expert, random) and the policy registry.

A policy sees an `Observation` (camera images, proprioception, instruction, embodiment) and returns an
`ActionChunk` of H actions plus optional reasoning text. How many of those actions are executed before
the next call is the runner's business (`execute_steps`), identical for every policy.

The scripted expert is the one declared exception to "a policy never sees simulator state": it is a
privileged upper bound, bound to the live episode by the runner through `bind`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from divla_eval.errors import DivlaEvalError
from divla_eval.registry import Registry


@dataclass
class Observation:
    images: dict[str, np.ndarray]
    """Camera name -> uint8 HxWx3 image (upright). Empty for policies that declare no cameras."""
    proprio: np.ndarray
    instruction: str
    embodiment: str = "panda"
    expert_reasoning: str | None = None
    """The scripted expert's phrase for this state. Filled in only for a policy whose metadata asks
    for it (`oracle_reasoning`): a diagnostic that separates wrong reasoning from wrong motion, never
    a benchmark setting, since it hands the policy privileged knowledge."""


@dataclass
class ActionChunk:
    actions: np.ndarray
    """[H, action_dim] actions; the runner executes the first `execute_steps` of them."""
    reasoning: str | None = None


@dataclass(frozen=True)
class PolicyMetadata:
    name: str
    cameras: tuple[str, ...] = ()
    """Cameras this policy reads; none means the runner renders nothing for it."""
    execute_steps: int = 1
    """Actions executed from each chunk before the next call (replanning period)."""
    checkpoint_hash: str | None = None
    privileged: bool = False
    reasoning: bool = False
    """The policy writes reasoning text; the runner then scores it against the expert's phrase."""
    oracle_reasoning: bool = False
    """The policy conditions on the expert's phrase (`Observation.expert_reasoning`) instead of its own."""
    obs_horizon: int = 1
    """Consecutive environment steps the policy conditions on (Diffusion Policy: 2). Calls are
    `execute_steps` apart, so for > 1 the runner also hands the policy the observations of the
    `obs_horizon - 1` steps before each call through `observe(obs)`; the policy keeps the history."""
    info: dict = field(default_factory=dict)
    """Where the actions come from, beyond name and checkpoint (a remote policy: the server's URL and
    metadata, and whether its sampling is seeded per episode); written into every episode record."""


@runtime_checkable
class Policy(Protocol):
    """A registered policy factory is called as `factory(action_dim=...)` (or
    `from_pretrained(dir, **options)`: `LoadsCheckpoint`; or `from_options(**options)`:
    `BuiltFromOptions`). A factory declares the inference options it takes (`divla-eval run
    --policy-option KEY=VALUE`) as `INFERENCE_OPTIONS` (`Configurable`), a dict of option name -> type;
    a factory without one takes none. A factory that loads no checkpoint gets its options as keywords:
    `factory(action_dim=..., **options)`. The learned policies share one base for all of this,
    `divla_eval.learned.LearnedPolicy`; what else a policy can do is a protocol below (`HistoryPolicy`,
    `PrivilegedPolicy`, ...).

    Factories from other packages are called the same way: `--policy package.module:factory`, or a
    name that an installed distribution declares in the `divla_eval.policies` entry-point group."""

    metadata: PolicyMetadata

    def reset(self, instruction: str, seed: int) -> None: ...

    def infer(self, obs: Observation) -> ActionChunk: ...

    # A policy with metadata.obs_horizon > 1 is also a `HistoryPolicy`: the runner hands it the
    # observations between calls through `observe(obs)`.


# --- optional abilities: each a small protocol that the runner, the server and the bench check by type
# (`isinstance(policy, HistoryPolicy)`), never by probing for a member. The learned policies get theirs
# from `divla_eval.learned.LearnedPolicy`; a plugin's policy needs only the methods, no base class.
@runtime_checkable
class PrivilegedPolicy(Protocol):
    """Reads simulator state (the scripted expert): the runner binds it to the live episode at each
    reset. The one declared exception to "a policy sees only observations"; its metadata must say
    `privileged=True` (checked by `check_policy`), and it can never be served."""

    def bind(self, env, episode) -> None: ...


@runtime_checkable
class HistoryPolicy(Protocol):
    """Conditions on `metadata.obs_horizon` > 1 consecutive steps: between calls the runner hands it
    the steps it needs through `observe`, and it keeps the history itself."""

    def observe(self, obs: Observation) -> None: ...


@runtime_checkable
class BatchedPolicy(Protocol):
    """Infers for several sessions of one model in one forward pass (the policy server's batching);
    each session's actions must not depend on who it was batched with."""

    @staticmethod
    def infer_batch(policies: list, observations: list[Observation]) -> list[ActionChunk]: ...


@runtime_checkable
class TimedPolicy(Protocol):
    """Names the settings `divla-eval bench` times it under: label -> attribute values (see
    `divla_eval.timing.variants`)."""

    timing_variants: dict[str, dict] | None


@runtime_checkable
class ForkablePolicy(Protocol):
    """Makes its own per-session copy for the policy server (otherwise a deep copy that shares every
    torch module is made: `divla_eval.remote.server.fork_policy`)."""

    def fork(self): ...


@runtime_checkable
class ClosablePolicy(Protocol):
    """Holds a resource to release when a worker is done (a remote policy's connection)."""

    def close(self) -> None: ...


# --- what a registered factory (usually the policy's class) can do beyond `factory(action_dim=...)` -----
@runtime_checkable
class Configurable(Protocol):
    """Declares the inference options it takes (`--policy-option KEY=VALUE`): name -> type. A factory
    without them takes none."""

    INFERENCE_OPTIONS: dict[str, type]


@runtime_checkable
class LoadsCheckpoint(Protocol):
    """Built from a checkpoint directory (`--checkpoint DIR`): `from_pretrained(path, **options)`."""

    def from_pretrained(self, path, **options) -> Policy: ...


@runtime_checkable
class RequiresCheckpoint(LoadsCheckpoint, Protocol):
    """A `LoadsCheckpoint` that says whether it can be built without one (`factory(action_dim=...)`):
    `requires_checkpoint = True` for every `LearnedPolicy` (see `requires_checkpoint`)."""

    requires_checkpoint: bool


def computes_on_device(factory) -> bool:
    """Whether a policy runs a model in the process that evaluates it, on `--device` (so a Ray actor on
    CUDA reserves a share of a GPU for it). A factory says no with `uses_device = False` (random,
    scripted: no model; remote, vla_eval_remote: the model runs on its server); any other, a plugin's
    included, is taken to compute where it is asked to."""
    return bool(getattr(factory, "uses_device", True))


def requires_checkpoint(factory) -> bool:
    """Whether a policy factory cannot be built without a checkpoint (a learned policy's class)."""
    return isinstance(factory, RequiresCheckpoint) and bool(factory.requires_checkpoint)


@runtime_checkable
class ChecksCheckpoint(Protocol):
    """Looks at a checkpoint directory cheaply (no torch, nothing built) before a run starts: its files
    and the robot it was made for (returns its config dict), and the ranges of the inference options
    against that config. Every `LearnedPolicy` is one."""

    def check_checkpoint(self, path, embodiment: str | None = None, proprio_dim: int | None = None) -> dict:
        """Returns the checkpoint's config dict."""

    def check_inference_options(self, options: dict, config) -> None: ...


@runtime_checkable
class BuiltFromOptions(Protocol):
    """Built from its options alone, with no checkpoint (remote: the server's URL): `check_options`
    before anything connects, `describe` for the manifest's `policy_info`."""

    def from_options(self, action_dim: int | None = None, **options) -> Policy: ...

    def check_options(self, options: dict) -> None: ...

    def describe(self, **options) -> dict: ...


class RandomPolicy:
    """Uniform random actions in the controller's [-1, 1] box: the lower bound."""

    INFERENCE_OPTIONS: dict[str, type] = {}  # no checkpoint, no inference options
    uses_device = False  # no model (`computes_on_device`)

    def __init__(self, action_dim: int = 7, chunk: int = 1):
        self.action_dim = action_dim
        self.chunk = chunk
        self.metadata = PolicyMetadata(name="random", execute_steps=chunk)
        self._rng = np.random.default_rng(0)

    def reset(self, instruction: str, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def infer(self, obs: Observation) -> ActionChunk:
        return ActionChunk(actions=self._rng.uniform(-1.0, 1.0, size=(self.chunk, self.action_dim)))


class ScriptedPolicy:
    """The task's privileged scripted expert, behind the Policy protocol: the upper bound."""

    metadata = PolicyMetadata(name="scripted", execute_steps=1, privileged=True)
    INFERENCE_OPTIONS: dict[str, type] = {}  # no checkpoint, no inference options
    uses_device = False  # no model (`computes_on_device`)

    def __init__(self, action_dim: int = 7):
        self._env = None
        self._episode = None

    def bind(self, env, episode) -> None:
        """Give the expert the live simulator and task episode (the runner does this at each reset)."""
        self._env, self._episode = env, episode

    def reset(self, instruction: str, seed: int) -> None:
        pass

    def infer(self, obs: Observation) -> ActionChunk:
        if self._episode is None:
            raise RuntimeError("ScriptedPolicy.infer called before bind(env, episode)")
        out = self._episode.expert(self._env)
        return ActionChunk(actions=out.action[None, :], reasoning=out.reasoning)


class ObservationHistory:
    """The last `cfg.obs_horizon` observations of a policy conditioned on several consecutive steps
    (Diffusion Policy, Octo), checked against what its checkpoint was trained on.

    At an episode's first call the one observation is repeated, as training samples repeat a demo's
    first frame. `cfg` needs embodiment, cameras, image_size and obs_horizon."""

    def __init__(self, label: str, cfg):
        from collections import deque

        self.label, self.cfg = label, cfg
        self._steps: deque[tuple[dict[str, np.ndarray], np.ndarray]] = deque(maxlen=cfg.obs_horizon)

    def clear(self) -> None:
        self._steps.clear()

    def add(self, obs: Observation) -> None:
        """Remember an observation (copied: a caller may reuse its arrays)."""
        from divla_eval.checkpoint import CheckpointError

        cfg = self.cfg
        if obs.embodiment != cfg.embodiment:
            raise CheckpointError(
                f"this {self.label} was trained for {cfg.embodiment!r}, not {obs.embodiment!r}"
            )
        for c in cfg.cameras:
            if obs.images[c].shape != (cfg.image_size, cfg.image_size, 3):
                raise DivlaEvalError(
                    f"{self.label} was trained on {cfg.image_size} px images, got {c} images of shape "
                    f"{obs.images[c].shape}: run with --image-size {cfg.image_size}"
                )
        images = {c: np.array(obs.images[c], dtype=np.uint8) for c in cfg.cameras}
        self._steps.append((images, np.array(obs.proprio, dtype=np.float32)))

    def tensors(self):
        """(camera -> float [1, T, 3, H, W] in [0, 1], proprio [1, T, P]), oldest step first."""
        import torch

        steps = list(self._steps)
        steps = [steps[0]] * (self.cfg.obs_horizon - len(steps)) + steps
        images = {
            c: torch.from_numpy(np.stack([s[0][c] for s in steps])).permute(0, 3, 1, 2)[None].float().div(255)
            for c in self.cfg.cameras
        }
        return images, torch.from_numpy(np.stack([s[1] for s in steps]))[None]


TORCH_THREADS_ENV = "DIVLA_EVAL_TORCH_THREADS"
"""Set by the runner for its worker processes: each one's share of the cores for torch."""


def use_torch_thread_share() -> None:
    """A learned policy calls this when built: in a runner worker, torch takes only that worker's
    share of the cores (otherwise every worker would start a thread per core and they would fight)."""
    import torch

    threads = int(os.environ.get(TORCH_THREADS_ENV, "0"))
    if threads > 0:
        torch.set_num_threads(threads)


PLUGIN_GROUP = "divla_eval.policies"
"""The entry-point group through which an installed package names its policies (`divla-eval list
policies` shows them with the package)."""

POLICIES: Registry = Registry("policy", entry_point_group=PLUGIN_GROUP, import_paths=True)
POLICIES.register("scripted", ScriptedPolicy, description="privileged scripted expert (upper bound)")
POLICIES.register("random", RandomPolicy, description="uniform random actions (lower bound)")
POLICIES.register(
    "divla",
    "divla_eval.divla.policy:DiVLAPolicy",
    description="DiVLA: VLM reasoning + FiLM-injected diffusion action head (needs --checkpoint)",
)
POLICIES.register(
    "diffusion_policy",
    "divla_eval.baselines.diffusion_policy.policy:DiffusionPolicy",
    description="Diffusion Policy baseline (Chi et al. 2023), no language (needs --checkpoint)",
)
POLICIES.register(
    "openvla",
    "divla_eval.baselines.openvla.policy:OpenVLAPolicy",
    description="OpenVLA baseline (Kim et al. 2024): 256-bin action tokens (needs --checkpoint)",
)
POLICIES.register(
    "remote",
    "divla_eval.remote.client:RemotePolicy",
    description="a policy served over openpi's websocket protocol (--policy-option url=ws://HOST:PORT)",
)
POLICIES.register(
    "vla_eval_remote",
    "divla_eval.remote.vla_eval_client:VlaEvalRemotePolicy",
    description="a policy behind a vla-eval model server (--policy-option url=ws://HOST:PORT)",
)
POLICIES.register(
    "octo",
    "divla_eval.baselines.octo.policy:OctoPolicy",
    description="Octo baseline (2024): MiniLM + patch tokens, readout -> diffusion head (needs --checkpoint)",
)


REFERENCE_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
"""Reference checkpoints shipped in the repository: checkpoints/divla-<task>/."""


def default_policy(task: str) -> tuple[str, str | None, str]:
    """(policy, checkpoint, note) that `divla-eval run` uses when --policy is not given: the shipped
    DiVLA reference checkpoint for the task when there is one (and torch is installed), otherwise the
    scripted expert. The note says which, on stderr."""
    import importlib.util

    ref = REFERENCE_DIR / f"divla-{task}"
    if (ref / "model.safetensors").is_file():
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            return (
                "scripted",
                None,
                (
                    f"note: {ref} needs torch and transformers (bash scripts/setup.sh installs them); "
                    "evaluating the scripted expert instead (--policy scripted)"
                ),
            )
        return (
            "divla",
            str(ref),
            (f"note: evaluating the reference DiVLA checkpoint {ref} (--policy scripted for the expert)"),
        )
    return (
        "scripted",
        None,
        (
            f"note: no reference DiVLA checkpoint ships for {task} yet; evaluating the scripted expert "
            "(--policy scripted)"
        ),
    )


_PROTOCOL = (
    "a policy has reset(instruction, seed), infer(observation) -> ActionChunk and a PolicyMetadata "
    "`metadata` (see divla_eval.policy.Policy)"
)


def check_policy(policy, source: str):
    """Return `policy` if it follows the Policy protocol, else raise one line saying what it lacks.
    Checked where a policy object enters (a factory's result, an object given to `evaluate`) so that a
    wrong object fails before any episode, not as an error in every episode's record."""
    problems = [f"no {m}()" for m in ("reset", "infer") if not callable(getattr(policy, m, None))]
    metadata = getattr(policy, "metadata", None)
    if metadata is None:
        problems.append("no metadata")
    elif not isinstance(metadata, PolicyMetadata):
        problems.append(f"its metadata is a {type(metadata).__name__}, not a PolicyMetadata")
    else:  # an ability its metadata declares must be there, and simulator access must be declared
        if metadata.obs_horizon > 1 and not isinstance(policy, HistoryPolicy):
            problems.append(f"obs_horizon {metadata.obs_horizon} but no observe(observation)")
        if metadata.privileged != isinstance(policy, PrivilegedPolicy):
            problems.append(
                "privileged but no bind(env, episode)"
                if metadata.privileged
                else "bind(env, episode) but its metadata does not declare privileged=True"
            )
    if problems:
        raise DivlaEvalError(
            f"{source} is not a policy ({type(policy).__name__}: {', '.join(problems)}); {_PROTOCOL}"
        )
    return policy


def policy_factory(name: str):
    """The factory behind a policy name: a built-in, a `divla_eval.policies` entry point or a
    'package.module:factory' import path. Checked as far as it can be without building anything: it
    must be callable, and a class must have `reset` and `infer` (a function's result is checked by
    `make_policy`)."""
    factory = POLICIES.get(name)
    if not callable(factory):
        instance = callable(getattr(factory, "infer", None))
        raise DivlaEvalError(
            f"policy {name!r} is an object of type {type(factory).__name__}, not a factory (a class, or a "
            "function that returns a policy)" + ("; name its class, not an instance" if instance else "")
        )
    if isinstance(factory, type):
        missing = [m for m in ("reset", "infer") if not callable(getattr(factory, m, None))]
        if missing:
            raise DivlaEvalError(
                f"policy {name!r}: class {factory.__name__} has no {' or '.join(missing)}(); {_PROTOCOL}"
            )
    return factory


def _takes_device(fn) -> bool:
    """Whether a callable names a `device` parameter (a bare **kwargs does not count: it may pass
    everything on to something that takes no device)."""
    import inspect

    try:
        return "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a readable signature
        return False


def inference_options(name: str) -> dict[str, type]:
    """The inference options a registered policy accepts (`--policy-option KEY=VALUE`): name -> type."""
    factory = policy_factory(name)
    return dict(factory.INFERENCE_OPTIONS or {}) if isinstance(factory, Configurable) else {}


def parse_policy_options(name: str, options: dict) -> dict:
    """Check option names against the policy's `INFERENCE_OPTIONS` and convert text values (from the
    command line) to the declared type, with the parser every kind of option shares
    (`divla_eval.options`). Ranges are the checkpoint's business (see
    `divla_eval.checkpoint.check_inference_options`)."""
    from divla_eval.options import parse_options

    valid = inference_options(name)
    if options and not valid:
        key, value = next(iter(options.items()))
        why = "it has no inference options"
        if not hasattr(POLICIES.get(name), "from_pretrained"):
            why = "it loads no checkpoint and declares no INFERENCE_OPTIONS"
        raise DivlaEvalError(
            f"policy {name!r} takes no --policy-option ({why}; valid: none); got {key}={value}"
        )
    return parse_options(options, valid, kind="policy", owner=name)


def make_policy(
    name: str,
    checkpoint: str | None = None,
    action_dim: int = 7,
    options: dict | None = None,
    device: str | None = None,
) -> Policy:
    """Build a registered policy (validated first by `runner.validate`) for an action space; `options`
    are its inference options (`INFERENCE_OPTIONS`), passed to `from_pretrained(checkpoint, **options)`,
    or to the factory itself when it loads no checkpoint. The result is checked against the protocol.
    `device` (a resolved torch device, `divla_eval.device`) goes to a `from_pretrained` that names a
    `device` parameter; policies without one (random, scripted, most plugins) run where they run."""
    factory = policy_factory(name)
    options = parse_policy_options(name, options or {})
    built = f"what policy {name!r} built"
    if checkpoint is not None:
        load = factory.from_pretrained  # a LoadsCheckpoint (runner.validate refuses a checkpoint otherwise)
        placed = {"device": device} if device is not None and _takes_device(load) else {}
        return check_policy(load(checkpoint, **options, **placed), built)
    if isinstance(factory, BuiltFromOptions):  # remote: built from the server's URL
        return check_policy(factory.from_options(action_dim=action_dim, **options), built)
    if options and isinstance(factory, LoadsCheckpoint):
        raise DivlaEvalError(f"policy {name!r}: inference options need a --checkpoint to load; got {options}")
    return check_policy(factory(action_dim=action_dim, **options), built)
