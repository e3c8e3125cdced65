"""The small class-conditional pixel-space diffusion model DDPS uses when no Stable Diffusion
weights exist (ours): :class:`ClassConditionalUNet` (a
:class:`~dd_assets.methods.ddps.diffusion.NoisePredictor`), its training with
classifier-free condition dropout (:func:`train_class_diffusion`), its checkpoint
(:func:`save_pixel_diffusion`, :func:`load_pixel_diffusion`) and its config from the params
block ``diffusion`` (:func:`pixel_config`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.methods.ddps.diffusion import add_noise

PIXEL_FORMAT_VERSION = 1
PIXEL_KIND = "ddps_pixel_diffusion"


@dataclass
class PixelDiffusionConfig:
    """Tiny class-conditional pixel-space diffusion model (ours; used when no SD weights).

    Architecture: ``UNet2DConditionModel`` with ``block_out_channels``, ``layers_per_block``,
    cross-attention down/up blocks at levels ``>= attention_from_level`` (0 = full resolution;
    1 skips the full-resolution level, whose 1024-token self-attention at 32 px costs half of a
    training step on CPU) and plain blocks elsewhere, attention on
    ``encoder_hidden_states = class_embedding[cond][:, None]`` ``[B, 1, cross_attention_dim]``.
    Schedule: ``DDPMScheduler(num_train_timesteps, beta_schedule, epsilon prediction)``.
    Training: AdamW(``lr``, ``weight_decay``), ``steps`` steps of ``batch_size``, condition
    dropout ``cond_dropout`` (classifier-free guidance training), grad-norm clip ``grad_clip``
    (0 = off), seeded by ``seed``.
    """

    image_size: int = 32
    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    attention_from_level: int = 0
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    cond_dropout: float = 0.1
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if len(self.block_out_channels) < 1 or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"block_out_channels {self.block_out_channels} must be non-empty multiples of "
                f"norm_num_groups={self.norm_num_groups}"
            )
        if not 0 <= self.attention_from_level < len(self.block_out_channels):
            raise ValueError(
                f"attention_from_level must be in [0, {len(self.block_out_channels) - 1}] (one level per "
                f"block_out_channels entry), got {self.attention_from_level}"
            )
        div = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size % div:
            raise ValueError(f"image_size={self.image_size} must be divisible by {div} (one halving per extra block)")


def pixel_config(d: dict, image_size: int) -> PixelDiffusionConfig:
    """The small pixel model of params block ``diffusion``, trained at the working resolution."""
    return PixelDiffusionConfig(
        image_size=int(image_size), block_out_channels=tuple(int(c) for c in d["block_out_channels"]),
        layers_per_block=int(d["layers_per_block"]), cross_attention_dim=int(d["cross_attention_dim"]),
        attention_head_dim=int(d["attention_head_dim"]),
        attention_from_level=int(d.get("attention_from_level", 0)), num_train_timesteps=int(d["num_train_timesteps"]),
        cond_dropout=float(d["cond_dropout"]), steps=int(d["steps"]), batch_size=int(d["batch_size"]),
        lr=float(d["lr"]), seed=int(d["seed"]),
    )


class ClassConditionalUNet(nn.Module):
    """Pixel-space ``eps_theta(x_t, t, c)`` with learned class embeddings; a :class:`NoisePredictor`.

    ``cond_idx`` in ``[0, num_classes]``; ``num_classes`` is the null condition ``phi``.
    ``encode`` is the identity (``latent_scale = 1``).
    """

    latent_scale = 1

    def __init__(self, cfg: PixelDiffusionConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.null_index = int(num_classes)
        n = len(cfg.block_out_channels)
        down = tuple("CrossAttnDownBlock2D" if i >= cfg.attention_from_level else "DownBlock2D" for i in range(n))
        up = tuple(reversed(["CrossAttnUpBlock2D" if i >= cfg.attention_from_level else "UpBlock2D" for i in range(n)]))
        from diffusers import DDPMScheduler, UNet2DConditionModel   # lazy: ~1.3 s, only when a model is built

        self.unet = UNet2DConditionModel(
            sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            down_block_types=down, up_block_types=up, cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups,
        )
        self.class_embedding = nn.Embedding(num_classes + 1, cfg.cross_attention_dim)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
            prediction_type="epsilon",
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Identity (pixel space): ``[B, C, H, W]`` in [-1, 1] -> float32 copy."""
        return x.float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        """``x_t [B, C, H, W]``, ``t [B]`` long, ``cond_idx [B]`` long -> ``eps [B, C, H, W]``."""
        ctx = self.class_embedding(cond_idx.to(x_t.device))[:, None, :]  # [B, 1, D]
        return self.unet(x_t, t.to(x_t.device), encoder_hidden_states=ctx).sample

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        """:class:`NoisePredictor` entry point (float32 out)."""
        return self(z_t.float(), t, cond_idx).float()


def drop_condition(cond: torch.Tensor, p: float, null_index: int, generator: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance training: each ``cond [B]`` entry becomes ``null_index`` with
    probability ``p`` (uniforms drawn on CPU from ``generator``)."""
    drop = torch.rand(cond.shape[0], generator=generator) < p
    return torch.where(drop.to(cond.device), torch.full_like(cond, null_index), cond)


def _batches(
    data: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor | np.ndarray | None,
    batch_size: int,
    generator: torch.Generator,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) batches: seeded shuffled epochs of tensors, or repeated passes of an iterable."""
    if isinstance(data, torch.Tensor):
        if labels is None:
            raise ValueError("labels is required when data is a tensor")
        y_all = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels),
                                dtype=torch.long).reshape(-1)
        if data.ndim != 4 or y_all.shape[0] != data.shape[0] or data.shape[0] == 0:
            raise ValueError(f"data must be [N, C, H, W] with N = len(labels) > 0, got {tuple(data.shape)} and {y_all.shape[0]} labels")
        n = data.shape[0]
        while True:
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                yield data[idx], y_all[idx]
    else:
        while True:
            empty = True
            for x, y in data:
                empty = False
                yield x, torch.as_tensor(y, dtype=torch.long)
            if empty:
                raise ValueError("data yielded no batches")


