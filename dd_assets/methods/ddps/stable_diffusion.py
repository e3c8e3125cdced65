"""Stable Diffusion v1.5 behind DDPS's :class:`~dd_assets.methods.ddps.diffusion.NoisePredictor`
(the paper's model, Sec. 3.1-3.2): a local diffusers folder checked
(:func:`missing_sd_components`) and loaded (:func:`load_diffusers_folder`) into a
:class:`StableDiffusionPredictor`.  Nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:   # imported where a folder is loaded (~1.3 s; definitions never need it)
    from diffusers import AutoencoderKL, UNet2DConditionModel

from dd_assets.methods.ddps.diffusion import _check_epsilon

#: Sec. 3.2: c = "An image of c", phi = "An image of ." (the template with an empty class).
DEFAULT_PROMPT_TEMPLATE = "An image of {}."


#: Subfolders of a diffusers SD v1.5 folder and the files each must hold (any of a group).
SD_COMPONENTS: dict[str, list[tuple[str, ...]]] = {
    "vae": [("config.json",), (
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin",
    )],
    "unet": [("config.json",), (
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin",
    )],
    "text_encoder": [("config.json",), (
        "model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin",
    )],
    "tokenizer": [("vocab.json",), ("merges.txt",)],
    "scheduler": [("scheduler_config.json",)],
}


def missing_sd_components(path: str | os.PathLike[str]) -> list[str]:
    """Which parts of a Stable Diffusion v1.5 diffusers folder are absent.

    Returns:
        e.g. ``["unet (no unet/config.json)", "tokenizer (no tokenizer/merges.txt)"]``;
        empty when the folder looks complete.
    """
    root = Path(path)
    missing: list[str] = []
    for sub, groups in SD_COMPONENTS.items():
        d = root / sub
        if not d.is_dir():
            missing.append(f"{sub} (no {sub}/ folder)")
            continue
        for group in groups:
            if not any((d / f).is_file() for f in group):
                missing.append(f"{sub} (no {sub}/{' or '.join(group)})")
    return missing


def _variant(folder: Path) -> str | None:
    """``"fp16"`` when a component folder only holds fp16-variant weights."""
    files = [p.name for p in folder.iterdir() if p.is_file()]
    weights = [f for f in files if f.endswith((".safetensors", ".bin"))]
    return "fp16" if weights and all(".fp16." in f for f in weights) else None


class StableDiffusionPredictor:
    """SD v1.5 behind the :class:`NoisePredictor` interface (latent space, Sec. 3.1).

    ``encode(x) = vae.encode(x).latent_dist.mean * scaling_factor`` (the posterior mean, so
    encoding is deterministic); ``predict_noise`` runs the U-Net with
    ``encoder_hidden_states = text_embeddings[cond_idx]``.

    Args:
        vae: ``AutoencoderKL``; unet: ``UNet2DConditionModel``; scheduler: DDPM-family
            scheduler (epsilon prediction).
        text_embeddings: ``[num_classes + 1, L, D]``, row ``i < num_classes`` the prompt of
            class ``i``, the last row the null prompt ``phi``.
        dtype: dtype the VAE/U-Net run in (float16 halves GPU memory); results are float32.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: Any,
        text_embeddings: torch.Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        _check_epsilon(scheduler)
        if text_embeddings.ndim != 3 or text_embeddings.shape[0] < 2:
            raise ValueError(
                f"text_embeddings must be [num_classes + 1, L, D] with >= 1 class, got {tuple(text_embeddings.shape)}"
            )
        self.vae = vae.eval()
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.dtype = dtype
        self.text_embeddings = text_embeddings.to(dtype)
        self.null_index = int(text_embeddings.shape[0] - 1)
        self.num_classes = self.null_index
        self.latent_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [-1, 1] -> ``[B, 4, H/8, W/8]`` float32 latents."""
        post = self.vae.encode(x.to(self.dtype)).latent_dist
        return (post.mean * self.scaling_factor).float()

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        """``eps_theta(z_t, t, c)`` (Eq. 3) -> float32 ``[B, 4, h, w]``."""
        emb = self.text_embeddings.to(z_t.device)[cond_idx.to(z_t.device)]
        out = self.unet(z_t.to(self.dtype), t.to(z_t.device), encoder_hidden_states=emb).sample
        return out.float()


def encode_prompts(
    tokenizer: Any,
    text_encoder: nn.Module,
    prompts: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> torch.Tensor:
    """CLIP last hidden states of ``prompts`` -> float32 ``[P, L, D]`` on CPU (padded to the
    tokenizer's ``model_max_length``, as SD's pipelines do)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            tok = tokenizer(
                list(prompts[start : start + batch_size]), padding="max_length",
                max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
            )
            out.append(text_encoder(tok.input_ids.to(device))[0].float().cpu())
    return torch.cat(out)


