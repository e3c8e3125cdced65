"""DDPS: Diffusion-Driven Patch Selection (core, pure torch/numpy).

Paper: "Efficient Dataset Distillation via Diffusion-Driven Patch Selection for Improved
Generalization" (Zhong et al.), Sec. 3.2-3.4, Algorithm 1, supplementary 2-6.  Per class c:

1. **Stage I, representativeness (Sec. 3.2, Eq. 4-6, Alg. 1 lines 6-13).**  Each image is
   resized (shortest edge ``image_size`` = 256, supp. 6) and encoded, ``z = E(x)``.  For ``N``
   draws of ``t ~ U(0.1, 0.7) * T`` and ``eps ~ N(0, I)`` (the *same* ``t`` and ``eps`` for
   both terms) the per-pixel map
   ``D(z|c) = mean_draws mean_channels [(eps_theta(z_t, t, c) - eps)^2 - (eps_theta(z_t, t, phi) - eps)^2]``
   is averaged (:func:`representativeness_maps`); ``R(p|c)`` of a patch ``p`` is the mean
   of ``D`` over the patch (a ``patch_size`` = 224 average-pooling window, supp. 6;
   :func:`patch_scores`), i.e. Eq. 6 restricted to ``p``.  Every image contributes its best
   patch (Alg. 1 line 12) -> the class's candidate patches ``P_c``.
   **Sign:** Eq. 5 gives ``p(c|z) = 1 / (1 + exp R)``, decreasing in ``R``, so the most
   class-relevant patch has the *lowest* ``R`` (``prefer="low"``, the default);
   ``prefer="high"`` follows Algorithm 1's literal ``argmax`` (see ``docs/ddps.md``).
2. **Stage II, visual-element aggregation (Sec. 3.3, Alg. 1 lines 14-17).**  DIFT features
   of every candidate patch (U-Net up-block activations at a small ``t``,
   :func:`dift_features`); k-means with 32 centres (:func:`cluster_patches`); clusters
   ranked by the median ``R`` of their patches, patches inside a cluster by distance to the
   centre.  All of this is IPC-independent and stored as one table
   (:class:`DDPSCandidates`, :meth:`DDPSCandidates.to_table`).
3. **Selection (Sec. 4.2, supp. 5)** from the stored table only (:func:`select_patches`):
   ``n = 4 * IPC`` patches when ``IPC <= 10`` else ``IPC``; each of the top ``N = 10``
   clusters gives its ``n // N`` patches nearest the centre, the rest are the best unused
   patches by ``R``.  ``use_clusters=False`` is the "w/o Cluster" ablation (best ``n`` by
   ``R``).
4. **Composition (Sec. 3.4):** 4 patches per image (2x2) for ``IPC <= 10``, one patch per
   image otherwise (:func:`tiles_per_image`), stitched by
   :func:`dd_assets.core.compose.compose_class`.

Stages registered here: ``("score", "ddps")`` -> :func:`ddps_candidates`,
``("select", "ddps")`` -> :func:`ddps_select`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from dd_assets.core.compose import compose_class
from dd_assets.methods.diffusion import NoisePredictor, add_noise, num_timesteps, timestep_from_fraction
from dd_assets.core.imaging import class_inputs, resize_float
from dd_assets.methods.registry import register
from dd_assets.core.types import CandidateCrops, Tile

PREFER = ("low", "high")


def _sign(prefer: str) -> float:
    """+1 when low R is preferred (Eq. 5), -1 for Algorithm 1's argmax reading."""
    if prefer not in PREFER:
        raise ValueError(f"prefer must be 'low' (Eq. 5: lower R = more class-relevant) or 'high', got {prefer!r}")
    return 1.0 if prefer == "low" else -1.0