def train_class_diffusion(
    data: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor | np.ndarray | None,
    num_classes: int,
    cfg: PixelDiffusionConfig,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    resume: dict | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
) -> tuple[ClassConditionalUNet, list[float]]:
    """Train the small class-conditional pixel diffusion model (Eq. 3 objective).

    Per step: a batch ``(x_0, y)``; ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``;
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; ``y`` replaced by the null index with
    probability ``cfg.cond_dropout`` (so ``eps_theta(., ., phi)`` is learned too);
    loss ``mean ||eps_theta(x_t, t, y) - eps||^2``.  All random draws come from CPU
    generators seeded by ``cfg.seed`` (same seed and data -> same loss curve on CPU).

    Args:
        data: normalized float images ``[N, C, H, W]`` in [-1, 1] (with ``labels [N]``), or a
            re-iterable of ``(x [B, C, H, W] in [-1, 1], y [B])`` batches (``labels=None``),
            e.g. a DataLoader; it is iterated again when exhausted.
        num_classes: class count; embeddings ``0..num_classes-1`` plus null ``num_classes``.
        on_step: ``on_step(step, loss)`` after every optimizer step.
        on_checkpoint, checkpoint_every: every ``checkpoint_every`` steps (0: never) the training
            state -- step, model and optimizer state, the generator's state, the losses so far
            and the batches drawn -- is handed to ``on_checkpoint`` (the asset saves it).
        resume: such a state: training continues from its step and ends exactly as an
            uninterrupted run (same weights, bit for bit on CPU); only for re-iterable ``data``
            (its passes are replayed up to the state's position; a tensor's shuffles draw
            from the same generator as the noise, so they cannot be replayed apart).

    Returns:
        ``(model in eval mode on device, losses)`` with ``len(losses) == cfg.steps``.
    """
    if cfg.steps < 0 or cfg.batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got {cfg.steps}, {cfg.batch_size}")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(cfg.seed)
        model = ClassConditionalUNet(cfg, num_classes).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    t_max = cfg.num_train_timesteps
    losses: list[float] = []
    it = iter(_batches(data, labels, cfg.batch_size, g))
    first = 0
    if resume is not None:
        if isinstance(data, torch.Tensor):
            raise ValueError("resume needs re-iterable batches, not a tensor (see the docstring)")
        if not 0 < int(resume["step"]) <= cfg.steps:
            raise ValueError(f"resume state at step {resume['step']} does not fit a run of {cfg.steps} steps")
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        g.set_state(resume["generator"])
        losses = [float(v) for v in resume["losses"]]
        for _ in range(int(resume["batches"])):   # replay the passes up to the same batch
            next(it)
        first = int(resume["step"])
    for step in range(first, cfg.steps):
        if on_checkpoint is not None and checkpoint_every > 0 and step > first and step % checkpoint_every == 0:
            on_checkpoint({"step": step, "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                           "opt": copy.deepcopy(opt.state_dict()), "generator": g.get_state(),
                           "losses": list(losses), "batches": step})
        x0, y = next(it)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"labels must be in [0, num_classes={num_classes}), got range [{int(y.min())}, {int(y.max())}]")
        x0 = x0.to(device).float()
        b = x0.shape[0]
        t = torch.randint(0, t_max, (b,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        cond = drop_condition(y, cfg.cond_dropout, model.null_index, g)
        x_t = add_noise(model.scheduler, x0, eps.to(device), t.to(device))
        loss = F.mse_loss(model(x_t, t.to(device), cond.to(device)), eps.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return model.eval(), losses


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def save_pixel_diffusion(
    path: str | os.PathLike[str],
    model: ClassConditionalUNet,
    class_names: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Atomically write ``{kind, format_version, config, num_classes, class_names, extra, state_dict}``."""
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class_names for a model with {model.num_classes} classes")
    payload = {
        "kind": PIXEL_KIND,
        "format_version": PIXEL_FORMAT_VERSION,
        "config": _plain(asdict(model.cfg)),
        "num_classes": model.num_classes,
        "class_names": [str(c) for c in class_names],
        "extra": _plain(dict(extra or {})),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_pixel_diffusion(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[ClassConditionalUNet, dict[str, Any]]:
    """Rebuild a model written by :func:`save_pixel_diffusion` -> ``(model in eval mode, meta)``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"diffusion checkpoint {os.fspath(path)!r} (parameter 'path') does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(obj, dict) and obj.get("kind") == PIXEL_KIND):
        raise ValueError(f"{os.fspath(path)!r} is not a DDPS pixel diffusion checkpoint")
    if obj["format_version"] > PIXEL_FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)!r} has format_version {obj['format_version']} > {PIXEL_FORMAT_VERSION}")
    cfg = PixelDiffusionConfig(**obj["config"])
    model = ClassConditionalUNet(cfg, obj["num_classes"])
    model.load_state_dict(obj["state_dict"], strict=True)
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model.to(device).eval(), meta
