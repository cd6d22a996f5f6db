"""The OpenVLA network (Kim et al. 2024, arXiv 2406.09246) on DiVLA's backbone, at any size.

Data flow of one call:

    camera images --DiVLA's SigLIP, view-adaptive pooling and projector--> 36 front + 16 wrist tokens
    [visual tokens, "In: What action should the robot take to <instruction>?\\nOut:"]
        --Qwen2 decoder, greedy, KV cache--> action_dim tokens, each one of 256 reserved action tokens
    token of bin k in dimension d --> the centre of bin k between d's 1st and 99th training percentiles
    optional, not OpenVLA's: each camera --Diffusion Policy's keypoint encoder--> one more visual token
        after the SigLIP tokens (`keypoint_token_points`)

Training is next-token cross-entropy on the action tokens only, the prompt teacher-forced. Sequences in
a batch are left-padded, so the action tokens always sit at the last positions.

The vision path and the decoder are DiVLA's own functions (imported, not copied), so the two models
share one backbone implementation and differ only in how an action leaves it. Kept apart from
policy.py so that validating a checkpoint directory does not import torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tokenizers import AddedToken
from torch import nn

from divla_eval.baselines.openvla.config import OpenVLAConfig
from divla_eval.divla.model import DiVLAModel, build_language_model, build_token_projector, build_vision
from divla_eval.nn.keypoints import CameraKeypoints

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
"""OpenVLA's prompt template; the decoder's answer is the action tokens."""
ACTION_TOKEN = "<act_{}>"


def reserve_action_tokens(tokenizer, n_bins: int) -> int:
    """Add the action tokens to `tokenizer` (unless a saved tokenizer has them already) and return the
    id of bin 0; bin k is that id + k.

    The paper overwrites Llama's 256 least-used tokens, which a 512-token vocabulary learnt from a few
    instructions cannot spare; added special tokens are reserved in the same way: ordinary text never
    tokenises into them, and the ids are contiguous, so a bin is an id offset."""
    names = [ACTION_TOKEN.format(k) for k in range(n_bins)]
    vocab = tokenizer.get_vocab()
    present = [n for n in names if n in vocab]
    if not present:
        tokenizer.add_tokens(
            [AddedToken(n, special=True, normalized=False) for n in names], special_tokens=True
        )
    elif len(present) != n_bins:
        raise ValueError(f"the tokenizer has {len(present)} of the {n_bins} action tokens")
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(ids[0], ids[0] + n_bins)):
        raise ValueError("the tokenizer's action tokens do not have contiguous ids")
    return ids[0]


class ActionBins(nn.Module):
    """Per-dimension uniform bins between the 1st and 99th percentiles of the training actions.

    The percentiles, not the extremes: a few outlier actions would otherwise stretch the range and
    leave most bins empty. Actions outside the range clip to the first or last bin. The bounds are
    buffers, so they travel inside the weights file."""

    def __init__(self, action_dim: int, n_bins: int):
        super().__init__()
        self.n_bins = n_bins
        self.register_buffer("low", -torch.ones(action_dim))
        self.register_buffer("high", torch.ones(action_dim))

    def set_bounds(self, low, high) -> None:
        self.low.copy_(torch.as_tensor(low, dtype=torch.float32))
        self.high.copy_(torch.as_tensor(high, dtype=torch.float32))

    @property
    def width(self) -> torch.Tensor:
        """Bin width per dimension; a constant dimension gets a tiny one and decodes to its value."""
        return (self.high - self.low).clamp(min=1e-6) / self.n_bins

    def to_bins(self, actions: torch.Tensor) -> torch.Tensor:
        """[..., action_dim] actions -> long bin indices in 0..n_bins-1."""
        a = torch.minimum(torch.maximum(actions, self.low), self.high)
        return torch.floor((a - self.low) / self.width).long().clamp(0, self.n_bins - 1)

    def from_bins(self, bins: torch.Tensor) -> torch.Tensor:
        """Bin indices -> the bins' centres, in the robot's action units."""
        return self.low + (bins.float() + 0.5) * self.width


class OpenVLAModel(nn.Module):
    # DiVLA's visual tokens and embedding lookup, unchanged (they read vision, mm_projector,
    # view_embed, decoder and cfg.cameras / cfg.view_tokens, which this model has under the same names)
    encode_images = DiVLAModel.encode_images
    embed_tokens = DiVLAModel.embed_tokens

    def __init__(self, cfg: OpenVLAConfig, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
            tokenizer.pad_token = tokenizer.eos_token
        self.first_action_id = reserve_action_tokens(tokenizer, cfg.n_bins)
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        self.vision = build_vision(cfg)
        self.decoder, self.lm_head = build_language_model(cfg, len(tokenizer), special)
        self._fit_vocabulary(len(tokenizer))
        vh = self.vision.config.hidden_size
        th = self.decoder.config.hidden_size
        self.mm_projector = build_token_projector(cfg, vh, th)
        self.view_embed = nn.Parameter(torch.zeros(len(cfg.cameras), th))
        self.keypoint_encoders = None  # the optional `keypoint_token_points` path
        if cfg.keypoint_token_points > 0:
            self.keypoint_encoders = CameraKeypoints(
                cfg.cameras, cfg.keypoint_channels, cfg.keypoint_token_points, th
            )
        self.bins = ActionBins(cfg.action_dim, cfg.n_bins)

    def _fit_vocabulary(self, n: int) -> None:
        """A pretrained decoder whose embedding table has no spare rows for the action tokens grows
        by them (new rows freshly initialised); its config is updated so the checkpoint rebuilds."""
        rows = self.decoder.get_input_embeddings().num_embeddings
        if rows >= n:
            return
        self.decoder.resize_token_embeddings(n)
        head = nn.Linear(self.lm_head.in_features, n, bias=False)
        head.weight.data[:rows] = self.lm_head.weight.data
        self.lm_head = head
        self.cfg.text_config = self.decoder.config.to_dict()

    # --- tokens -----------------------------------------------------------------------------------------
    def visual_prefix(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sequence's image part [B, n, hidden]: DiVLA's visual tokens, then with
        `keypoint_token_points` one keypoint token per camera, marked with its camera's view embedding
        as that camera's SigLIP tokens are."""
        vis = self.encode_images(images)
        if self.keypoint_encoders is None:
            return vis
        keypoints = (
            torch.stack(self.keypoint_encoders(images), dim=1) + self.view_embed
        )  # [B, cameras, hidden]
        return torch.cat([vis, keypoints], dim=1)

    def prompt_ids(self, instructions: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []  # Qwen2's tokenizer has none
        texts = [PROMPT.format(instruction=s) for s in instructions]
        return [[*bos, *ids] for ids in tok(texts, add_special_tokens=False).input_ids]

    def action_token_ids(self, actions: torch.Tensor) -> torch.Tensor:
        """[B, action_dim] actions -> [B, action_dim] vocabulary ids."""
        return self.bins.to_bins(actions) + self.first_action_id

    # --- training ---------------------------------------------------------------------------------------
    def forward(self, images: dict[str, torch.Tensor], instructions: list[str], actions: torch.Tensor):
        """Cross-entropy of the action tokens of raw `actions` [B, action_dim], over the whole
        vocabulary as in the paper. Also returns the token accuracy, the paper's training monitor."""
        vis = self.visual_prefix(images)
        targets = self.action_token_ids(actions)
        d = targets.shape[1]
        rows = []
        for v, prompt, target in zip(vis, self.prompt_ids(instructions), targets):
            text = torch.tensor(prompt, device=vis.device)
            # the last action token is only ever a target, never an input
            rows.append(torch.cat([v, self.embed_tokens(text), self.embed_tokens(target[:-1])]))
        emb, mask = _left_pad(rows)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.decoder(
            inputs_embeds=emb, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        logits = self.lm_head(hidden[:, -d:])  # each of the last d positions predicts the next token
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        accuracy = (logits.argmax(-1) == targets).float().mean()
        return {"loss": loss, "action_accuracy": accuracy.detach()}

    # --- inference --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_bins(self, prefix: torch.Tensor) -> torch.Tensor:
        """Greedy decoding of action_dim tokens with the decoder's KV cache; prefix: [B, L, hidden]
        embeddings. Returns the bins [B, action_dim].

        The first pass reads the whole prefix; each later one feeds only the newest token, the cache
        holding every earlier key and value. The choice is made among the action tokens only: a text
        token has no action meaning (the paper maps any id to a bin by clipping instead)."""
        first, n = self.first_action_id, self.cfg.n_bins
        out = self.decoder(inputs_embeds=prefix, use_cache=True)
        chosen = []
        for step in range(self.cfg.action_dim):
            logits = self.lm_head(out.last_hidden_state[:, -1])[:, first : first + n]
            bins = logits.argmax(-1)
            chosen.append(bins)
            if step + 1 < self.cfg.action_dim:
                out = self.decoder(
                    inputs_embeds=self.embed_tokens((bins + first)[:, None]),
                    cache=out.cache,
                    use_cache=True,
                )
        return torch.stack(chosen, dim=1)

    @torch.no_grad()
    def act(self, images: dict[str, torch.Tensor], instruction: str) -> torch.Tensor:
        """One action [B, action_dim] in the robot's units for B observations of one instruction
        (images: camera -> float [B, 3, H, W] in [0, 1])."""
        vis = self.visual_prefix(images)
        prompt = torch.tensor(self.prompt_ids([instruction]), device=vis.device)
        prompt = self.embed_tokens(prompt).expand(vis.shape[0], -1, -1)
        return self.bins.from_bins(self.generate_bins(torch.cat([vis, prompt], dim=1)))


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [L_i, hidden] rows into [B, max L, hidden] with zeros on the left, and the attention mask
    (1 on real positions): every row then ends at the same position."""
    n = max(len(r) for r in rows)
    emb = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.long, device=emb.device)
    for i, r in enumerate(rows):
        emb[i, n - len(r) :] = r
        mask[i, n - len(r) :] = 1
    return emb, mask
