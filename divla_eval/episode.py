"""One episode of one policy in one env: what happens between `env.reset` and the outcome record.

`run_episode` composes four small jobs, each its own object so that each reads on its own:
- `ChunkExecutor`: the one chunk-execution rule for every policy (call it, run the first
  `execute_steps` actions of its chunk, call again), with the latency of every call;
- `ReasoningTrace`: the policy's reasoning text, scored against the scripted expert run in the shadow;
- `HistoryFeed`: the observations of the steps just before a call, for policies conditioned on several;
- `VideoRecorder`: optional captioned frames of the front camera.

The result is an `EpisodeOutcome`, the same dataclass on the success and the error path, so a record's
fields never depend on how its episode ended.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from divla_eval.errors import raise_if_interrupted
from divla_eval.reasoning import reasoning_scores


@dataclass
class EpisodeOutcome:
    """What a finished (or failed) episode adds to its record beyond the run's and the plan's fields.

    An `error` outcome has the same fields, with the failure values: counted as a failure, never
    dropped (see `failed`)."""

    success: bool = False
    partial_score: float = 0.0
    failure_mode: str | None = None
    steps: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    reasoning_trace: list[dict] = field(default_factory=list)
    reasoning_accuracy: float | None = None
    reasoning_scores: dict[str, float] | None = None
    object_ids: list[str] = field(default_factory=list)
    instruction: str = ""
    perturbations: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    wall_time_s: float = 0.0
    checkpoint_hash: str | None = None
    policy_info: dict = field(default_factory=dict)

    @classmethod
    def failed(cls, env, spec, error: str) -> EpisodeOutcome:
        """The outcome of an episode that raised: what is known of it (its objects, instruction and
        perturbation parameters when the scene was built) and the traceback."""
        episode = env.episode if env.episode is not None and env.episode.spec == spec else None
        return cls(
            failure_mode="error",
            steps=env.steps if episode is not None else 0,
            object_ids=list(episode.object_ids) if episode is not None else [],
            instruction=episode.instruction if episode is not None else "",
            perturbations=env.perturbation_params_of(spec),
            status="error",
            error=error,
        )

    def fields(self) -> dict:
        """The outcome as the keyword arguments of an `EpisodeRecord`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def latency_stats(latencies: list[float]) -> dict[str, float]:
    """Milliseconds per policy call: n, mean, median and 95th percentile (empty when never called)."""
    if not latencies:
        return {}
    arr = np.array(latencies) * 1000.0
    return {
        "n": len(arr),
        "mean": float(arr.mean()),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
    }


class ChunkExecutor:
    """Runs a policy's action chunks: a call, then its first `execute_steps` actions, then a call.

    The same for every policy (built-in, plugin or remote), so a policy cannot gain by how its chunks
    are executed; each call is timed here, around `infer` only."""

    def __init__(self, policy, embodiment: str):
        self.policy, self.embodiment = policy, embodiment
        self.cameras = tuple(policy.metadata.cameras)
        self.execute_steps = max(1, policy.metadata.execute_steps)
        self.chunk = None
        self.index = 0
        self.latencies: list[float] = []

    def observation(self, env, expert_reasoning: str | None = None):
        from divla_eval.policy import Observation

        obs = env.observe(cameras=self.cameras)
        images = {c: obs[c] for c in self.cameras}
        return Observation(images, obs["proprio"], obs["instruction"], self.embodiment, expert_reasoning)

    @property
    def due(self) -> bool:
        """Whether the next action needs a new chunk (the first step, or this one is used up)."""
        return self.chunk is None or self.index >= self._executed

    @property
    def _executed(self) -> int:
        """How many actions of the current chunk are executed (a chunk may be shorter than k)."""
        return min(self.execute_steps, len(self.chunk.actions))

    @property
    def left(self) -> int:
        """Actions of the current chunk still to be executed before the next call."""
        return self._executed - self.index

    def call(self, env, expert_reasoning: str | None = None):
        """Observe, call the policy, keep its chunk; returns the chunk."""
        obs = self.observation(env, expert_reasoning)
        t0 = time.perf_counter()
        self.chunk = self.policy.infer(obs)
        self.latencies.append(time.perf_counter() - t0)
        self.index = 0
        return self.chunk

    def next_action(self) -> np.ndarray:
        action = self.chunk.actions[self.index]
        self.index += 1
        return action


