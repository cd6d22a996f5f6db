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
    `from_pretrained(dir, **options)`). A learned policy's class declares the inference options its
    `from_pretrained` takes (`divla-eval run --policy-option KEY=VALUE`) as `INFERENCE_OPTIONS`, a
    dict of option name -> type; a factory without one takes none. A factory without `from_pretrained`
    that declares options gets them as keywords: `factory(action_dim=..., **options)`.

    Factories from other packages are called the same way: `--policy package.module:factory`, or a
    name that an installed distribution declares in the `divla_eval.policies` entry-point group."""

    metadata: PolicyMetadata

    def reset(self, instruction: str, seed: int) -> None: ...

    def infer(self, obs: Observation) -> ActionChunk: ...

    # A policy with metadata.obs_horizon > 1 also has `observe(obs) -> None`: an observation between
    # calls, to remember (no action is asked for).


class RandomPolicy:
    """Uniform random actions in the controller's [-1, 1] box: the lower bound."""

    INFERENCE_OPTIONS: dict[str, type] = {}  # no checkpoint, no inference options

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
    return dict(getattr(policy_factory(name), "INFERENCE_OPTIONS", None) or {})


_BOOL_TEXT = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_policy_options(name: str, options: dict) -> dict:
    """Check option names against the policy's `INFERENCE_OPTIONS` and convert text values (from the
    command line) to the declared type. Ranges are the checkpoint's business (see
    `divla_eval.checkpoint.check_inference_options`)."""
    valid = inference_options(name)
    converted = {}
    for key, value in options.items():
        if key not in valid:
            if not valid:
                why = "it has no inference options"
                if not hasattr(POLICIES.get(name), "from_pretrained"):
                    why = "it loads no checkpoint and declares no INFERENCE_OPTIONS"
                raise DivlaEvalError(
                    f"policy {name!r} takes no --policy-option ({why}; valid: none); got {key}={value}"
                )
            raise DivlaEvalError(
                f"unknown policy option {key!r} for {name}; valid: {', '.join(sorted(valid))}"
            )
        kind = valid[key]
        if isinstance(value, str):
            text = value.strip()
            if kind is bool and text.lower() in _BOOL_TEXT:
                converted[key] = _BOOL_TEXT[text.lower()]
                continue
            try:
                if kind is not bool:
                    converted[key] = kind(text)
                    continue
            except ValueError:
                pass
        elif isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
            converted[key] = value
            continue
        raise DivlaEvalError(f"policy option {key}={value!r} for {name}: expected {kind.__name__}")
    return converted


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
        load = factory.from_pretrained
        placed = {"device": device} if device is not None and _takes_device(load) else {}
        return check_policy(load(checkpoint, **options, **placed), built)
    if hasattr(factory, "from_options"):  # built from its options alone (remote: the server's URL)
        return check_policy(factory.from_options(action_dim=action_dim, **options), built)
    if options and hasattr(factory, "from_pretrained"):
        raise DivlaEvalError(f"policy {name!r}: inference options need a --checkpoint to load; got {options}")
    return check_policy(factory(action_dim=action_dim, **options), built)
