"""RDED: realistic and diverse crops scored by a teacher (Sun et al., CVPR 2024).

"On the Diversity and Realism of Distilled Dataset", reference code ``LINs-lab/RDED``
(``synthesize/main.py``, ``synthesize/utils.py``). Per class:

1. Load a pool of ``mipc`` real images (default 300; the pool is the caller's job).
2. From every image draw ``num_crop`` square RandomResizedCrop boxes (``K = 5``,
   ``scale=(0.08, 1)``, ``ratio=(1, 1)``) and resize each crop to the tile size
   ``input_size // factor``.
3. Score each crop with the teacher: cross-entropy ``-log softmax(logits)[label]`` (the
   "realism" score; lower = the teacher finds it more typical of the class). RDED zero-pads
   the normalized tile back to ``input_size`` before the forward pass; :func:`score_class`
   does the same by default (``pad=True``).
4. Keep per image its lowest-CE crop (one candidate per image), then keep the
   ``ipc * factor**2`` lowest-CE candidates of the class (:func:`select_lowest`).
5. Stitch them ``factor x factor`` into ``ipc`` images (``dd_assets.defs.composition``);
   students are then trained on them with teacher soft labels.

Defaults: ``factor = 2`` for inputs of 64 px and more (Tiny-ImageNet, ImageNet subsets),
``factor = 1`` for 32 px inputs (CIFAR), ``num_crop = 5``, ``mipc = 300``.

Stages registered here: ``("score", "rded")`` -> :func:`score_class`,
``("select", "rded")`` -> :func:`select_lowest`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dd_assets.core.device_loops import check_inference_options, inference_context, upload
from dd_assets.core.imaging import as_tensor, class_inputs, crop_resize
from dd_assets.core.types import CandidateCrops

DEFAULT_NUM_CROP = 5
DEFAULT_MIPC = 300


def default_factor(input_size: int) -> int:
    """RDED's tiling factor: 2 for inputs of 64 px and more, 1 below (CIFAR 32 px)."""
    return 2 if input_size >= 64 else 1