class ReasoningTrace:
    """The policy's reasoning phrases, each with the scripted expert's phrase for the same state.

    A learned policy's reasoning is scored against the scripted expert's phrase for the same state.
    The expert runs in the shadow every step (its phase timers count steps), its actions discarded.
    A learned policy's text is kept for every call (it is what gets scored); the expert's own, called
    every step, only when its phrase changes."""

    def __init__(self, policy, episode):
        meta = policy.metadata
        self.episode = episode
        self.shadow = meta.reasoning and not meta.privileged
        self.privileged = meta.privileged
        self.oracle = meta.oracle_reasoning
        self.expert_text: str | None = None
        self.entries: list[dict] = []

    def before_step(self, env) -> None:
        if self.shadow:
            self.expert_text = self._shadow_phrase(env)

    def _shadow_phrase(self, env) -> str | None:
        """The expert's phrase for the current state, or None when the task has no expert or it fails
        (scoring must never end an episode)."""
        try:
            return self.episode.expert(env.sim).reasoning
        except Exception as exc:
            raise_if_interrupted(exc)
            return None

    @property
    def oracle_text(self) -> str | None:
        """What an oracle-reasoning policy is handed with its observation (a diagnostic)."""
        return self.expert_text if self.oracle else None

    def add(self, step: int, text: str | None) -> None:
        changed = not self.entries or self.entries[-1]["text"] != text
        if text is not None and (changed or not self.privileged):
            entry = {"step": step, "text": text}
            if self.expert_text is not None:
                entry["expert"] = self.expert_text
            self.entries.append(entry)

    @property
    def last_text(self) -> str:
        return self.entries[-1]["text"] if self.entries else ""


class HistoryFeed:
    """For a policy conditioned on several consecutive steps (as it was trained): hands it the
    observations of the steps just before its next call, not only those of the calls
    `execute_steps` apart."""

    def __init__(self, policy):
        from divla_eval.policy import HistoryPolicy

        self.policy = policy
        self.horizon = max(1, policy.metadata.obs_horizon) if isinstance(policy, HistoryPolicy) else 1

    def after_step(self, executor: ChunkExecutor, env, done: bool) -> None:
        if self.horizon > 1 and not done and 0 < executor.left < self.horizon:
            self.policy.observe(executor.observation(env))


VIDEO_WIDTH = 320
VIDEO_CODEC = "libx264"  # H.264 (High profile), yuv420p, in MP4: what every browser's <video> plays


def video_name(episode_key: str) -> str:
    """The file name of an episode's video (under the run's ``videos/``), from its episode key:
    task, difficulty when there is one, split, perturbations when there are any, episode index, e.g.
    ``multitask/flip_pot/-/none/00003`` -> ``multitask-flip_pot-ep00003.mp4`` and
    ``sorting/unseen/hard/lighting:3+distractors:1/00012`` ->
    ``sorting-hard-unseen-lighting3+distractors1-ep00012.mp4`` (the order of a run directory's name).
    A key of another shape (older or foreign records) is kept whole, made safe for a file name."""
    parts = episode_key.split("/")
    if len(parts) == 5:
        task, split, difficulty, perturbation, index = parts
        words = [task, *([difficulty] if difficulty not in ("-", "") else []), split]
        if perturbation not in ("none", ""):
            words.append(perturbation.replace(":", ""))
        name = "-".join(words) + f"-ep{index}"
    else:
        name = episode_key.replace("/", "-")
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name) + ".mp4"


