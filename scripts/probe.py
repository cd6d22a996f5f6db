"""Linear probe: can a saved policy's internal features say where an object stands?

`scripts/openloop.py --swap-images` shows *that* a policy's actions ignore the images; this tells
*where* on the way from the pixels to the action head the object's position is lost. Each demo is
replayed as an episode shows it (a call every `execute_steps` steps, DiVLA conditioned on the recorded
phrase) up to its first gripper close, the reach, and the features of every call are captured. A ridge
regression (cross-validated penalty) fitted on the demos training used (`--mask train`) predicts the
recorded simulator state entries `--state-index` (an object's x and y) of the held-out demos (`valid`);
the R^2 there is printed per feature (each fitted with the proprioception beside it, which the head
always has). 1: the feature holds the position linearly; 0: no better than the mean.

Features: `proprio` (the robot's own state: a floor, since where the arm starts says nothing of the
object), and per policy
    divla:            visual_tokens (the encoder's tokens as the decoder receives them),
                      decoder_visual (the decoder's last hidden states at those positions),
                      decoder_mean (its last hidden states averaged over the whole sequence: the
                      pooled condition of TinyVLA's and DexVLA's diffusion heads),
                      action_tokens (its last hidden states at the action tokens: what the paper's head
                      reads), condition (the action head's whole global condition), and with
                      `keypoint_condition` keypoints (the keypoint encoders' features)
    diffusion_policy: condition (spatial-softmax keypoints and proprioception of its observation steps)
    octo:             obs_tokens (the transformer's outputs at the last step's patch and proprioception
                      tokens), condition (what the head reads: the mean readout token and, with
                      `keypoint_condition`, the keypoint features), keypoints (those features)

    .venv/bin/python scripts/probe.py --policy divla runs/train/divla-multitask-curve/snapshots/step-0020000 \
        data/multitask-flip_pot-200.hdf5 --state-index 10 11

The default state indices 10 and 11 are the pot's x and y in flip_pot's flattened MuJoCo state (time,
then the arm's 7 and the gripper's 2 joint positions, then the pot's free joint).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from divla_eval.data.demos import demo_names, episode_calls, open_demos
from divla_eval.errors import run_script
from divla_eval.policy import make_policy


class Capture:
    """Wraps the model method that builds the action head's condition and keeps, per call, the named
    features it sees (flattened, float64)."""

    def __init__(self, policy):
        self.rows: list[dict[str, np.ndarray]] = []
        model = policy.model
        if policy.name == "divla":
            original = model._condition
            decoder_out: dict[str, torch.Tensor] = {}

            def keep_decoder(_module, _args, output):
                decoder_out["hidden"] = output.last_hidden_state

            model.decoder.register_forward_hook(keep_decoder)

            def condition(action_hidden, proprio, head, vis, keypoints):
                cond = original(action_hidden, proprio, head, vis, keypoints)
                n_vis = vis.shape[1]
                row = {
                    "visual_tokens": _flat(vis),
                    "decoder_visual": _flat(decoder_out["hidden"][:, :n_vis]),
                    "decoder_mean": _flat(decoder_out["hidden"].mean(1)),
                    "action_tokens": _flat(action_hidden),
                    "condition": _flat(cond),
                }
                if keypoints is not None:
                    row["keypoints"] = _flat(keypoints)
                self.rows.append(row)
                return cond

            model._condition = condition
        elif policy.name == "diffusion_policy":
            original = model.encode

            def encode(images, proprio):
                cond = original(images, proprio)
                self.rows.append({"condition": _flat(cond)})
                return cond

            model.encode = encode
        elif policy.name == "octo":
            original_outputs, original_condition = model.transformer_outputs, model.condition
            pending = {}

            def transformer_outputs(images, proprio, text):
                out = original_outputs(images, proprio, text)
                pending["obs_tokens"] = _flat(out["obs"][:, -1])
                return out

            def condition(images, proprio, text):  # calls the patched transformer_outputs first
                cond = original_condition(images, proprio, text)
                row = {"obs_tokens": pending.pop("obs_tokens"), "condition": _flat(cond)}
                if model.keypoint_encoders is not None:
                    row["keypoints"] = _flat(cond[:, model.cfg.width :])
                self.rows.append(row)
                return cond

            model.transformer_outputs = transformer_outputs
            model.condition = condition
        else:
            raise SystemExit(f"probe knows divla, diffusion_policy and octo, not {policy.name!r}")


def _flat(x: torch.Tensor) -> np.ndarray:
    return x[0].detach().flatten().double().cpu().numpy()


def untrained(policy, checkpoint: str, options: dict):
    """`policy`'s architecture freshly initialised (seed 0), with its buffers (the normalisation
    statistics among them) copied from the trained model, behind the same policy class."""
    cls = type(policy)
    torch.manual_seed(0)
    fresh = cls.build_model(Path(checkpoint), policy.model.cfg)
    trained = dict(policy.model.named_buffers())
    with torch.no_grad():
        for name, buffer in fresh.named_buffers():
            buffer.copy_(trained[name])
    return cls(fresh.eval(), **options)


def reach_calls(
    policy, capture: Capture, demo: h5py.Group, state_index: list[int], minus_proprio: list[int]
) -> list[dict]:
    """Replay one demo until the gripper first closes; one row of features and targets per call: the
    state entries, less the proprioception entries `minus_proprio` (the object relative to the hand)."""
    actions = demo["actions"][:]
    closes = np.flatnonzero(actions[:, -1] > 0)
    end = int(closes[0]) if len(closes) else len(actions)
    rows = []
    for t, obs in episode_calls(policy, demo, steps=max(end, 1), with_reasoning=True):
        policy.infer(obs)
        row = capture.rows.pop()
        row["proprio"] = obs.proprio.astype(np.float64)
        row["group"] = demo.name
        row["target"] = demo["states"][t, state_index] - (obs.proprio[minus_proprio] if minus_proprio else 0)
        rows.append(row)
    return rows


def r2_scores(train: list[dict], test: list[dict]) -> dict[str, float]:
    """Held-out R^2 of a ridge fit per feature. The penalty is chosen by 5-fold cross-validation on
    `train` with whole demos held out (`group`): the calls of one demo share their scene, so folds that
    split a demo would reward memorising scenes. Every feature is fitted together with the
    proprioception, which the action head always has: a feature scores above `proprio` alone only by
    what it adds."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def design(rows, names):
        return np.stack([np.concatenate([r[n] for n in names]) for r in rows])

    y_train = np.stack([r["target"] for r in train])
    y_test = np.stack([r["target"] for r in test])
    groups = [r["group"] for r in train]
    scores = {}
    for name in [n for n in train[0] if n not in ("target", "group")]:
        names = [name] if name == "proprio" else [name, "proprio"]
        search = GridSearchCV(
            make_pipeline(StandardScaler(), Ridge()),
            {"ridge__alpha": np.logspace(-2, 8, 11)},
            cv=GroupKFold(n_splits=5),
        )
        search.fit(design(train, names), y_train, groups=groups)
        scores[name] = float(search.score(design(test, names), y_test))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("demos", help="one demo file (an HDF5 of `divla-eval collect`)")
    parser.add_argument("--policy", required=True, help="divla, diffusion_policy or octo")
    parser.add_argument("--state-index", type=int, nargs="+", default=[10, 11])
    parser.add_argument(
        "--minus-proprio-index",
        type=int,
        nargs="*",
        default=[0, 1],
        help="proprioception entries subtracted from the state entries (default 0 1, the hand's x and y: "
        "the target is then the object relative to the hand, what a reach needs); none: absolute",
    )
    parser.add_argument("--train-demos", type=int, default=80, help="demos the probe is fitted on")
    parser.add_argument("--test-demos", type=int, default=20, help="held-out demos it is scored on")
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="the checkpoint's architecture with fresh weights (seed 0) and its normalisation statistics: "
        "what the features hold before training, the floor of what training added",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="a folder: the scores go to its records.jsonl (replacing a record of the same policy, "
        "checkpoint, demos and target) and probe.md is written anew from all its records",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    options = {"oracle_reasoning": 1} if args.policy == "divla" else {}
    policy = make_policy(args.policy, args.checkpoint, options=options)
    if args.untrained:
        policy = untrained(policy, args.checkpoint, options)
    capture = Capture(policy)
    with open_demos(args.demos) as f:
        split = {}
        for mask, n in (("train", args.train_demos), ("valid", args.test_demos)):
            split[mask] = [
                row
                for name in demo_names(f, args.demos, mask)[:n]
                for row in reach_calls(
                    policy, capture, f["data"][name], args.state_index, args.minus_proprio_index
                )
            ]
    scores = r2_scores(split["train"], split["valid"])
    relative = f" less proprio {args.minus_proprio_index}" if args.minus_proprio_index else ""
    print(f"{args.policy} {args.checkpoint}: state {args.state_index}{relative} during the reach")
    print(f"calls: {len(split['train'])} to fit, {len(split['valid'])} held out")
    for name, r2 in scores.items():
        print(f"{name:16s} held-out R^2 {r2:6.3f}")
    if args.out is not None:
        meta_file = Path(args.checkpoint) / getattr(policy, "meta_file", "")
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        record = {
            "policy": args.policy,
            "checkpoint": args.checkpoint + (" (untrained)" if args.untrained else ""),
            "steps": 0 if args.untrained else meta.get("steps"),
            "demos": Path(args.demos).stem,
            "target": f"state {args.state_index}{relative}",
            "calls": [len(split["train"]), len(split["valid"])],
            "r2": {k: round(v, 3) for k, v in scores.items()},
        }
        write_records(args.out, record)