def class_generator(seed: int, class_index: int) -> torch.Generator:
    """CPU generator for the crop boxes of one class (independent stream per class)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + class_index)


def sample_crop_boxes(
    height: int,
    width: int,
    num_crop: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
) -> np.ndarray:
    """Square RandomResizedCrop boxes, drawn only from ``generator``.

    Same rule and the same random draws, in the same order, as torchvision's
    ``RandomResizedCrop.get_params(img, scale, ratio=(1, 1))``: up to 10 tries of
    (area fraction ~ U(scale), log-aspect ~ U(0, 0), top, left), else the central
    fallback crop (``min(height, width)`` square).

    Returns:
        ``[num_crop, 4] int32`` boxes ``(x0, y0, x1, y1)`` with ``x1 - x0 == y1 - y0``.
    """
    if num_crop < 1:
        raise ValueError(f"num_crop must be >= 1, got {num_crop}")
    area = height * width
    out = np.empty((num_crop, 4), dtype=np.int32)
    for n in range(num_crop):
        i, j, h, w = _get_params(height, width, area, generator, scale)
        out[n] = (j, i, j + w, i + h)
    return out


def _get_params(
    height: int, width: int, area: int, g: torch.Generator, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect_ratio = math.exp(torch.empty(1).uniform_(0.0, 0.0, generator=g).item())
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return i, j, h, w
    side = min(height, width)  # ratio (1, 1) fallback: central square
    return (height - side) // 2, (width - side) // 2, side, side


def _pad_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad ``[B, C, h, w]`` to ``[B, C, size, size]`` (RDED's ``pad``; extra pixel bottom/right)."""
    dv, dh = size - x.shape[-2], size - x.shape[-1]
    if dv < 0 or dh < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} to {size}")
    return F.pad(x, (dh // 2, dh - dh // 2, dv // 2, dv - dv // 2))


def score_crops(
    model: torch.nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    boxes: np.ndarray | torch.Tensor,
    out_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    pad_to: int | None = None,
    stat: str = "ce",
    precision: str = "fp32",
    channels_last: bool = False,
) -> np.ndarray:
    """Cross-entropy (``stat="ce"``, RDED) or highest softmax probability
    (``stat="max_prob"``, NRR-DD's confidence) of every crop under ``model``.

    Crop ``k`` of image ``n`` is ``boxes[n, k]`` of ``images[n]`` as float [0, 1], resized
    to ``out_size x out_size`` (``imaging.crop_resize``), normalized with ``mean``/``std``
    and, when ``pad_to`` is given, zero-padded (centred) to ``pad_to x pad_to``.
    All ``N * K`` crops are flattened image-major and forwarded ``batch_size`` crops at a
    time as one stacked tensor, under ``torch.no_grad()`` with the model in eval mode
    (its training flag is restored afterwards). ``model`` must already be on ``device``.
    The scores stay on the device until the loop ends and come back in one transfer.
    ``precision="bf16"`` / ``channels_last=True`` (CUDA only, else ``ValueError``):
    :func:`dd_assets.core.device_loops.inference_context`; the defaults change nothing.

    Args:
        images: uint8 ``[N, C, H, W]``.
        labels: ``[N]`` int64 class index of each image.
        boxes: ``[N, K, 4]`` integer ``(x0, y0, x1, y1)``.

    Returns:
        ``[N, K] float32`` values of ``-log softmax(logits)[label]`` (or ``max softmax``).
    """
    if stat not in ("ce", "max_prob"):
        raise ValueError(f"stat must be 'ce' or 'max_prob', got {stat!r}")
    imgs = as_tensor(images)
    bx = boxes.cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    bx = bx.astype(np.int64)
    if bx.ndim != 3 or bx.shape[0] != imgs.shape[0] or bx.shape[2] != 4:
        raise ValueError(f"boxes must be [N={imgs.shape[0]}, K, 4], got {bx.shape}")
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if lab.shape[0] != imgs.shape[0]:
        raise ValueError(f"{lab.shape[0]} labels for {imgs.shape[0]} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_inference_options(device, precision, channels_last)
    n_img, k = bx.shape[:2]
    total = n_img * k
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    lab = lab.to(device)
    parts: list[torch.Tensor] = []  # per-batch float32 scores, left on the device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), inference_context(model, device, precision, channels_last) as forward:
            for start in range(0, total, batch_size):
                stop = min(start + batch_size, total)
                n0, n1 = start // k, (stop - 1) // k + 1
                pix = upload(imgs[n0:n1], device).float().div_(255.0)
                crops = [
                    crop_resize(pix[j // k - n0], bx[j // k, j % k], (out_size, out_size))
                    for j in range(start, stop)
                ]
                x = (torch.stack(crops) - m) / s
                if pad_to is not None:
                    x = _pad_center(x, pad_to)
                logp = F.log_softmax(forward(x).float(), dim=1)
                if stat == "max_prob":
                    parts.append(logp.max(dim=1).values.exp())
                else:
                    y = lab[torch.arange(start, stop, device=device) // k]
                    parts.append(-logp.gather(1, y[:, None])[:, 0])
    finally:
        model.train(was_training)
    out = torch.cat(parts).cpu() if parts else torch.empty(0, dtype=torch.float32)  # the one transfer
    return out.view(n_img, k).numpy()


def score_class(
    model: torch.nn.Module,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    source_ids: np.ndarray,
    num_crop: int,
    out_size: int,
    factor: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
    class_index: int,
    scale: tuple[float, float] = (0.08, 1.0),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    pad: bool = True,
    precision: str = "fp32",
    channels_last: bool = False,
) -> CandidateCrops:
    """RDED scoring of one class: the most realistic (lowest-CE) crop of every image.

    Images are visited in ascending ``source_id`` order; for each, ``num_crop`` boxes are
    drawn (:func:`sample_crop_boxes`) from one generator seeded with
    ``seed * 1_000_003 + class_index``, so the result does not depend on input order.
    Crops are scored at the tile size ``out_size // factor`` (zero-padded to ``out_size``
    when ``pad`` and ``factor > 1``, as the reference code does).

    Args:
        images: uint8 ``[N, C, H, W]`` pool of the class (RDED: ``mipc`` = 300 images).
        labels: ``[N]`` class index per image.
        source_ids: ``[N]`` unique manifest ids.
        out_size: side of the distilled image (the teacher's input size).
        factor: tiles per side (RDED: 2 for >= 64 px, 1 for 32 px).
        precision, channels_last: CUDA-only speed switches of the teacher forward
            (:func:`score_crops`); the defaults (fp32, contiguous) change nothing.

    Returns:
        :class:`CandidateCrops` with one candidate per image, sorted by ``source_id``:
        ``boxes [N, 4] int32`` the kept crop, ``score [N] float32`` its CE.
        Ties between crops of one image go to the earlier-drawn crop.
    """
    imgs, lab, ids = class_inputs(images, labels, source_ids, class_index)
    n = imgs.shape[0]
    if factor < 1 or out_size // factor < 1:
        raise ValueError(f"bad factor {factor} for out_size {out_size}")
    check_inference_options(device, precision, channels_last)
    order = np.argsort(ids, kind="stable")
    g = class_generator(seed, class_index)
    h, w = imgs.shape[-2:]
    boxes = np.stack([sample_crop_boxes(h, w, num_crop, g, scale) for _ in range(n)])
    ce = score_crops(
        model,
        imgs[torch.from_numpy(order)],
        lab[order],
        boxes,
        out_size // factor,
        mean,
        std,
        batch_size=batch_size,
        device=device,
        pad_to=out_size if (pad and factor > 1) else None,
        precision=precision,
        channels_last=channels_last,
    )
    best = np.argmin(ce, axis=1)
    rows = np.arange(n)
    return CandidateCrops(
        class_index=class_index,
        source_id=ids[order],
        boxes=boxes[rows, best].astype(np.int32),
        score=ce[rows, best].astype(np.float32),
    )


def select_lowest(cands: CandidateCrops, n: int) -> np.ndarray:
    """Indices of the ``n`` lowest-score candidates, ascending score, ties by index.

    Returns:
        ``[n] int64`` indices into ``cands`` (RDED: ``n = ipc * factor**2``).
    """
    k = len(cands.score)
    if n < 1:
        raise ValueError(f"class {cands.class_index}: n must be >= 1, got {n}")
    if n > k:
        raise ValueError(
            f"class {cands.class_index} has {k} candidate crops, fewer than n={n}"
        )
    return np.argsort(cands.score, kind="stable")[:n].astype(np.int64)
