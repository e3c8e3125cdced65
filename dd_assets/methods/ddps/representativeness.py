"""DDPS Stage I, representativeness (Sec. 3.2, Eq. 4-6, Alg. 1 lines 6-13).

Each image is resized (shortest edge ``image_size`` = 256, supp. 6) and encoded,
``z = E(x)``.  For ``N`` draws of ``t ~ U(0.1, 0.7) * T`` and ``eps ~ N(0, I)`` (the *same*
``t`` and ``eps`` for both terms) the per-pixel map
``D(z|c) = mean_draws mean_channels [(eps_theta(z_t, t, c) - eps)^2 - (eps_theta(z_t, t, phi) - eps)^2]``
is averaged (:func:`representativeness_maps`); ``R(p|c)`` of a patch ``p`` is the mean
of ``D`` over the patch (a ``patch_size`` = 224 average-pooling window, supp. 6;
:func:`patch_scores`), i.e. Eq. 6 restricted to ``p``.  Every image contributes its best
patch (Alg. 1 line 12) -> the class's candidate patches ``P_c``.  Lower ``R`` = more
class-relevant (Eq. 5; :mod:`dd_assets.methods.ddps.config`).
"""

from __future__ import annotations

import numpy as np
import torch

from dd_assets.core.device_loops import upload
from dd_assets.methods.ddps.diffusion import NoisePredictor, add_noise, num_timesteps
from dd_assets.methods.ddps.windows import box_means, boxes_to_cells


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
    to_host: bool = True,
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
        to_host: ``False`` leaves the result on ``device`` (callers that gather several calls
            before one transfer); the batches' maps always stay there until the loop ends.

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
            xb = upload(x[start : start + batch_size], device)
            b = xb.shape[0]
            z = predictor.encode(xb).float()
            ts, eps = [], []
            for _ in range(b):  # per image, in order: batch-size independent draws
                ts.append(_draw_t(gen, n_draws, t_range, t_max))
                eps.append(torch.randn((n_draws,) + tuple(z.shape[1:]), generator=gen))
            t_all = upload(torch.stack(ts), device)  # [B, n]
            e_all = upload(torch.stack(eps), device)  # [B, n, c, h, w]
            c = upload(cond[start : start + b], device)
            cc = torch.cat([c, torch.full_like(c, predictor.null_index)])
            acc = torch.zeros((b,) + tuple(z.shape[2:]), dtype=torch.float32, device=device)
            for i in range(n_draws):
                t, e = t_all[:, i], e_all[:, i]
                z_t = add_noise(predictor.scheduler, z, e, t)
                pred = predictor.predict_noise(torch.cat([z_t, z_t]), torch.cat([t, t]), cc).float()
                p_c, p_null = pred[:b], pred[b:]
                acc += ((p_c - e) ** 2 - (p_null - e) ** 2).mean(dim=1)  # L_t(c) - L_t(phi), per pixel
            out.append(acc / n_draws)
    maps = torch.cat(out)
    return maps.cpu() if to_host else maps


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
