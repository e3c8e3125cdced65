"""Pictures for people: heat-map overlays of CAM / attention maps on their images.
Pure numpy; grids are made by :func:`dd_assets.defs.common.image_grid_png`."""

from __future__ import annotations

import numpy as np


def _colormap(v: np.ndarray) -> np.ndarray:
    """[0, 1] ``[..., ]`` -> uint8 ``[..., 3]``: blue (0) -> green -> yellow -> red (1)."""
    v = np.clip(v, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def upsample_nearest(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[N, h, w]`` -> ``[N, H, W]`` by nearest-neighbour (patch grids keep their blocks)."""
    n, h, w = maps.shape
    ys = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
    xs = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
    return maps[:, ys][:, :, xs]


def heat_overlay(images: np.ndarray, maps: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a heat map over each image.

    Args:
        images: uint8 ``[N, 3, H, W]``.
        maps: float ``[N, h, w]`` (any resolution; nearest-upsampled to ``H x W``), min-max
            normalized per image here so that every overlay spans the full colour range.
        alpha: weight of the heat colour.

    Returns:
        uint8 ``[N, 3, H, W]``.
    """
    if images.ndim != 4 or maps.ndim != 3 or len(images) != len(maps):
        raise ValueError(f"images [N, 3, H, W] and maps [N, h, w] expected, got {images.shape} and {maps.shape}")
    m = upsample_nearest(np.asarray(maps, np.float32), images.shape[-2:])
    lo = m.reshape(len(m), -1).min(axis=1)[:, None, None]
    span = m.reshape(len(m), -1).max(axis=1)[:, None, None] - lo
    m = np.where(span > 0, (m - lo) / np.where(span > 0, span, 1), 0.0)
    heat = _colormap(m).transpose(0, 3, 1, 2).astype(np.float32)
    out = (1 - alpha) * images.astype(np.float32) + alpha * heat
    return out.round().clip(0, 255).astype(np.uint8)


def side_by_side(images: np.ndarray, overlays: np.ndarray) -> np.ndarray:
    """Interleave ``[N, 3, H, W]`` images and their overlays -> ``[2N, 3, H, W]`` (image, overlay, ...)."""
    out = np.empty((2 * len(images), *images.shape[1:]), np.uint8)
    out[0::2], out[1::2] = images, overlays
    return out


def histogram_png(values: np.ndarray, label: str, title: str, bins: int = 30) -> bytes:
    """PNG bytes of a histogram of ``values`` (score distributions of scoring/selection assets)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(4, 2.6), dpi=100)
    ax.hist(v, bins=bins if v.size else 1, color="#3b6ea5")
    ax.set_xlabel(label)
    ax.set_ylabel("count")
    ax.set_title(f"{title} (n={v.size})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def loss_curve_png(losses: list[float], title: str = "diffusion_model training loss", ylabel: str = "noise MSE") -> bytes:
    """Per-step training loss and its running mean as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = np.asarray(losses, np.float64)
    fig, ax = plt.subplots(figsize=(4.5, 2.8), dpi=100)
    ax.plot(np.arange(len(v)), v, color="#9db7d5", lw=0.8, label="step")
    if len(v) >= 5:
        w = max(2, len(v) // 20)
        ax.plot(np.arange(w - 1, len(v)), np.convolve(v, np.ones(w) / w, mode="valid"), color="#3b6ea5", label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
