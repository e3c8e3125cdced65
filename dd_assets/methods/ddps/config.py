"""DDPS settings (:class:`DDPSConfig`) and the sign convention of ``R`` (``prefer``).

Paper: "Efficient Dataset Distillation via Diffusion-Driven Patch Selection for Improved
Generalization" (Zhong et al.), Sec. 3.2-3.4, Algorithm 1, supplementary 2-6.
**Sign:** Eq. 5 gives ``p(c|z) = 1 / (1 + exp R)``, decreasing in ``R``, so the most
class-relevant patch has the *lowest* ``R`` (``prefer="low"``, the default);
``prefer="high"`` follows Algorithm 1's literal ``argmax`` (see ``docs/ddps.md``).
:func:`ddps_config` turns a ``methods`` entry's parameters into the config (the level assets
and ``benchmarks/gpu_table.py`` call it).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def ddps_config(mp: dict, data_size: int, batch_size: int = 8, latent: bool = False) -> DDPSConfig:
    """:class:`DDPSConfig` of a methods entry for working images of ``data_size`` px.

    * Low-resolution data (working images smaller than ``patch_size``) get the paper's
      low-resolution setting (Sec. 4.2, "same setting as RDED"): R of the whole image
      (``patch_size = None``).
    * ``image_size`` (the resize to the model's input, 256 for SD) applies to latent models
      (``latent``, SD); the pixel model is trained here at the working resolution, so its
      images are not resized (``image_size = None``).
    """
    image_size, patch_size = mp["image_size"], mp["patch_size"]
    if patch_size is not None and int(data_size) < int(patch_size):
        patch_size = None
    if not latent:
        image_size = None
    return DDPSConfig(
        image_size=None if image_size is None else int(image_size),
        patch_size=None if patch_size is None else int(patch_size),
        patch_stride=int(mp["patch_stride"]), patches_per_image=int(mp["patches_per_image"]),
        n_draws=int(mp["n_draws"]), t_range=(float(mp["t_range"][0]), float(mp["t_range"][1])),
        prefer=str(mp["prefer"]), dift_t=float(mp["dift_t"]), dift_up_block=int(mp["dift_up_block"]),
        dift_ensemble=int(mp["dift_ensemble"]), dift_input=str(mp["dift_input"]),
        n_clusters=int(mp["n_clusters"]), kmeans_n_init=int(mp["kmeans_n_init"]), seed=int(mp["seed"]),
        batch_size=max(1, int(batch_size)),
    )
