"""DDPS Stage II, visual elements (Sec. 3.3, Alg. 1 line 14): DIFT features of every
candidate patch -- U-Net up-block activations at a small ``t`` (:class:`UpBlockFeatures`,
:func:`dift_features`).
"""

from __future__ import annotations

import numpy as np
import torch

from dd_assets.core.device_loops import upload
from dd_assets.methods.ddps.diffusion import NoisePredictor, add_noise
from dd_assets.methods.ddps.representativeness import _cond
from dd_assets.methods.ddps.windows import boxes_to_cells


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
    to_host: bool = True,
) -> np.ndarray | torch.Tensor:
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
        to_host: ``False`` returns the float32 tensor on ``device`` instead (callers that
            gather several calls before one transfer); batches stay there until the loop ends.

    Returns:
        ``[N, C_l] float32`` numpy (``C_l`` = channels of the chosen up block).
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
            z = predictor.encode(upload(inp, device)).float()
            b = z.shape[0]
            tt = torch.full((b,), int(t), dtype=torch.long, device=device)
            c = upload(cond[start : start + b], device)
            noise = torch.stack([torch.randn((ensemble,) + tuple(z.shape[1:]), generator=gen) for _ in range(b)])
            noise = upload(noise, device)
            acc = None
            for e in range(ensemble):
                predictor.predict_noise(add_noise(predictor.scheduler, z, noise[:, e], tt), tt, c)
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
            out.append(acc / ensemble)
    feats = torch.cat(out)
    return feats.cpu().numpy().astype(np.float32) if to_host else feats
