"""What a run leaves on disk: one JSONL line per finished episode, plus ``manifest.json``.

The JSONL store is the source of truth for results and for resuming: a line is written (and fsynced)
only when an episode has finished, so an interrupted run loses at most the episodes in flight, and a
rerun into the same directory skips every key already present.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, TypedDict

from divla_eval.errors import ConfigMismatchError, CorruptFileError, InvalidValueError
from divla_eval.schema import check_fields, check_value, parse_json, read_json

MANIFEST_NAME = "manifest.json"
# Versions that can move success rates; recorded (never imported) so results can be traced to a stack.
# numba compiles robosuite's controller math, scipy its rotations; peft (LoRA) and tokenizers shape what a
# learned policy computes and reads.
TRACKED_PACKAGES = (
    *("mujoco", "robosuite", "numpy", "torch", "gymnasium", "transformers", "diffusers"),
    *("numba", "scipy", "peft", "tokenizers"),
)


def _json_default(obj: Any) -> Any:
    """Let numpy scalars/arrays through json.dumps without importing numpy here."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def policy_label(name: str, options: dict | None = None) -> str:
    """How a policy run with inference options is named in output lines and result tables, e.g.
    `divla (inference_steps=5, reasoning_every=4)`; just the name when it has none."""
    if not options:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in sorted(options.items()))})"


class TraceEntry(TypedDict, total=False):
    """One entry of `EpisodeRecord.reasoning_trace` (the reports score `text` against `expert`)."""

    step: int
    text: str
    expert: str


class PerturbationEntry(TypedDict, total=False):
    """One entry of `EpisodeRecord.perturbations`: name and level, then the sampled parameters."""

    name: str
    level: float | None