FEATURES = (
    "proprio",
    "visual_tokens",
    "decoder_visual",
    "decoder_mean",
    "action_tokens",
    "keypoints",
    "obs_tokens",
    "condition",
)
"""probe.md's columns, from the pixels' end of a policy to its action head's."""


def write_records(out: Path, record: dict) -> None:
    """Add `record` to out/records.jsonl (a record for the same policy, checkpoint, demos and target is
    replaced) and write out/probe.md, one row per record, from the file."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    key = ("policy", "checkpoint", "demos", "target")
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    records = [r for r in records if any(r[k] != record[k] for k in key)] + [record]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = [
        "# Linear probe: the object's position relative to the hand, held-out R^2",
        "",
        "Written by `scripts/probe.py ... --out` from records.jsonl beside it; each row's command is",
        "`.venv/bin/python scripts/probe.py --policy POLICY CHECKPOINT data/DEMOS.hdf5 --out DIR`. Every",
        "feature is fitted beside the proprioception; `proprio` is that alone.",
        "",
        "| demos | policy | checkpoint | steps | calls fit / held out | " + " | ".join(FEATURES) + " |",
        "|---|---|---|---:|---|" + "---:|" * len(FEATURES),
    ]
    for r in sorted(records, key=lambda r: (r["demos"], r["policy"], r["steps"] or 0, r["checkpoint"])):
        cells = [f"{r['r2'][f]:.2f}" if f in r["r2"] else "-" for f in FEATURES]
        row = [
            r["demos"],
            r["policy"],
            f"`{r['checkpoint']}`",
            str(r["steps"]),
            "{} / {}".format(*r["calls"]),
        ]
        lines.append("| " + " | ".join(row + cells) + " |")
    (out / "probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run_script(main, "probe.py")
