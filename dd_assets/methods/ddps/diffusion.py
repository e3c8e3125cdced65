"""Diffusion models for DDPS: the interface and the noise schedule (pure torch, no Dagster).

DDPS ("Efficient Dataset Distillation via Diffusion-Driven Patch Selection", Sec. 3.1-3.3)
only needs a conditional noise predictor ``eps_theta(z_t, t, c)`` (Eq. 3), its noise
schedule (Eq. 1) and, for DIFT features, the U-Net's up blocks.  Two backends provide this
through one small interface, :class:`NoisePredictor`:

* :class:`~dd_assets.methods.ddps.stable_diffusion.StableDiffusionPredictor` -- a local
  Stable Diffusion v1.5 folder (the paper's model) loaded with
  :func:`~dd_assets.methods.ddps.stable_diffusion.load_diffusers_folder`: VAE encoder ``E``
  (Sec. 3.1), text prompts ``"An image of {class}."`` and the null prompt ``"An image of ."``
  (Sec. 3.2) encoded once by the CLIP text encoder.  Nothing is downloaded
  (``local_files_only=True``).
* :class:`~dd_assets.methods.ddps.pixel_diffusion.ClassConditionalUNet` -- when no weights
  exist: a tiny pixel-space ``diffusers.UNet2DConditionModel`` conditioned on one learned
  embedding per class plus a null embedding (index ``num_classes``), trained here with
  classifier-free condition dropout by
  :func:`~dd_assets.methods.ddps.pixel_diffusion.train_class_diffusion` (our substitute; the
  paper uses SD v1.5).

Noising (Eq. 1) is the DDPM forward process of the model's scheduler,
``z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps`` (:func:`add_noise`); the paper's Eq. 1 writes
``sqrt(a_t) z + (1 - sqrt(a_t)) eps``, which is not variance preserving and not what SD was
trained with, so we use the scheduler's form (see ``docs/ddps.md``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch

from dd_assets.core.device_loops import upload


@runtime_checkable
class NoisePredictor(Protocol):
    """What DDPS needs from a diffusion model.

    Attributes:
        scheduler: a diffusers scheduler with ``alphas_cumprod [T]`` (``T`` training steps)
            and ``config.prediction_type == "epsilon"``.
        null_index: condition index of the null / unconditional prompt ``phi``.
        latent_scale: image pixels per latent cell (8 for SD's VAE, 1 in pixel space).
        unet: the ``UNet2DConditionModel`` run by :meth:`predict_noise` (DIFT hooks its
            ``up_blocks``); may be absent for predictors that are not U-Nets (tests).
    """

    scheduler: Any
    null_index: int
    latent_scale: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> latents ``z = E(x)`` ``[B, c, H/s, W/s]`` float32."""
        ...

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        """``eps_theta(z_t, t, c)`` (Eq. 3): ``z_t [B, c, h, w]``, ``t [B]`` long, ``cond_idx [B]``
        long -> float32 ``[B, c, h, w]``."""
        ...


def num_timesteps(scheduler: Any) -> int:
    """Number of training timesteps ``T`` of a diffusers scheduler."""
    return int(len(scheduler.alphas_cumprod))


def add_noise(scheduler: Any, z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DDPM forward process (our reading of Eq. 1): ``sqrt(abar_t) z + sqrt(1 - abar_t) eps``.

    Args:
        z: clean latents ``[B, c, h, w]``; eps: noise of the same shape; t: ``[B]`` long.

    Returns:
        ``z_t`` ``[B, c, h, w]`` (same as ``scheduler.add_noise``, computed in float32).
    """
    ab = upload(scheduler.alphas_cumprod.to(dtype=torch.float32), z.device)[upload(t, z.device)]
    ab = ab.view(-1, *([1] * (z.ndim - 1)))
    return ab.sqrt() * z.float() + (1.0 - ab).sqrt() * eps.float()


def _check_epsilon(scheduler: Any) -> None:
    pred = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(
            f"DDPS needs an epsilon-prediction model (Eq. 2-3), the scheduler says prediction_type={pred!r}"
        )


def timestep_from_fraction(frac: float, scheduler: Any) -> int:
    """``floor(frac * T)`` clipped to ``[0, T - 1]`` (paper time steps are given as fractions)."""
    t = num_timesteps(scheduler)
    return int(min(max(math.floor(frac * t), 0), t - 1))