@dataclass
class EpisodeRecord:
    """One finished (or failed) episode; the unit every metric is computed from."""

    run_id: str
    task: str
    task_version: str
    split: str
    difficulty: str | None
    episode_index: int
    episode_key: str  # unique name of the planned episode; resume and dedup key on it
    seed: int
    object_ids: list[str]
    instruction: str
    perturbations: list[PerturbationEntry]  # [{"name": ..., "level": ..., **params}]
    policy: str
    checkpoint_hash: str | None
    success: bool
    partial_score: float
    failure_mode: str | None
    steps: int
    wall_time_s: float
    latency_ms: dict[str, float]  # {"n", "mean", "p50", "p95"}; empty when the policy was never called
    reasoning_trace: list[TraceEntry]
    status: Literal["ok", "error"]  # errors count as failures, never dropped
    error: str | None  # traceback text when status == "error"
    extra: dict = field(default_factory=dict)
    reasoning_accuracy: float | None = None
    """Share of policy calls whose reasoning phrase equals the scripted expert's phrase for the same
    state (None for policies that write no reasoning, and for the expert itself)."""
    reasoning_scores: dict[str, float] | None = None
    """{"exact", "subtask", "object"} shares over the scored calls (see divla_eval.reasoning)."""
    policy_options: dict = field(default_factory=dict)
    """The policy's inference options (`--policy-option`); empty: the checkpoint's own settings."""
    policy_info: dict = field(default_factory=dict)
    """Where the actions came from beyond the name and checkpoint (`PolicyMetadata.info`): for a remote
    policy the server's URL and metadata and whether its sampling was seeded per episode."""

    def to_json(self) -> str:
        """One line of JSON (sorted keys, so files diff cleanly)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=_json_default)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpisodeRecord:
        """Build from a parsed line; unknown keys (from newer versions) are ignored so old readers cope.

        Every field is checked against its annotation first (InvalidValueError naming the field):
        a record is read back by resume, reports and comparisons, and a value of the wrong type
        (`"success": "maybe"`) would otherwise fail far from the file, or be counted wrongly."""
        check_fields(cls, d, "an episode record")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    """(a stored line's JSON, None), or (None, why it is garbled) when it is not UTF-8 JSON (what a
    torn write leaves).

    The one definition of a garbled line, shared by `load` (which skips a garbled last line) and
    `append` (which cuts it off before writing after it), so the two can never disagree."""
    try:
        return parse_json(raw), None
    except InvalidValueError as exc:
        return None, str(exc)


class EpisodeStore:
    """Append-only JSONL file of :class:`EpisodeRecord`; one writer (the runner's main process)."""

    TORN_SUFFIX = ".torn"
    """A garbled last line cut off before appending is kept in `<file>.torn`, never simply lost."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tail_checked = False

    def append(self, record: EpisodeRecord) -> None:
        """Write one line and fsync it, so a finished episode survives a crash or Ctrl-C right after."""
        line = record.to_json() + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._tail_checked:
            self._repair_tail()
            self._tail_checked = True
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _repair_tail(self) -> None:
        """Deal with a last line that an interrupted write left torn, before appending after it.

        `load` skips a garbled *last* line, but once another record follows it, it is a garbled
        middle line, which `load` refuses: appending after it would make the file unreadable at the
        next resume. So a garbled last line (with or without its newline) is cut off here and kept
        in `<file>.torn`. A last line that still parses is a complete record missing only its
        newline, so we finish it.
        """
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        body = data.rstrip(b" \t\r\n")
        if not body:
            return
        cut = body.rfind(b"\n") + 1
        if _parse_line(body[cut:])[1] is not None:
            torn = self.path.with_name(self.path.name + self.TORN_SUFFIX)
            with open(torn, "ab") as f:
                f.write(data[cut:].rstrip(b"\n") + b"\n")
                os.fsync(f.fileno())
            warnings.warn(
                f"{self.path}: dropping a truncated last line left by an interrupted write (kept in {torn})"
            )
            with open(self.path, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
            return
        if not data.endswith(b"\n"):
            with open(self.path, "ab") as f:
                f.write(b"\n")
                os.fsync(f.fileno())

    def load(self) -> list[EpisodeRecord]:
        """Read every record, first occurrence of each episode_key wins.

        A garbled *last* line is what an interrupted write leaves, so it is skipped with a warning; a
        garbled line anywhere else means the file was damaged or edited, and guessing would bias results.
        So does a line that is JSON but not a valid record: each field is checked against its type.
        """
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise CorruptFileError(f"{self.path} cannot be read ({exc.strerror or exc})") from None
        lines = data.split(b"\n")
        numbered = [(i + 1, raw) for i, raw in enumerate(lines) if raw.strip()]
        records: list[EpisodeRecord] = []
        seen: set[str] = set()
        duplicates = 0
        for pos, (lineno, raw) in enumerate(numbered):
            parsed, reason = _parse_line(raw)
            if reason is not None:
                if pos == len(numbered) - 1:
                    warnings.warn(
                        f"{self.path}:{lineno}: ignoring a truncated last line (interrupted write?)"
                    )
                    break
                raise CorruptFileError(
                    f"{self.path}:{lineno}: {reason}; the file was damaged or edited: restore it, or "
                    "delete that line to run its episode again"
                ) from None
            try:
                record = EpisodeRecord.from_dict(parsed)
            except InvalidValueError as exc:
                raise CorruptFileError(f"{self.path}:{lineno}: not an episode record ({exc})") from None
            if record.episode_key in seen:
                duplicates += 1
                continue
            seen.add(record.episode_key)
            records.append(record)
        if duplicates:
            warnings.warn(f"{self.path}: ignored {duplicates} duplicate episode(s); kept the first of each")
        return records

    def done_keys(self) -> set[str]:
        """Keys of episodes already finished, which a resumed run skips."""
        return {r.episode_key for r in self.load()}


def write_manifest(run_dir: Path, config: dict, extra: dict) -> None:
    """Write ``manifest.json`` atomically (tmp + rename) so a crash never leaves half a manifest."""
    if "config" in extra:
        raise ValueError("'config' is reserved in the manifest; pass it as the config argument")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"config": config, **extra}, indent=2, sort_keys=True, default=_json_default)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".manifest.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a manifest is meant to be shared
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EnvironmentInfo(TypedDict, total=False):
    """`environment_info()`: stored at the top level of a run's manifest (or under `environment`)."""

    python: str
    platform: str
    machine: str
    cpu_count: int | None
    git_commit: str | None
    dirty: bool | None
    dirty_files: list[str]
    packages: dict[str, str | None]


class ManifestExtension(TypedDict, total=False):
    """One entry of a manifest's `extended`: a later --episodes that grew the run."""

    episodes: list[int]
    at: str
    git_commit: str | None


class Manifest(EnvironmentInfo, total=False):
    """What the harness reads from a manifest besides `config` (checked separately, see
    `check_manifest`); keys it does not name pass, so a newer writer's manifest stays readable."""

    run_id: str
    task_version: str
    task_settings: dict
    episode_max_steps: int | None
    device: str
    object_library_hash: str
    created: str
    policy_info: dict
    extended: list[ManifestExtension]
    environment: EnvironmentInfo


RUN_MANIFEST_KEYS = ("run_id", "task_version")
"""Top-level keys every manifest of a run has (the runner writes them; records carry the run_id)."""


def check_manifest(data: Any) -> None:
    """Refuse a parsed manifest whose shape the harness cannot use (InvalidValueError naming the field).

    `config` must be an object. A run's manifest (its config names a `task`: every manifest `divla-eval
    run` writes does) must also hold a run config, checked field by field against `RunConfig`, and the
    run's id and task version; a manifest whose config has no task can never match a run's config,
    so no run resumes into it, and only its shape is checked.
    """
    if not isinstance(data, dict):
        check_value(data, dict)
    if "config" not in data:
        raise InvalidValueError("field 'config' is missing (expected an object: the run's config)")
    check_value(data["config"], dict, "config")
    check_value(data, Manifest)
    config = data["config"]
    if "task" in config:
        from divla_eval.runner import RunConfig  # the schema of a run's config; imported only here

        missing = [k for k in RUN_MANIFEST_KEYS if k not in data]
        if missing:
            raise InvalidValueError(f"field '{missing[0]}' is missing (every run's manifest has one)")
        check_fields(RunConfig, config, "a run config", prefix="config")


def read_manifest(run_dir: Path) -> dict | None:
    """The run's manifest, or None when the directory has none yet. Anything else than a manifest of
    the expected shape is a CorruptFileError naming the file and the field (see `check_manifest`)."""
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        return None
    data = read_json(path, CorruptFileError)
    try:
        check_manifest(data)
    except InvalidValueError as exc:
        raise CorruptFileError(f"{path}: {exc}") from None
    return data


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b": value}, so a mismatch message can name the exact setting."""
    if not isinstance(d, dict) or (prefix and not d):
        return {prefix: d}
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value: Any, missing: bool = False) -> str:
    if missing:
        return "<unset>"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def check_manifest_compatible(run_dir: Path, config: dict) -> None:
    """Refuse to resume a run dir made with another config: its episodes would not be comparable."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return
    if "config" not in manifest:
        raise CorruptFileError(f"{Path(run_dir) / MANIFEST_NAME}: has no 'config' entry")
    # Round-trip through JSON so tuples vs lists and numpy scalars compare as they would be stored.
    old = _flatten(json.loads(json.dumps(manifest["config"], sort_keys=True, default=_json_default)))
    new = _flatten(json.loads(json.dumps(config, sort_keys=True, default=_json_default)))
    diffs = [
        f"{key}: {_short(old.get(key), key not in old)} -> {_short(new.get(key), key not in new)}"
        for key in sorted(old.keys() | new.keys())
        if key not in old or key not in new or old[key] != new[key]
    ]
    if diffs:
        raise ConfigMismatchError(
            f"run dir {run_dir} was made with a different config ({'; '.join(diffs)}); "
            "use a new --out directory"
        )


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def environment_info(cwd: Path | None = None) -> dict:
    """Machine, code revision and simulator-stack versions for the manifest.

    Package versions come from installed metadata rather than imports, so recording them costs nothing
    and cannot fail on a broken GPU stack. ``dirty`` ignores untracked files (run dirs, venvs), which do
    not change what the code computes; ``dirty_files`` names the changed files, so a reader can tell
    whether the uncommitted change touched the code the run used.
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    commit = _git(["rev-parse", "HEAD"], cwd)
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd) if commit is not None else None
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "git_commit": commit.strip() if commit is not None else None,
        "dirty": bool(status.strip()) if status is not None else None,
        "dirty_files": sorted(line[3:] for line in status.splitlines() if line.strip()) if status else [],
        "packages": versions,
    }