@dataclass
class DDPSConfig:
    """DDPS scoring and clustering settings (paper values unless marked *ours*).

    * ``image_size``: shortest edge fed to the diffusion model (256, Sec. 4.2 / supp. 6);
      ``None`` keeps the source size.
    * ``patch_size``: square patch side in model pixels (224); ``None`` = the whole image
      (the paper's low-resolution setting, Sec. 4.2).
    * ``patch_stride``: step of the pooling window in model pixels (*ours*: 8 = one SD
      latent cell; the paper gives none).
    * ``patches_per_image``: best patches kept per image (1, Alg. 1 line 12).
    * ``n_draws``: ``N`` (t, eps) draws of Eq. 6 (*ours*: 10; the paper gives none).
    * ``t_range``: ``t ~ U(t_range) * T`` ((0.1, 0.7), Sec. 4.1 / supp. 2).
    * ``prefer``: ``"low"`` (Eq. 5-6) or ``"high"`` (Alg. 1 argmax).
    * ``dift_t``: DIFT timestep as a fraction of ``T`` (0.16, our reading of "t = 1.60").
    * ``dift_up_block``: index into ``unet.up_blocks`` (1, DIFT's default; paper silent).
    * ``dift_ensemble``: noise draws averaged for DIFT (*ours*: 1; DIFT uses 8).
    * ``dift_input``: ``"crop"`` runs the U-Net on the patch itself (Alg. 1 ``U(I(P))``),
      ``"pool"`` on the whole image and averages the feature map over the patch.
    * ``n_clusters``: k-means centres M (32, Sec. 3.3); ``kmeans_n_init`` (*ours*: 10).
    * ``seed``; ``batch_size``: images per forward pass.
    """

    image_size: int | None = 256
    patch_size: int | None = 224
    patch_stride: int = 8
    patches_per_image: int = 1
    n_draws: int = 10
    t_range: tuple[float, float] = (0.1, 0.7)
    prefer: str = "low"
    dift_t: float = 0.16
    dift_up_block: int = 1
    dift_ensemble: int = 1
    dift_input: str = "crop"
    n_clusters: int = 32
    kmeans_n_init: int = 10
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        _sign(self.prefer)
        t0, t1 = self.t_range
        if not 0.0 <= t0 <= t1 <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= start <= end <= 1, got {self.t_range}")
        if not 0.0 <= self.dift_t < 1.0:
            raise ValueError(f"dift_t must be a fraction of T in [0, 1), got {self.dift_t}")
        if self.dift_input not in ("crop", "pool"):
            raise ValueError(f"dift_input must be 'crop' or 'pool', got {self.dift_input!r}")
        for name in ("patch_stride", "patches_per_image", "n_draws", "dift_ensemble", "n_clusters",
                     "kmeans_n_init", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ============================================================================ patches (Stage I)


def candidate_boxes(
    height: int,
    width: int,
    patch_size: int | None,
    stride: int = 8,
    mode: str = "grid",
    num: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Candidate square patches of one ``height x width`` image (model pixels).

    ``mode="grid"`` (the paper: ``R`` of *all* patches by average pooling, supp. 6): every
    window position ``0, stride, 2*stride, ...`` per axis, plus the flush position
    ``side - patch_size`` when the stride does not reach it; deterministic.  ``mode="random"``
    (*ours*, an alternative): ``num`` uniformly placed windows from
    ``np.random.default_rng(seed)``.  ``patch_size=None`` gives the whole image.

    Returns:
        ``[K, 4] int32`` ``(x0, y0, x1, y1)``, grid row-major (``y`` outer).
    """
    if patch_size is None:
        return np.array([[0, 0, width, height]], dtype=np.int32)
    if not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch_size={patch_size} must be in [1, min(height, width)={min(height, width)}]")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")

    def starts(side: int) -> list[int]:
        s = list(range(0, side - patch_size + 1, stride))
        if s[-1] != side - patch_size:
            s.append(side - patch_size)
        return s

    if mode == "grid":
        pos = [(x, y) for y in starts(height) for x in starts(width)]
    elif mode == "random":
        if num is None or num < 1:
            raise ValueError(f"mode='random' needs num >= 1, got {num}")
        rng = np.random.default_rng(seed)
        pos = list(zip(rng.integers(0, width - patch_size + 1, num).tolist(),
                       rng.integers(0, height - patch_size + 1, num).tolist(), strict=True))
    else:
        raise ValueError(f"unknown mode {mode!r}; use 'grid' or 'random'")
    return np.array([(x, y, x + patch_size, y + patch_size) for x, y in pos], dtype=np.int32)


def prepare_images(images: torch.Tensor, image_size: int | None) -> tuple[torch.Tensor, float]:
    """uint8 ``[N, C, H, W]`` -> float ``[N, C, h, w]`` in [-1, 1] with the shortest edge
    resized to ``image_size`` (aspect kept, antialiased bilinear), and the scale ``h / H``."""
    x = images.float().div(255.0)
    h, w = x.shape[-2:]
    scale = 1.0
    if image_size is not None and min(h, w) != image_size:
        scale = image_size / min(h, w)
        size = (image_size, round(w * scale)) if h <= w else (round(h * scale), image_size)
        x = resize_float(x, size)
        scale = x.shape[-2] / h
    return x * 2.0 - 1.0, scale


def boxes_to_cells(boxes: np.ndarray, cell: float, rows: int, cols: int) -> np.ndarray:
    """Pixel boxes ``[..., 4]`` -> boxes on a grid of ``cell``-pixel cells (``rows x cols``):
    edges rounded to the nearest cell edge, clipped, at least one cell wide."""
    b = np.floor(np.asarray(boxes, dtype=np.float64) / cell + 0.5).astype(np.int64)
    x0 = np.clip(b[..., 0], 0, cols - 1)
    y0 = np.clip(b[..., 1], 0, rows - 1)
    x1 = np.clip(np.maximum(b[..., 2], x0 + 1), 1, cols)
    y1 = np.clip(np.maximum(b[..., 3], y0 + 1), 1, rows)
    return np.stack([x0, y0, x1, y1], axis=-1)


def box_means(maps: torch.Tensor | np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Average of each map over its boxes (integral image).

    Args:
        maps: ``[N, h, w]``; cells: ``[K, 4]`` (same boxes for every map) or ``[N, K, 4]``,
            in map cells.

    Returns:
        ``[N, K] float64``.
    """
    m = torch.as_tensor(maps).double().cpu()
    ii = F.pad(m.cumsum(1).cumsum(2), (1, 0, 1, 0)).numpy()  # [N, h+1, w+1]
    c = np.asarray(cells, dtype=np.int64)
    if c.ndim == 2:
        c = np.broadcast_to(c, (m.shape[0],) + c.shape)
    n = np.arange(m.shape[0])[:, None]
    x0, y0, x1, y1 = (c[..., i] for i in range(4))
    s = ii[n, y1, x1] - ii[n, y0, x1] - ii[n, y1, x0] + ii[n, y0, x0]
    return s / ((x1 - x0) * (y1 - y0))


def _draw_t(gen: torch.Generator, n: int, t_range: tuple[float, float], t_max: int) -> torch.Tensor:
    u = torch.rand(n, generator=gen, dtype=torch.float64) * (t_range[1] - t_range[0]) + t_range[0]
    return torch.clamp(torch.floor(u * t_max).long(), 0, t_max - 1)


def _cond(cond_index: int | np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    c = torch.as_tensor(np.asarray(cond_index), dtype=torch.long).reshape(-1)
    if c.numel() == 1:
        c = c.expand(n)
    if c.shape[0] != n:
        raise ValueError(f"cond_index must be one int or [N={n}], got {tuple(c.shape)}")
    return c.clone()


def representativeness_maps(
    predictor: NoisePredictor,
    x: torch.Tensor,
    cond_index: int | np.ndarray | torch.Tensor,
    n_draws: int = 10,
    t_range: tuple[float, float] = (0.1, 0.7),
    generator: torch.Generator | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-latent-pixel ``D(z|c)`` whose mean over a region is ``R`` of Eq. 6 (Alg. 1 l. 7-11).

    For image ``n`` (processed in input order, so results do not depend on ``batch_size``):
    ``n_draws`` timesteps ``t_i = floor(u_i T)``, ``u_i ~ U(t_range)``, and noises ``eps_i``
    are drawn from ``generator`` (CPU); with ``z = E(x_n)``, ``z_t = add_noise(z, eps_i, t_i)``
    and the conditional and null predictions made in one forward pass of ``2B`` inputs::

        D[n] = 1/N sum_i mean_channels[(eps_theta(z_t, t_i, c) - eps_i)^2 - (eps_theta(z_t, t_i, phi) - eps_i)^2]

    Args:
        x: float ``[N, C, H, W]`` in [-1, 1] (e.g. :func:`prepare_images`).
        cond_index: class condition ``c`` (one int or ``[N]``); ``phi`` is ``predictor.null_index``.

    Returns:
        float32 ``[N, H / s, W / s]`` on CPU (``s = predictor.latent_scale``); negative where
        the class condition predicts the noise better than the null condition.
    """
    if n_draws < 1 or batch_size < 1:
        raise ValueError(f"n_draws and batch_size must be >= 1, got {n_draws}, {batch_size}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    cond = _cond(cond_index, x.shape[0])
    t_max = num_timesteps(predictor.scheduler)
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            b = xb.shape[0]
            z = predictor.encode(xb).float()
            ts, eps = [], []
            for _ in range(b):  # per image, in order: batch-size independent draws
                ts.append(_draw_t(gen, n_draws, t_range, t_max))
                eps.append(torch.randn((n_draws,) + tuple(z.shape[1:]), generator=gen))
            t_all = torch.stack(ts).to(device)  # [B, n]
            e_all = torch.stack(eps).to(device)  # [B, n, c, h, w]
            c = cond[start : start + b].to(device)
            cc = torch.cat([c, torch.full_like(c, predictor.null_index)])
            acc = torch.zeros((b,) + tuple(z.shape[2:]), dtype=torch.float32, device=device)
            for i in range(n_draws):
                t, e = t_all[:, i], e_all[:, i]
                z_t = add_noise(predictor.scheduler, z, e, t)
                pred = predictor.predict_noise(torch.cat([z_t, z_t]), torch.cat([t, t]), cc).float()
                p_c, p_null = pred[:b], pred[b:]
                acc += ((p_c - e) ** 2 - (p_null - e) ** 2).mean(dim=1)  # L_t(c) - L_t(phi), per pixel
            out.append((acc / n_draws).cpu())
    return torch.cat(out)


def patch_scores(maps: torch.Tensor | np.ndarray, boxes: np.ndarray, latent_scale: int) -> np.ndarray:
    """``R(p|c)`` of every patch: the mean of ``D`` (:func:`representativeness_maps`) over the
    patch, i.e. average pooling with the patch as kernel (supp. 6).

    Args:
        maps: ``[N, h, w]`` latent-resolution maps; boxes: ``[K, 4]`` or ``[N, K, 4]`` in
            image pixels, mapped to latent cells of ``latent_scale`` pixels
            (:func:`boxes_to_cells`).

    Returns:
        ``[N, K] float64``.
    """
    m = torch.as_tensor(maps)
    cells = boxes_to_cells(boxes, float(latent_scale), m.shape[-2], m.shape[-1])
    return box_means(m, cells)


# ============================================================================ DIFT (Stage II)


class UpBlockFeatures:
    """Context manager capturing the output of ``unet.up_blocks[index]`` (DIFT features).

    Usage::

        with UpBlockFeatures(unet, 1) as feats:
            unet(...)
        fmap = feats.output  # [B, C_l, h_l, w_l]

    The hook is removed on exit (also on error).
    """

    def __init__(self, unet: torch.nn.Module, index: int) -> None:
        blocks = getattr(unet, "up_blocks", None)
        if blocks is None:
            raise ValueError(f"{type(unet).__name__} has no up_blocks; DIFT needs a diffusers UNet")
        if not 0 <= index < len(blocks):
            raise ValueError(f"dift_up_block={index} out of range: the U-Net has {len(blocks)} up blocks")
        self.block = blocks[index]
        self.output: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: torch.nn.Module, inputs: object, output: object) -> None:
        self.output = output[0] if isinstance(output, tuple) else output  # type: ignore[assignment]

    def __enter__(self) -> UpBlockFeatures:
        self.output = None
        self._handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def dift_features(
    predictor: NoisePredictor,
    x: torch.Tensor,
    cond_index: int | np.ndarray | torch.Tensor,
    boxes: np.ndarray | None = None,
    t: int = 160,
    up_block: int = 1,
    ensemble: int = 1,
    mode: str = "crop",
    generator: torch.Generator | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """DIFT features (Tang et al. 2023; Sec. 3.3, Alg. 1 line 14) of one patch per image.

    ``z = E(input)``; ``z_t = add_noise(z, eps, t)`` with ``eps`` drawn per image in order
    from ``generator``; ``eps_theta(z_t, t, c)`` is run with the class condition and the
    output of ``unet.up_blocks[up_block]`` captured (:class:`UpBlockFeatures`), averaged over
    the patch and over ``ensemble`` noise draws.

    Args:
        x: float ``[N, C, H, W]`` in [-1, 1]; boxes: ``[N, 4]`` one patch per image in
            pixels of ``x`` (``None`` = whole image).
        mode: ``"crop"``: the U-Net sees the patch itself (all patches must have one size)
            and the whole feature map is averaged; ``"pool"``: it sees the whole image and
            the map is averaged over the patch mapped to the map's resolution.

    Returns:
        ``[N, C_l] float32`` (``C_l`` = channels of the chosen up block).
    """
    if mode not in ("crop", "pool"):
        raise ValueError(f"dift_input/mode must be 'crop' or 'pool', got {mode!r}")
    if ensemble < 1 or batch_size < 1:
        raise ValueError(f"ensemble and batch_size must be >= 1, got {ensemble}, {batch_size}")
    unet = getattr(predictor, "unet", None)
    if unet is None:
        raise ValueError(f"{type(predictor).__name__} has no .unet; DIFT needs a diffusers UNet")
    n, _, h, w = x.shape
    bx = np.tile(np.array([0, 0, w, h], np.int64), (n, 1)) if boxes is None else np.asarray(boxes, np.int64)
    if bx.shape != (n, 4):
        raise ValueError(f"boxes must be [N={n}, 4], got {bx.shape}")
    if mode == "crop":
        sides = {(int(b[2] - b[0]), int(b[3] - b[1])) for b in bx}
        if len(sides) != 1:
            raise ValueError(f"mode='crop' needs patches of one size, got sizes {sorted(sides)}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    cond = _cond(cond_index, n)
    out = []
    with torch.no_grad(), UpBlockFeatures(unet, up_block) as feats:
        for start in range(0, n, batch_size):
            bb = bx[start : start + batch_size]
            if mode == "crop":
                inp = torch.stack([x[start + j, :, b[1] : b[3], b[0] : b[2]] for j, b in enumerate(bb)])
            else:
                inp = x[start : start + batch_size]
            z = predictor.encode(inp.to(device)).float()
            b = z.shape[0]
            tt = torch.full((b,), int(t), dtype=torch.long, device=device)
            c = cond[start : start + b].to(device)
            noise = torch.stack([torch.randn((ensemble,) + tuple(z.shape[1:]), generator=gen) for _ in range(b)])
            acc = None
            for e in range(ensemble):
                predictor.predict_noise(add_noise(predictor.scheduler, z, noise[:, e].to(device), tt), tt, c)
                if feats.output is None:
                    raise RuntimeError(f"up block {up_block} did not run")
                fmap = feats.output.float()  # [B, C_l, h_l, w_l]
                if mode == "crop":
                    pooled = fmap.mean(dim=(2, 3))
                else:
                    cells = boxes_to_cells(bb, inp.shape[-2] / fmap.shape[-2], fmap.shape[-2], fmap.shape[-1])
                    pooled = torch.stack([
                        fmap[j, :, cl[1] : cl[3], cl[0] : cl[2]].mean(dim=(1, 2)) for j, cl in enumerate(cells)
                    ])
                acc = pooled if acc is None else acc + pooled
            assert acc is not None
            out.append((acc / ensemble).cpu())
    return torch.cat(out).numpy().astype(np.float32)


# ============================================================================ clusters (Sec. 3.3)


@dataclass
class PatchClusters:
    """k-means result on candidate patches (aligned arrays of length K, M clusters).

    ``labels [K]`` k-means cluster id; ``distance [K]`` Euclidean distance to its centre;
    ``cluster_rank [K]`` rank of the patch's cluster (0 = best); ``order [M']`` non-empty
    cluster ids best first; ``median_r [M]`` median raw ``R`` per cluster id (NaN if empty).
    """

    labels: np.ndarray
    distance: np.ndarray
    cluster_rank: np.ndarray
    order: np.ndarray
    median_r: np.ndarray


def cluster_patches(
    features: np.ndarray,
    r: np.ndarray,
    prefer: str = "low",
    n_clusters: int = 32,
    seed: int = 0,
    n_init: int = 10,
) -> PatchClusters:
    """Static k-means on DIFT features and the two ranking rules of Sec. 3.3.

    ``KMeans(n_clusters=min(n_clusters, K), random_state=seed, n_init=n_init)`` on float64
    features, one OpenMP thread (bitwise reproducible).  *Inter-cluster*: clusters sorted by
    the median ``R`` of their patches, ascending for ``prefer="low"`` (descending for
    ``"high"``), ties by cluster id.  *Intra-cluster*: by distance to the centre (used by
    :func:`select_patches`).

    Args:
        features: ``[K, D]``; r: ``[K]`` raw ``R(p|c)``.
    """
    x = np.asarray(features, dtype=np.float64)
    rr = np.asarray(r, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != rr.shape[0] or x.shape[0] == 0:
        raise ValueError(f"features must be [K, D] with K = len(r) > 0, got {x.shape} and {rr.shape}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    sign = _sign(prefer)
    m = min(n_clusters, x.shape[0])
    with threadpool_limits(limits=1):
        km = KMeans(n_clusters=m, random_state=seed, n_init=n_init).fit(x)
    labels = km.labels_.astype(np.int64)
    dist = np.linalg.norm(x - km.cluster_centers_[labels], axis=1)
    median = np.full(m, np.nan)
    for k in np.unique(labels):
        median[k] = np.median(rr[labels == k])
    present = np.unique(labels)
    order = np.array(sorted(present.tolist(), key=lambda k: (sign * median[k], k)), dtype=np.int64)
    rank_of = np.full(m, -1, dtype=np.int64)
    rank_of[order] = np.arange(len(order))
    return PatchClusters(labels=labels, distance=dist, cluster_rank=rank_of[labels], order=order, median_r=median)


# ============================================================================ table and selection


@dataclass
class DDPSCandidates(CandidateCrops):
    """DDPS candidates of one class: the IPC-independent table (a :class:`CandidateCrops`).

    Besides the base arrays (``score [K]`` = ``R`` for ``prefer="low"``, ``-R`` for
    ``"high"``, so lower is always preferred), aligned ``[K]`` arrays: ``r`` raw ``R(p|c)``,
    ``cluster`` k-means id, ``distance`` to its centre, ``cluster_rank`` (0 = best cluster);
    ``features [K, D]`` DIFT features (optional, to re-cluster without the diffusion model).
    """

    r: np.ndarray = None  # type: ignore[assignment]
    cluster: np.ndarray = None  # type: ignore[assignment]
    distance: np.ndarray = None  # type: ignore[assignment]
    cluster_rank: np.ndarray = None  # type: ignore[assignment]
    prefer: str = "low"
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        k = len(self.source_id)
        for name in ("r", "cluster", "distance", "cluster_rank"):
            v = getattr(self, name)
            if v is None or np.asarray(v).shape != (k,):
                raise ValueError(f"DDPSCandidates.{name} must be [K={k}], got {None if v is None else np.shape(v)}")
        if self.features is not None and np.asarray(self.features).shape[0] != k:
            raise ValueError(f"DDPSCandidates.features must have K={k} rows, got {np.shape(self.features)}")
        _sign(self.prefer)

    def to_table(self) -> dict[str, np.ndarray]:
        """Columns ``patch_id, source_id, x0, y0, x1, y1, r, score, cluster, distance,
        cluster_rank`` (e.g. for a Parquet file)."""
        b = np.asarray(self.boxes)
        return {
            "patch_id": np.arange(len(self.source_id), dtype=np.int64),
            "source_id": np.asarray(self.source_id, np.int64),
            "x0": b[:, 0].astype(np.int32), "y0": b[:, 1].astype(np.int32),
            "x1": b[:, 2].astype(np.int32), "y1": b[:, 3].astype(np.int32),
            "r": np.asarray(self.r, np.float32), "score": np.asarray(self.score, np.float32),
            "cluster": np.asarray(self.cluster, np.int64),
            "distance": np.asarray(self.distance, np.float64),
            "cluster_rank": np.asarray(self.cluster_rank, np.int64),
        }

    @classmethod
    def from_table(cls, table: Mapping[str, np.ndarray], class_index: int, prefer: str = "low") -> DDPSCandidates:
        """Rebuild from :meth:`to_table` columns (rows sorted by ``patch_id``); ``score`` is
        recomputed from ``r`` and ``prefer``."""
        order = np.argsort(np.asarray(table["patch_id"]), kind="stable")
        col = {k: np.asarray(v)[order] for k, v in table.items()}
        r = col["r"].astype(np.float32)
        return cls(
            class_index=class_index, source_id=col["source_id"].astype(np.int64),
            boxes=np.stack([col[k] for k in ("x0", "y0", "x1", "y1")], axis=1).astype(np.int32),
            score=(_sign(prefer) * r).astype(np.float32), r=r,
            cluster=col["cluster"].astype(np.int64), distance=col["distance"].astype(np.float64),
            cluster_rank=col["cluster_rank"].astype(np.int64), prefer=prefer,
        )


def tiles_per_image(ipc: int, concat_max_ipc: int = 10, tiles: int = 4) -> int:
    """Patches per distilled image (Sec. 3.4): ``tiles`` (2x2) when ``ipc <= concat_max_ipc``,
    else 1.  ``tiles`` must be a perfect square (the grid is ``sqrt(tiles)`` per side)."""
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    if tiles < 1 or math.isqrt(tiles) ** 2 != tiles:
        raise ValueError(f"tiles must be a perfect square (1, 4, 9, ...), got {tiles}")
    return tiles if ipc <= concat_max_ipc else 1


def selection_quota(
    ipc: int, top_clusters: int = 10, concat_max_ipc: int = 10, tiles: int = 4
) -> tuple[int, int]:
    """``(patches needed, patches per top cluster)`` (supp. 5): ``n = tiles_per_image * ipc``
    and ``n // N``, i.e. ``4 * IPC // N`` for ``IPC <= 10`` else ``IPC // N``."""
    if top_clusters < 1:
        raise ValueError(f"top_clusters must be >= 1, got {top_clusters}")
    n = tiles_per_image(ipc, concat_max_ipc, tiles) * ipc
    return n, n // top_clusters


def select_patches(
    score: np.ndarray,
    cluster_rank: np.ndarray,
    distance: np.ndarray,
    ipc: int,
    top_clusters: int = 10,
    use_clusters: bool = True,
    concat_max_ipc: int = 10,
    tiles: int = 4,
) -> np.ndarray:
    """The final, IPC-dependent take from the stored table (Sec. 4.2, supp. 5).

    ``n, q = selection_quota(...)`` with ``N = min(top_clusters, #clusters)``.  For the
    clusters of rank ``0 .. N-1`` in order, the ``q`` patches nearest their centre (ties by
    index; all of them if the cluster is smaller); then the remaining ``n - taken`` patches
    are the best unused ones by ``score`` (ascending = best ``R`` first, ties by index).
    ``use_clusters=False``: the ``n`` best by ``score`` ("w/o Cluster", Tab. 5).

    Args:
        score: ``[K]`` lower = better (:attr:`DDPSCandidates.score`); cluster_rank,
            distance: ``[K]``.

    Returns:
        ``[n] int64`` indices, cluster picks (cluster rank, then distance) then fill order.
    """
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    rank = np.asarray(cluster_rank, dtype=np.int64).reshape(-1)
    dist = np.asarray(distance, dtype=np.float64).reshape(-1)
    k = s.shape[0]
    if rank.shape != (k,) or dist.shape != (k,):
        raise ValueError(f"score, cluster_rank, distance must all be [K={k}]")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_clusters = int(rank.max()) + 1 if k else 0
    n_top = max(1, min(top_clusters, n_clusters)) if use_clusters else top_clusters
    n, q = selection_quota(ipc, n_top, concat_max_ipc, tiles)
    if n > k:
        raise ValueError(f"{k} candidate patches, fewer than the {n} needed for ipc={ipc}")
    taken: list[int] = []
    if use_clusters:
        for cr in range(n_top):
            members = np.flatnonzero(rank == cr)
            members = members[np.lexsort((members, dist[members]))]
            taken.extend(members[:q].tolist())
    used = np.zeros(k, dtype=bool)
    used[taken] = True
    rest = [i for i in np.argsort(s, kind="stable").tolist() if not used[i]]
    taken.extend(rest[: n - len(taken)])
    return np.asarray(taken, dtype=np.int64)


@register("select", "ddps")
def ddps_select(
    cands: DDPSCandidates,
    ipc: int,
    top_clusters: int = 10,
    use_clusters: bool = True,
    concat_max_ipc: int = 10,
    tiles: int = 4,
) -> np.ndarray:
    """:func:`select_patches` on a stored :class:`DDPSCandidates` table (no recomputation).

    Returns:
        ``[tiles_per_image(ipc) * ipc] int64`` indices into ``cands``.
    """
    return select_patches(cands.score, cands.cluster_rank, cands.distance, ipc, top_clusters,
                          use_clusters, concat_max_ipc, tiles)


def _generator(seed: int, class_index: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, class_index, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


@register("score", "ddps")
def ddps_candidates(
    predictor: NoisePredictor,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    source_ids: np.ndarray,
    class_index: int,
    cfg: DDPSConfig | None = None,
    cond_index: int | None = None,
    device: torch.device | str = "cpu",
    keep_features: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> DDPSCandidates:
    """Stages I and II for one class: candidate patches, ``R``, DIFT, clusters (IPC-independent).

    Images are visited in ascending ``source_id`` order in batches of ``cfg.batch_size``:
    :func:`prepare_images` -> :func:`representativeness_maps` (generator stream 0 of
    ``(seed, class_index)``) -> ``R`` of every :func:`candidate_boxes` window
    (:func:`patch_scores`) -> the ``patches_per_image`` best windows per image (ties to the
    earlier window) -> :func:`dift_features` of those (stream 1).  Then
    :func:`cluster_patches` on all of the class's candidates.

    Args:
        predictor: a :class:`NoisePredictor` already on ``device``.
        images: uint8 ``[N, C, H, W]`` of the class (the paper uses ~300 random images).
        cond_index: condition of class ``c`` (default ``class_index``).

    Returns:
        :class:`DDPSCandidates`, ``K = N * patches_per_image`` rows image-major; ``boxes`` in
        *source* pixels.
    """
    cfg = cfg or DDPSConfig()
    sign = _sign(cfg.prefer)
    imgs, _, ids = class_inputs(images, labels, source_ids, class_index)
    order = np.argsort(ids, kind="stable")
    imgs = imgs[torch.from_numpy(order)]
    ids = ids[order]
    n, _, src_h, src_w = imgs.shape
    cond = class_index if cond_index is None else cond_index
    g_r, g_dift = _generator(cfg.seed, class_index, 0), _generator(cfg.seed, class_index, 1)
    dift_t = timestep_from_fraction(cfg.dift_t, predictor.scheduler)
    boxes_out, r_out, feat_out = [], [], []
    for start in range(0, n, cfg.batch_size):
        x, scale = prepare_images(imgs[start : start + cfg.batch_size].to(device), cfg.image_size)
        h, w = x.shape[-2:]
        if cfg.patch_size is not None and cfg.patch_size > min(h, w):
            raise ValueError(f"patch_size={cfg.patch_size} exceeds the model image's shorter side {min(h, w)}")
        boxes = candidate_boxes(h, w, cfg.patch_size, cfg.patch_stride)
        if len(boxes) < cfg.patches_per_image:
            raise ValueError(f"patches_per_image={cfg.patches_per_image} > {len(boxes)} windows per image")
        maps = representativeness_maps(predictor, x, cond, cfg.n_draws, cfg.t_range, g_r, cfg.batch_size, device)
        r = patch_scores(maps, boxes, predictor.latent_scale)  # [B, W]
        best = np.argsort(sign * r, axis=1, kind="stable")[:, : cfg.patches_per_image]  # [B, k]
        chosen = boxes[best]  # [B, k, 4] model pixels
        r_out.append(np.take_along_axis(r, best, axis=1).reshape(-1))
        xr = x.repeat_interleave(cfg.patches_per_image, dim=0)
        feat_out.append(dift_features(
            predictor, xr, cond, chosen.reshape(-1, 4), dift_t, cfg.dift_up_block, cfg.dift_ensemble,
            cfg.dift_input, g_dift, cfg.batch_size, device,
        ))
        src = np.rint(chosen.reshape(-1, 4) / scale).astype(np.int64)
        src[:, [0, 2]] = np.clip(src[:, [0, 2]], 0, src_w)
        src[:, [1, 3]] = np.clip(src[:, [1, 3]], 0, src_h)
        boxes_out.append(src)
        if on_progress is not None:
            on_progress(min(start + cfg.batch_size, n), n)
    r_all = np.concatenate(r_out)
    feats = np.concatenate(feat_out)
    cl = cluster_patches(feats, r_all, cfg.prefer, cfg.n_clusters, cfg.seed, cfg.kmeans_n_init)
    return DDPSCandidates(
        class_index=class_index,
        source_id=np.repeat(ids, cfg.patches_per_image),
        boxes=np.concatenate(boxes_out).astype(np.int32),
        score=(sign * r_all).astype(np.float32),
        r=r_all.astype(np.float32),
        cluster=cl.labels, distance=cl.distance, cluster_rank=cl.cluster_rank,
        prefer=cfg.prefer, features=feats if keep_features else None,
    )


def ddps_distill_class(
    cands: DDPSCandidates,
    sources_by_id: dict[int, torch.Tensor | np.ndarray],
    ipc: int,
    out_size: int,
    top_clusters: int = 10,
    use_clusters: bool = True,
    concat_max_ipc: int = 10,
    tiles: int = 4,
    grouping: str = "contiguous",
) -> tuple[np.ndarray, list[list[Tile]], np.ndarray]:
    """Select from the table and stitch ``ipc`` images of ``out_size`` px (Sec. 3.4).

    With 4 tiles per image and ``grouping="contiguous"`` image ``i`` holds picks
    ``4i .. 4i+3``, i.e. the 4 patches of the ``i``-th ranked cluster when ``q = 4``
    (IPC = 10, "the top 4 patches from the top 10 clusters", Sec. 4.2).

    Returns:
        ``(images uint8 [ipc, C, out_size, out_size], tiles, chosen indices)``.
    """
    per = tiles_per_image(ipc, concat_max_ipc, tiles)
    chosen = ddps_select(cands, ipc, top_clusters, use_clusters, concat_max_ipc, tiles)
    imgs, tl = compose_class(sources_by_id, cands, chosen, ipc, out_size, math.isqrt(per), grouping=grouping)
    return imgs, tl, chosen
