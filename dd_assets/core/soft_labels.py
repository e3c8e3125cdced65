"""FKD-style replayable soft labels.

Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition" (ECCV 2022):
instead of running the teacher at every student step, store for each distilled image and
each of ``E`` epochs the *augmentation parameters* of the view the student will see,
plus the teacher's top-k logits on exactly that view.  The student replays the view
bit-for-bit from the parameters (:func:`render_views`) and reads its target from
storage (:meth:`SoftLabels.dense_logits`).

A view of image ``i`` at epoch ``e`` is::

    own     = flip?(resize_S(crop(image_i, crop[i, e])))
    partner = flip?(resize_S(crop(image_p, crop[p, e])))     # p = partner[i, e], ITS view e
    view    = own with view[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]   # mix_box[i, e]

With RandAugment (optional, NRR-DD's student recipe; :mod:`dd_assets.core.randaugment`)
each of ``own`` and ``partner`` also gets its own view's ops ``ra_ops[., e]`` after the flip.

``lam[i, e]`` is the fraction of ``view`` that comes from ``own`` (1 - box area / S^2).
Partners index the whole distilled set, so replay does not depend on batch composition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dd_assets.core.device_loops import check_inference_options, inference_context
from dd_assets.core.imaging import as_tensor, crop_resize
from dd_assets.core.randaugment import DEFAULT_BINS, apply_ops, sample_ops


@dataclass
class ViewParams:
    """Augmentation parameters of ``E`` views of each of ``N`` images of size ``S x S``.

    ``crop [N, E, 4] int16``: (x0, y0, x1, y1) RandomResizedCrop box in image pixels;
    ``flip [N, E] bool``: horizontal flip after the crop;
    ``partner [N, E] int32``: CutMix partner (index into the whole set, may equal self);
    ``mix_box [N, E, 4] int16``: (x0, y0, x1, y1) region pasted from the partner's view, in
    output pixels; all zeros = no CutMix;
    ``lam [N, E] float32``: area fraction of the output that comes from the image itself.

    Optional RandAugment (None when off, and then nothing of it is stored):
    ``ra_ops [N, E, K] int8``: indices into :data:`~dd_assets.core.randaugment.OPS`, applied
    in order after the flip; ``ra_sign [N, E, K] int8``: +1 / -1 (negated signed op);
    ``ra_magnitude`` / ``ra_bins``: the magnitude bin and the number of bins, stored so a
    replay does not depend on code defaults.
    """

    crop: np.ndarray
    flip: np.ndarray
    partner: np.ndarray
    mix_box: np.ndarray
    lam: np.ndarray
    ra_ops: np.ndarray | None = None
    ra_sign: np.ndarray | None = None
    ra_magnitude: int | None = None
    ra_bins: int | None = None

    def __post_init__(self) -> None:
        n, e = self.flip.shape
        shapes = {
            "crop": (self.crop.shape, (n, e, 4)),
            "partner": (self.partner.shape, (n, e)),
            "mix_box": (self.mix_box.shape, (n, e, 4)),
            "lam": (self.lam.shape, (n, e)),
        }
        bad = {k: got for k, (got, want) in shapes.items() if got != want}
        if bad:
            raise ValueError(f"ViewParams arrays disagree with flip {self.flip.shape}: {bad}")
        ra = (self.ra_ops, self.ra_sign, self.ra_magnitude, self.ra_bins)
        if any(v is not None for v in ra):
            if any(v is None for v in ra):
                raise ValueError("RandAugment needs ra_ops, ra_sign, ra_magnitude and ra_bins together")
            if self.ra_ops.shape != self.ra_sign.shape or self.ra_ops.ndim != 3 or self.ra_ops.shape[:2] != (n, e):
                raise ValueError(f"ra_ops {self.ra_ops.shape} / ra_sign {self.ra_sign.shape} disagree with [{n}, {e}, K]")

    @property
    def has_randaugment(self) -> bool:
        """Whether the views carry RandAugment ops (NRR-DD's student recipe)."""
        return self.ra_ops is not None

    @property
    def num_images(self) -> int:
        return int(self.flip.shape[0])

    @property
    def epochs(self) -> int:
        return int(self.flip.shape[1])

    def nbytes(self) -> int:
        """Bytes held by the view arrays (the five, plus the RandAugment ones when present)."""
        return int(sum(a.nbytes for a in self.to_arrays().values()))

    KEYS = ("crop", "flip", "partner", "mix_box", "lam")
    RA_KEYS = ("ra_ops", "ra_sign", "ra_magnitude", "ra_bins")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name (inverse: :meth:`from_arrays`): the five, and the RandAugment ones
        only when present (so views without RandAugment store exactly what they always did)."""
        out = {k: getattr(self, k) for k in self.KEYS}
        if self.has_randaugment:
            out |= {"ra_ops": self.ra_ops, "ra_sign": self.ra_sign,
                    "ra_magnitude": np.asarray(self.ra_magnitude, np.int64),
                    "ra_bins": np.asarray(self.ra_bins, np.int64)}
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ViewParams:
        """Rebuild from stored arrays (extra keys are ignored), with the canonical dtypes."""
        ra = {}
        if "ra_ops" in arrays:
            ra = {"ra_ops": np.asarray(arrays["ra_ops"], np.int8), "ra_sign": np.asarray(arrays["ra_sign"], np.int8),
                  "ra_magnitude": int(np.asarray(arrays["ra_magnitude"]).reshape(-1)[0]),
                  "ra_bins": int(np.asarray(arrays["ra_bins"]).reshape(-1)[0])}
        return cls(
            crop=np.asarray(arrays["crop"], np.int16),
            flip=np.asarray(arrays["flip"], bool),
            partner=np.asarray(arrays["partner"], np.int32),
            mix_box=np.asarray(arrays["mix_box"], np.int16),
            lam=np.asarray(arrays["lam"], np.float32),
            **ra,
        )


def _rrc_boxes(
    rng: np.random.Generator, n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> np.ndarray:
    """torchvision ``RandomResizedCrop.get_params`` for ``n`` square ``size`` images, vectorized.

    10 attempts per image; the first valid one wins; fallback is the whole image
    (torchvision's fallback for a square image).  Returns ``[n, 4] int64`` (x0, y0, x1, y1).
    """
    attempts = 10
    area = size * size
    target = area * rng.uniform(scale[0], scale[1], size=(n, attempts))
    log_r = rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=(n, attempts))
    aspect = np.exp(log_r)
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    u_x = rng.random((n, attempts))
    u_y = rng.random((n, attempts))
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    found = ok[rows, first]
    w, h = w[rows, first], h[rows, first]
    x0 = np.minimum((u_x[rows, first] * (size - w + 1)).astype(np.int64), size - w)
    y0 = np.minimum((u_y[rows, first] * (size - h + 1)).astype(np.int64), size - h)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    boxes[~found] = (0, 0, size, size)
    return boxes


#: second entropy word of the RandAugment stream (``default_rng([seed, RA_STREAM])``): "RA"
RA_STREAM = 0x5241


def sample_views(
    n: int,
    epochs: int,
    size: int,
    seed: int,
    scale: tuple[float, float] = (0.08, 1.0),
    cutmix_alpha: float = 1.0,
    cutmix_prob: float = 1.0,
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    randaugment: tuple[int, int] | None = None,
) -> ViewParams:
    """Sample ``epochs`` views of each of ``n`` images of size ``size x size``.

    Uses only ``np.random.default_rng(seed)``; the same random numbers are drawn whatever
    ``cutmix_prob`` is (disabled CutMix only blanks the box), so crops/flips/partners do
    not change when CutMix is switched off.  ``cutmix_alpha <= 0`` disables CutMix.

    ``randaugment = (num_ops, magnitude)`` adds RandAugment ops (``num_ops`` per view, bin
    ``magnitude`` of 31) drawn from a separate stream, ``default_rng([seed, RA_STREAM])``, so the
    crops, flips and CutMix are byte-identical with and without it (a paired comparison).
    """
    if n < 1 or epochs < 1 or size < 1:
        raise ValueError(f"need n, epochs, size >= 1, got {n}, {epochs}, {size}")
    rng = np.random.default_rng(seed)
    crop = np.empty((n, epochs, 4), np.int16)
    flip = np.empty((n, epochs), bool)
    partner = np.empty((n, epochs), np.int32)
    mix_box = np.zeros((n, epochs, 4), np.int16)
    lam = np.ones((n, epochs), np.float32)
    for e in range(epochs):
        crop[:, e] = _rrc_boxes(rng, n, size, scale, ratio)
        flip[:, e] = rng.random(n) < 0.5
        partner[:, e] = rng.integers(0, n, size=n)
        beta = rng.beta(max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3), size=n)
        cx = rng.integers(0, size, size=n)
        cy = rng.integers(0, size, size=n)
        apply = rng.random(n) < cutmix_prob
        if cutmix_alpha <= 0:
            apply[:] = False
        cut = (size * np.sqrt(1.0 - beta)).astype(np.int64)
        x0 = np.clip(cx - cut // 2, 0, size)
        x1 = np.clip(cx + cut // 2, 0, size)
        y0 = np.clip(cy - cut // 2, 0, size)
        y1 = np.clip(cy + cut // 2, 0, size)
        apply &= (x1 > x0) & (y1 > y0)
        box = np.stack([x0, y0, x1, y1], axis=1)
        box[~apply] = 0
        mix_box[:, e] = box
        lam[:, e] = (1.0 - (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]) / float(size * size)).astype(
            np.float32
        )
    ra = {}
    if randaugment is not None:
        num_ops, magnitude = (int(v) for v in randaugment)
        if not 0 <= magnitude < DEFAULT_BINS:
            raise ValueError(f"RandAugment magnitude {magnitude} outside [0, {DEFAULT_BINS})")
        ops, sign = sample_ops(np.random.default_rng([seed, RA_STREAM]), n, epochs, num_ops)
        ra = {"ra_ops": ops, "ra_sign": sign, "ra_magnitude": magnitude, "ra_bins": DEFAULT_BINS}
    return ViewParams(crop=crop, flip=flip, partner=partner, mix_box=mix_box, lam=lam, **ra)


def _one_view(img01: torch.Tensor, views: ViewParams, i: int, e: int, size: int) -> torch.Tensor:
    """float ``[C, S, S]`` in [0, 1] -> view ``e`` of image ``i`` before CutMix: cropped, resized,
    maybe flipped ``[C, size, size]``, then its RandAugment ops when the views have them."""
    out = crop_resize(img01, views.crop[i, e].tolist(), (size, size))
    out = out.flip(-1) if bool(views.flip[i, e]) else out
    if views.has_randaugment:
        out = apply_ops(out, views.ra_ops[i, e], views.ra_sign[i, e], views.ra_magnitude, views.ra_bins)
    return out


def render_views(
    images: np.ndarray | torch.Tensor,
    views: ViewParams,
    e: int,
    idx: torch.Tensor | Sequence[int] | np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Replay view ``e`` of images ``idx``.

    ``images``: uint8 ``[N, C, S, S]`` (the whole distilled set; partners index into it),
    ``idx``: ``[B]`` image indices.  Returns normalized float32 ``[B, C, S, S]`` on
    ``device`` (default: the images' device).  Each image is rendered on its own, so the
    pixels do not depend on which other images are in the batch.
    """
    imgs = as_tensor(images)
    if imgs.shape[0] != views.num_images:
        raise ValueError(f"{imgs.shape[0]} images but views for {views.num_images}")
    if not 0 <= e < views.epochs:
        raise IndexError(f"view {e} out of range for {views.epochs} stored views")
    idx_np = np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64).reshape(-1)
    c, size = imgs.shape[1], imgs.shape[-1]
    out = torch.empty((len(idx_np), c, size, size), dtype=torch.float32, device=imgs.device)
    for b, i in enumerate(idx_np):
        view = _one_view(imgs[i].float() / 255.0, views, int(i), e, size)
        x0, y0, x1, y1 = (int(v) for v in views.mix_box[i, e])
        if x1 > x0 and y1 > y0:
            p = int(views.partner[i, e])
            other = _one_view(imgs[p].float() / 255.0, views, p, e, size)
            view[:, y0:y1, x0:x1] = other[:, y0:y1, x0:x1]
        out[b] = view
    m = torch.tensor(mean, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=out.device).view(1, -1, 1, 1)
    out = (out - m) / s
    return out if device is None else out.to(device)


@dataclass
class SoftLabels:
    """Stored teacher targets for every (image, view).

    ``views``: the :class:`ViewParams` the logits were computed on;
    ``values [N, E, k] float16``: the teacher's top-k logits (descending);
    ``indices [N, E, k] int16``: their class indices; ``num_classes``: C.
    """

    views: ViewParams
    values: np.ndarray
    indices: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        n, e = self.views.num_images, self.views.epochs
        if self.values.shape[:2] != (n, e) or self.values.shape != self.indices.shape:
            raise ValueError(
                f"values {self.values.shape} / indices {self.indices.shape} disagree with views [{n}, {e}]"
            )

    @property
    def topk(self) -> int:
        return int(self.values.shape[-1])

    def nbytes(self) -> int:
        """Bytes of all stored label data: values + indices + view parameters."""
        return int(self.values.nbytes + self.indices.nbytes + self.views.nbytes())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of arrays for storage (inverse: :meth:`from_arrays`)."""
        return {
            **self.views.to_arrays(), "values": self.values, "indices": self.indices,
            "num_classes": np.asarray(self.num_classes, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SoftLabels:
        """Rebuild from :meth:`to_arrays` output."""
        return cls(
            views=ViewParams.from_arrays(arrays),
            values=np.asarray(arrays["values"], np.float16),
            indices=np.asarray(arrays["indices"], np.int16),
            num_classes=int(np.asarray(arrays["num_classes"]).reshape(-1)[0]),
        )

    def dense_logits(self, e: int, idx: torch.Tensor | Sequence[int] | np.ndarray) -> torch.Tensor:
        """float32 ``[B, num_classes]`` logits of view ``e`` for images ``idx [B]``.

        Classes outside the stored top-k are ``-inf``, so a softmax renormalizes over the
        top-k (exact when ``k == num_classes``).
        """
        idx_np = np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64).reshape(-1)
        vals = torch.from_numpy(self.values[idx_np, e].astype(np.float32))
        inds = torch.from_numpy(self.indices[idx_np, e].astype(np.int64))
        out = torch.full((len(idx_np), self.num_classes), float("-inf"), dtype=torch.float32)
        return out.scatter_(1, inds, vals)


@torch.no_grad()
def teacher_soft_labels(
    teacher: nn.Module,
    images: np.ndarray | torch.Tensor,
    views: ViewParams,
    topk: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    render: Callable[..., torch.Tensor] | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> SoftLabels:
    """Label every stored view of ``images`` (uint8 ``[N, C, S, S]``) with ``teacher``'s top-k logits.

    The teacher runs in eval mode on views rendered exactly as :func:`render_views` does
    (its previous train/eval mode is restored); ``render`` may name another renderer with its
    signature (``batched_views.render_views_batched``: equal up to float rounding).  Returns :class:`SoftLabels` with
    ``values [N, E, k] float16`` and ``indices [N, E, k] int16``.  A view's top-k stay on the
    device until all its batches ran: one transfer per view ``e``, not one per batch.
    ``precision="bf16"`` / ``channels_last=True``: CUDA-only switches of the teacher forward
    (:func:`dd_assets.core.device_loops.inference_context`); the defaults change nothing.
    """
    imgs = as_tensor(images)
    n, e_count = views.num_images, views.epochs
    check_inference_options(device, precision, channels_last)
    was_training = teacher.training
    teacher.eval()
    values: np.ndarray | None = None
    indices: np.ndarray | None = None
    num_classes = 0
    fp16_max = float(np.finfo(np.float16).max)
    try:
        with inference_context(teacher, device, precision, channels_last) as forward:
            for e in range(e_count):
                tops: list[tuple[torch.Tensor, torch.Tensor]] = []  # view e's batches, left on the device
                for start in range(0, n, batch_size):
                    idx = torch.arange(start, min(start + batch_size, n))
                    x = (render or render_views)(imgs, views, e, idx, mean, std, device=device)
                    logits = forward(x).float()
                    if values is None:
                        num_classes = int(logits.shape[1])
                        if not 1 <= topk <= num_classes:
                            raise ValueError(f"topk={topk} must be in [1, {num_classes}]")
                        if num_classes > np.iinfo(np.int16).max:
                            raise ValueError(f"{num_classes} classes do not fit int16 indices")
                        values = np.empty((n, e_count, topk), np.float16)
                        indices = np.empty((n, e_count, topk), np.int16)
                    top = logits.topk(topk, dim=1)
                    tops.append((top.values.clamp(-fp16_max, fp16_max), top.indices))
                values[:, e] = torch.cat([v for v, _ in tops]).cpu().numpy().astype(np.float16)  # one transfer per view
                indices[:, e] = torch.cat([i for _, i in tops]).cpu().numpy().astype(np.int16)
    finally:
        teacher.train(was_training)
    assert values is not None and indices is not None
    return SoftLabels(views=views, values=values, indices=indices, num_classes=num_classes)


def label_array_bytes(stored: dict[str, np.ndarray]) -> int:
    """Bytes of stored label arrays proper (FKD: top-k values + indices; DBR: d_org + d_aug),
    without the view parameters every label mode stores alike."""
    skip = {*ViewParams.KEYS, *ViewParams.RA_KEYS, "num_classes"}
    return int(sum(a.nbytes for k, a in stored.items() if k not in skip))