def load_diffusers_folder(
    path: str | os.PathLike[str],
    class_names: Sequence[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    null_prompt: str | None = None,
) -> StableDiffusionPredictor:
    """Load a local Stable Diffusion v1.5 folder (diffusers layout) for DDPS.

    The folder must hold ``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/`` and
    ``scheduler/`` (checked first, :func:`missing_sd_components`).  The scheduler is read as
    a ``DDPMScheduler`` from ``scheduler/scheduler_config.json`` (only its noise schedule is
    used).  Prompts ``prompt_template.format(name)`` per class and the null prompt
    ``phi`` (``null_prompt``, default ``prompt_template.format("")`` = ``"An image of ."``)
    are encoded once (Sec. 3.2).  E.g. ``prompt_template="a photo of a {}", null_prompt=""``
    gives the usual classifier-free-guidance pair.  Nothing is downloaded:
    every ``from_pretrained`` gets ``local_files_only=True``.

    Args:
        class_names: text of each class, index-aligned with the dataset's class indices.
        dtype: float16 on GPU halves memory; float32 on CPU.

    Raises:
        ValueError: the folder is missing components (each is named) or ``class_names`` is
            empty; ImportError: ``transformers`` (CLIP text encoder) is not installed.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(
            f"diffusion folder {os.fspath(path)!r} does not exist; put a Stable Diffusion v1.5 "
            "checkpoint in diffusers layout there (vae/, unet/, text_encoder/, tokenizer/, scheduler/) "
            "or leave the weights unset to train the small pixel-space model instead"
        )
    missing = missing_sd_components(root)
    if missing:
        raise ValueError(
            f"diffusion folder {os.fspath(root)!r} is incomplete: missing {'; '.join(missing)}. "
            "Copy the complete Stable Diffusion v1.5 diffusers folder there (e.g. a local "
            "snapshot of runwayml/stable-diffusion-v1-5 with vae/, unet/, text_encoder/, "
            "tokenizer/, scheduler/), or leave the weights unset to train the small pixel-space model"
        )
    if not class_names:
        raise ValueError("class_names is empty; DDPS needs one prompt per class")
    if "{}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{}}' for the class name, got {prompt_template!r}")
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading Stable Diffusion's text encoder needs the 'transformers' package; "
            "install it (pip install transformers) or use the small pixel-space model"
        ) from exc
    local = dict(local_files_only=True)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype,
                                        variant=_variant(root / "vae"), **local)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype,
                                                variant=_variant(root / "unet"), **local)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", **local)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype,
                                                 variant=_variant(root / "text_encoder"), **local)
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", **local)
    text_encoder = text_encoder.to(device).eval()
    null = prompt_template.format("") if null_prompt is None else null_prompt
    prompts = [prompt_template.format(n) for n in class_names] + [null]
    emb = encode_prompts(tokenizer, text_encoder, prompts, device)
    del text_encoder
    return StableDiffusionPredictor(vae.to(device), unet.to(device), scheduler, emb.to(device), dtype)