def legacy_video_name(episode_key: str) -> str:
    """The name videos had before `video_name` (MPEG-4 Part 2, which browsers do not play)."""
    return episode_key.replace("/", "__") + ".mp4"


class VideoRecorder:
    """The front camera after every step, scaled up, with the current reasoning phrase under it.

    Written as H.264 in MP4 (yuv420p, even width and height, the index at the front of the file)
    through PyAV, so that a browser plays it in the HTML report."""

    def __init__(self, path: Path | None, fps: int = 20):
        self.path, self.fps = path, fps
        self.frames: list[np.ndarray] = []

    def add(self, env, caption: str) -> None:
        if self.path is not None:
            self.frames.append(captioned(env.camera_image("front"), caption))

    def write(self) -> None:
        if self.path is None or not self.frames:
            return
        from divla_eval.safe_io import atomic_output

        with atomic_output(self.path, f"the video {self.path}") as tmp:
            write_video(tmp, self.frames, self.fps)


def write_video(path: Path, frames: list[np.ndarray], fps: int = 20) -> None:
    """Encode RGB uint8 frames (all of one size) as H.264 MP4. An odd width or height is padded by
    one edge pixel: yuv420p, the pixel format browsers decode, halves both in its chroma planes."""
    import av

    h, w = frames[0].shape[:2]
    pad = ((0, h % 2), (0, w % 2), (0, 0))
    # one encoder thread, as torch gets one per worker: episodes in parallel, not threads in each
    options = {"crf": "23", "preset": "veryfast", "threads": "1"}
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps, options=options)
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            image = np.pad(frame, pad, mode="edge") if (h % 2 or w % 2) else frame
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), "rgb24")))
        container.mux(stream.encode())  # flush the frames the encoder still holds


def captioned(frame: np.ndarray, text: str) -> np.ndarray:
    """The frame scaled up to VIDEO_WIDTH (nearest neighbour: policy images are tiny) with the current
    reasoning phrase written in a strip under it."""
    import cv2

    h, w = frame.shape[:2]
    scale = max(1, VIDEO_WIDTH // w)
    big = cv2.resize(frame, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    strip = np.full((24, big.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(strip, text[:60], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([big, strip], axis=0)


def run_episode(env, spec, policy, video_path: Path | None = None) -> EpisodeOutcome:
    """Run one episode; returns its outcome (no I/O but the optional video)."""
    from divla_eval.policy import PrivilegedPolicy

    env.reset(options={"episode": spec})
    episode = env.episode
    policy.reset(episode.instruction, spec.seed("policy"))
    if isinstance(policy, PrivilegedPolicy):  # the scripted expert (`check_policy`: it says privileged)
        policy.bind(env.sim, episode)
    executor = ChunkExecutor(policy, env.embodiment)
    trace = ReasoningTrace(policy, episode)
    history = HistoryFeed(policy)
    video = VideoRecorder(video_path)
    step = None
    while step is None or not step.done:
        trace.before_step(env)
        if executor.due:
            chunk = executor.call(env, trace.oracle_text)
            trace.add(env.steps, chunk.reasoning)
        step = env.advance(executor.next_action())
        history.after_step(executor, env, step.done)
        video.add(env, trace.last_text)
    video.write()
    scores = reasoning_scores(trace.entries)
    return EpisodeOutcome(
        success=step.success,
        partial_score=step.partial_score,
        failure_mode=None if step.success else episode.failure_mode(env.sim),
        steps=env.steps,
        latency_ms=latency_stats(executor.latencies),
        reasoning_trace=trace.entries,
        reasoning_accuracy=scores["exact"] if scores else None,
        reasoning_scores=scores,
        object_ids=list(episode.object_ids),
        instruction=episode.instruction,
        perturbations=list(env.perturbation_params),
        extra=dict(getattr(episode, "extra", {})),
    )
