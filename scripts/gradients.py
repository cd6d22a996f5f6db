"""Which of DiVLA's two losses trains each part of it: the gradient norm that the diffusion loss
(L_diff) and the weighted reasoning loss (alpha * L_ntp) each send into the vision encoder, the
decoder and the action head, averaged over a few training batches of the demos.

`scripts/probe.py` shows that training taught DiVLA's encoder little about where objects are; this
shows what does train the encoder. The two gradients are taken one after the other on the same batch
and the same noise draws (the training loss is their sum), at the checkpoint's weights.

    .venv/bin/python scripts/gradients.py runs/train/divla-multitask-curve/snapshots/step-0020000 \
        data/multitask-*-200.hdf5 --batches 4
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from divla_eval.data.dataset import DemoDataset, collate
from divla_eval.divla import train as divla_train
from divla_eval.divla.policy import DiVLAPolicy
from divla_eval.errors import run_script

PARTS = {
    "vision": lambda m: m.vision.parameters(),
    "decoder": lambda m: [*m.mm_projector.parameters(), *m.decoder.parameters()],
    "action head": lambda m: [*m.projector.parameters(), *m.unet.parameters()],
    "keypoints": lambda m: m.keypoint_encoders.parameters() if m.keypoint_encoders is not None else [],
}
"""Where the gradients are measured (the visual tokens' projector counts with the decoder it feeds)."""


def gradient_norms(model, batches, seed: int = 0) -> dict[str, dict[str, float]]:
    """{loss: {part: mean gradient L2 norm over `batches`}} for "l_diff" and "alpha*l_ntp"."""
    model.train()
    sums: dict[str, dict[str, float]] = {
        loss: dict.fromkeys(PARTS, 0.0) for loss in ("l_diff", "alpha*l_ntp")
    }
    n = 0
    for i, batch in enumerate(batches):
        for loss in sums:
            model.zero_grad()
            out = divla_train.loss(model, batch, torch.Generator().manual_seed(seed + i))
            (out["l_diff"] if loss == "l_diff" else model.cfg.alpha * out["l_ntp"]).backward()
            for part, params in PARTS.items():
                grads = [p.grad for p in params(model) if p.grad is not None]
                sums[loss][part] += float(torch.sqrt(sum((g**2).sum() for g in grads))) if grads else 0.0
        n += 1
    return {loss: {part: v / max(n, 1) for part, v in parts.items()} for loss, parts in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a DiVLA checkpoint directory")
    parser.add_argument("demos", nargs="+")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = DiVLAPolicy.from_pretrained(args.checkpoint).model
    data = DemoDataset(args.demos, chunk=model.cfg.chunk, cameras=model.cfg.cameras, demos="train")
    loader = DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    batches = (batch for i, batch in zip(range(args.batches), loader))
    norms = gradient_norms(model, batches)
    print(
        f"{args.checkpoint}: gradient L2 norm per part, mean of {args.batches} batches of {args.batch_size}"
    )
    print("loss | " + " | ".join(PARTS))
    for loss, parts in norms.items():
        print(f"{loss} | " + " | ".join(f"{v:.5f}" for v in parts.values()))


if __name__ == "__main__":
    run_script(main, "gradients.py")
