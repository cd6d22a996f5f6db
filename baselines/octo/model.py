"""The Octo network (Octo Model Team 2024), at any size.

Data flow of one call:

    instruction --frozen MiniLM (cached per string)--> token states --linear--> task tokens
    each camera, each of the last T_o steps --its own conv stem + patchify conv--> patch tokens
    standardised proprioception of each step --linear--> one token
    sequence: [task tokens | step 0: obs tokens, readout | step 1: obs tokens, readout]
        --transformer with a block-causal mask--> the last step's readout embedding
    noise [chunk * action_dim] --10 DDIM steps of an MLP-ResNet conditioned on the readout--> a chunk
        in [-1, 1] --min-max--> actions
    optional, not Octo's: each camera's latest image --Diffusion Policy's keypoint encoder--> a feature
        beside the readout in the head's condition (`keypoint_condition`)

The attention mask carries Octo's design: task tokens see only task tokens; step t's observation tokens see
the task and the observations of steps <= t; a readout sees the same plus its own group's readouts
of steps <= t (Octo's rule), and no other token sees a readout. So readouts only *read*: adding or
retraining a head never changes what the observation tokens compute.

Kept in a module of its own (the adapter in policy.py imports it lazily) so that validating a
checkpoint directory does not import torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import Timesteps
from torch import nn

from divla_eval.baselines.octo.config import OctoConfig, text_encoder_dir
from divla_eval.errors import DivlaEvalError
from divla_eval.nn import norm_groups
from divla_eval.nn.diffusion import NormalizationStats, ddim_sample, make_schedulers, training_noise
from divla_eval.nn.keypoints import CameraKeypoints

TASK, OBS, READOUT = 0, 1, 2
"""Token kinds in the attention mask."""


# --- language ----------------------------------------------------------------------------------------
class TextTokens(NamedTuple):
    tokens: torch.Tensor
    """float [B, L, text_dim]: the encoder's last hidden states, zero past each instruction's end."""
    mask: torch.Tensor
    """bool [B, L]: True for real tokens, False for padding."""


class FrozenTextEncoder:
    """A pretrained text encoder (MiniLM by default) that is never trained.

    Deliberately not an nn.Module: its 22M weights stay out of the model's parameters, state dict
    (so out of every checkpoint) and optimiser. Each instruction is encoded alone, once, and cached:
    a task has a handful of instructions, and encoding alone keeps the states independent of which
    other instructions share a batch.
    """

    def __init__(self, name: str):
        from transformers import AutoModel, AutoTokenizer

        path = text_encoder_dir(name)
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def __deepcopy__(self, memo):
        # the training loop deep-copies the model for its EMA weights; both share this frozen encoder
        return self

    @torch.no_grad()
    def __call__(self, instructions: list[str], max_tokens: int) -> TextTokens:
        for text in dict.fromkeys(instructions):
            if (text, max_tokens) not in self._cache:
                enc = self.tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")
                self._cache[(text, max_tokens)] = self.model(**enc).last_hidden_state[0]
        states = [self._cache[(text, max_tokens)] for text in instructions]
        length = max(len(s) for s in states)
        tokens = torch.zeros(len(states), length, self.dim)
        mask = torch.zeros(len(states), length, dtype=torch.bool)
        for i, s in enumerate(states):
            tokens[i, : len(s)] = s
            mask[i, : len(s)] = True
        return TextTokens(tokens, mask)


_TEXT_ENCODERS: dict[str, FrozenTextEncoder] = {}


def load_text_encoder(name: str) -> FrozenTextEncoder:
    """One copy per process: loading MiniLM takes seconds, and every Octo model may share it."""
    if name not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[name] = FrozenTextEncoder(name)
    return _TEXT_ENCODERS[name]


# --- the transformer's attention mask ----------------------------------------------------------------
def block_causal_mask(n_task: int, n_obs: int, n_readout: int, horizon: int) -> torch.Tensor:
    """allowed[q, k]: whether token q may attend to token k, for the sequence
    [task | step 0: obs, readouts | step 1: obs, readouts | ...]."""
    kind = [TASK] * n_task + ([OBS] * n_obs + [READOUT] * n_readout) * horizon
    step = [-1] * n_task + [t for t in range(horizon) for _ in range(n_obs + n_readout)]
    kind, step = torch.tensor(kind), torch.tensor(step)
    q_kind, k_kind = kind[:, None], kind[None, :]
    not_later = step[None, :] <= step[:, None]
    return (
        (k_kind == TASK)
        | ((k_kind == OBS) & (q_kind != TASK) & not_later)
        | ((k_kind == READOUT) & (q_kind == READOUT) & not_later)
    )


# --- observation tokens ------------------------------------------------------------------------------
class PatchStem(nn.Module):
    """One camera's tokenizer, Octo's "SmallStem": a few stride-2 convolutions (cheaper and better
    than ViT's single large-patch projection at small scale, as the Octo paper found), then a conv
    with kernel = stride = patch_size that cuts the map into tokens of the transformer's width."""

    def __init__(self, cfg: OctoConfig):
        super().__init__()
        layers, c_in = [], 3
        for c in cfg.stem_channels:
            layers += [nn.Conv2d(c_in, c, 3, 2, 1), nn.GroupNorm(norm_groups(c), c), nn.ReLU(inplace=True)]
            c_in = c
        self.stem = nn.Sequential(*layers)
        self.patch = nn.Conv2d(c_in, cfg.width, cfg.patch_size, cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [N, 3, H, W] in [0, 1] -> tokens [N, patches, width]."""
        return self.patch(self.stem(images * 2 - 1)).flatten(2).transpose(1, 2)


# --- diffusion head ----------------------------------------------------------------------------------
class MLPResBlock(nn.Module):
    """Pre-norm residual MLP block (Octo's MLPResNet): the residual path lets the denoiser be deep
    without the noisy input vanishing behind its layers."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(
            nn.Dropout(dropout),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, 4 * hidden),
            nn.SiLU(),
            nn.Linear(4 * hidden, hidden),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.body(h)


class DiffusionMLPHead(nn.Module):
    """Denoiser eps(x_t, t | readout) over the whole chunk at once, flattened: Octo's MLP-ResNet
    "ScoreActor". A chunk of 4 is short enough that a 1-D UNet's temporal structure buys nothing."""

    def __init__(self, cfg: OctoConfig):
        super().__init__()
        n, s = cfg.chunk * cfg.action_dim, cfg.step_embed_dim
        self.step_embed = nn.Sequential(
            Timesteps(s, flip_sin_to_cos=True, downscale_freq_shift=0),
            nn.Linear(s, 2 * s),
            nn.SiLU(),
            nn.Linear(2 * s, s),
        )
        self.inp = nn.Linear(n + cfg.width + cfg.keypoint_dim + s, cfg.head_hidden)
        self.blocks = nn.Sequential(
            *(MLPResBlock(cfg.head_hidden, cfg.dropout) for _ in range(cfg.head_blocks))
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(cfg.head_hidden, n))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: [B, chunk, A]; timestep: scalar or [B]; cond: [B, width + keypoint_dim] -> predicted
        noise like x."""
        if timestep.dim() == 0:
            timestep = timestep.expand(x.shape[0])
        h = torch.cat([x.flatten(1), cond, self.step_embed(timestep.to(x.device))], dim=-1)
        return self.out(self.blocks(self.inp(h))).view_as(x)


# --- the model -----------------------------------------------------------------------------------------
class OctoModel(NormalizationStats, nn.Module):
    def __init__(self, cfg: OctoConfig, text_encoder: FrozenTextEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        # a plain attribute, not a submodule: frozen, shared, and never saved (see FrozenTextEncoder)
        if text_encoder is None:
            text_encoder = load_text_encoder(cfg.text_encoder)
        self.text_encoder = text_encoder
        if self.text_encoder.dim != cfg.text_dim:
            raise DivlaEvalError(
                f"text encoder {cfg.text_encoder!r} gives {self.text_encoder.dim}-d states, but this "
                f"{cfg.text_dim}-d model was trained with another encoder"
            )
        w, t = cfg.width, cfg.obs_horizon

        def position(*shape):  # learned position embeddings, Octo's N(0, 0.02) initialisation
            return nn.Parameter(torch.randn(*shape, w) * 0.02)

        self.text_proj = nn.Linear(cfg.text_dim, w)
        self.task_pos = position(cfg.max_text_tokens)
        self.tokenizers = nn.ModuleDict({c: PatchStem(cfg) for c in cfg.cameras})  # one per camera, as Octo
        self.proprio_proj = nn.Linear(cfg.proprio_dim, w)
        self.obs_pos = position(t, cfg.obs_tokens)
        self.readout_pos = position(t, cfg.num_readouts)  # readouts are position embeddings only (Octo)
        layer = nn.TransformerEncoderLayer(
            w, cfg.heads, cfg.mlp_dim, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(
            layer, cfg.layers, norm=nn.LayerNorm(w), enable_nested_tensor=False
        )
        # the optional keypoint path from the pixels to the head (`keypoint_condition`)
        self.keypoint_encoders = None
        if cfg.keypoint_condition > 0:
            self.keypoint_encoders = CameraKeypoints(
                cfg.cameras, cfg.keypoint_channels, cfg.keypoint_condition, cfg.keypoint_feature_dim
            )
        self.head = DiffusionMLPHead(cfg)
        # the robot's normalisation statistics: buffers, so they travel inside the weights file
        self._register_stats(cfg.action_dim, cfg.proprio_dim)
        self.train_scheduler, self.infer_scheduler = make_schedulers(cfg.train_diffusion_steps)

    # --- conditioning ---------------------------------------------------------------------------------
    def encode_text(self, instructions: list[str]) -> TextTokens:
        """The frozen encoder's token states for a batch of instructions, on the model's device."""
        text = self.text_encoder(list(instructions), self.cfg.max_text_tokens)
        dev = self.text_proj.weight.device
        return TextTokens(text.tokens.to(dev), text.mask.to(dev))

    def transformer_outputs(
        self, images: dict[str, torch.Tensor], proprio: torch.Tensor, text: TextTokens
    ) -> dict[str, torch.Tensor]:
        """images: camera -> float [B, T_o, 3, H, W] in [0, 1]; proprio: [B, T_o, P] (oldest first).
        Returns the output embeddings by group: task [B, L, W], obs [B, T_o, N, W], readout
        [B, T_o, R, W]."""
        cfg = self.cfg
        b, t = proprio.shape[:2]
        n_task = text.tokens.shape[1]
        task = self.text_proj(text.tokens) + self.task_pos[:n_task]
        patches = [self.tokenizers[c](images[c].flatten(0, 1)).view(b, t, -1, cfg.width) for c in cfg.cameras]
        proprio_token = self.proprio_proj(self.normalize_proprio(proprio))[:, :, None]
        obs = torch.cat([*patches, proprio_token], dim=2) + self.obs_pos[:t]
        readout = self.readout_pos[:t].expand(b, -1, -1, -1)
        seq = torch.cat([task, torch.cat([obs, readout], dim=2).flatten(1, 2)], dim=1)
        allowed = block_causal_mask(n_task, cfg.obs_tokens, cfg.num_readouts, t).to(seq.device)
        padding = torch.cat([~text.mask, text.mask.new_zeros(b, seq.shape[1] - n_task)], dim=1)
        out = self.transformer(seq, mask=~allowed, src_key_padding_mask=padding)
        steps = out[:, n_task:].view(b, t, cfg.obs_tokens + cfg.num_readouts, cfg.width)
        return {
            "task": out[:, :n_task],
            "obs": steps[:, :, : cfg.obs_tokens],
            "readout": steps[:, :, cfg.obs_tokens :],
        }

    def readout(
        self, images: dict[str, torch.Tensor], proprio: torch.Tensor, text: TextTokens
    ) -> torch.Tensor:
        """The mean of the last step's readout tokens [B, W] (the action chunk starts at the last
        observed step)."""
        return self.transformer_outputs(images, proprio, text)["readout"][:, -1].mean(1)

    def encode_keypoints(self, images: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The `keypoint_condition` path on each camera's latest image: [B, keypoint_dim], or None
        when the model has no such path."""
        if self.keypoint_encoders is None:
            return None
        return torch.cat(self.keypoint_encoders({c: v[:, -1] for c, v in images.items()}), dim=-1)

    def condition(
        self, images: dict[str, torch.Tensor], proprio: torch.Tensor, text: TextTokens
    ) -> torch.Tensor:
        """The head's condition [B, W + keypoint_dim]: the readout, then the keypoint features if any."""
        cond = self.readout(images, proprio, text)
        keypoints = self.encode_keypoints(images)
        return cond if keypoints is None else torch.cat([cond, keypoints], dim=-1)

    # --- training -------------------------------------------------------------------------------------
    def forward(
        self,
        images: dict[str, torch.Tensor],
        proprio: torch.Tensor,
        text: TextTokens,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The epsilon-prediction loss on raw `actions` [B, chunk, A]; chunks past a demo's end repeat
        its last action, as for the other diffusion heads."""
        cond = self.condition(images, proprio, text)
        x0 = self.normalize_actions(actions)
        noise, t = training_noise(x0.shape, self.cfg.train_diffusion_steps, generator, x0.device)
        noisy = self.train_scheduler.add_noise(x0, noise, t)
        return {"loss": F.mse_loss(self.head(noisy, t, cond), noise)}

    # --- inference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(
        self,
        images: dict[str, torch.Tensor],
        proprio: torch.Tensor,
        text: TextTokens,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        inference_steps: int | None = None,
    ) -> torch.Tensor:
        """A chunk of actions [B, chunk, A] in the robot's units. The transformer runs once; only
        the small head runs at every denoising step."""
        cond = self.condition(images, proprio, text)
        shape = (cond.shape[0], self.cfg.chunk, self.cfg.action_dim)
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=cond.device)
        # `inference_steps`: a policy's override of the config's DDIM steps (the config is left as is)
        steps = self.cfg.inference_steps if inference_steps is None else inference_steps
        x = ddim_sample(self.infer_scheduler, lambda x_t, t: self.head(x_t, t, cond), x, steps)
        return self.unnormalize_actions(x)
