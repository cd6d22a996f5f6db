"""scripts/gradients.py: the two losses' gradients land where the model's wiring says they must."""

from __future__ import annotations

import pytest
from conftest import TINY_DIVLA, load_script

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_each_loss_reaches_the_parts_it_trains(demos, alpha):
    from torch.utils.data import DataLoader

    from divla_eval.data.dataset import DemoDataset, collate
    from divla_eval.divla.config import DiVLAConfig
    from divla_eval.divla.model import DiVLAModel
    from divla_eval.divla.tokenizer import build_tokenizer

    gradients = load_script("gradients")
    data = DemoDataset(demos, chunk=TINY_DIVLA["chunk"])
    texts = list(data.instructions.values()) + [t for r in data.reasoning.values() for t in r]
    torch.manual_seed(0)
    cfg = DiVLAConfig(**{**TINY_DIVLA, "alpha": alpha, "keypoint_condition": 2, "keypoint_channels": (8,)})
    model = DiVLAModel(cfg, build_tokenizer(texts, 300))
    batches = [b for _, b in zip(range(2), DataLoader(data, batch_size=4, collate_fn=collate))]
    norms = gradients.gradient_norms(model, batches)
    assert all(v > 0 for v in norms["l_diff"].values())  # the diffusion loss trains every part
    ntp = norms["alpha*l_ntp"]
    assert ntp["action head"] == ntp["keypoints"] == 0  # the phrase is predicted before the action head
    assert (ntp["vision"] > 0 and ntp["decoder"] > 0) == (alpha > 0)
