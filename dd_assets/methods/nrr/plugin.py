"""Plugin: NRR-DD -- CAM-critical low-confidence crops (CIDD, Alg. 1), non-critical region
refinement (Sec. 3.3, Eq. 2-5) and distance-based labels (DBR, Sec. 3.4)."""

from __future__ import annotations

from dataclasses import dataclass

from dd_assets.core.dbr import DEFAULT_ALPHA_DBR, DEFAULT_R
from dd_assets.methods.nrr.refine import NRRConfig as _RefineConfig
from dd_assets.methods.plugin import ClassCandidates, MethodPlugin, interleaved, param

_REFINE = _RefineConfig()   # the refinement maths' own defaults (supplementary A)

CONFIDENCE_CHOICES = ("true_class_ce", "max_prob")
CROP_SCORE_CHOICES = ("mean", "sum")


@dataclass(frozen=True)
class NRRParams:
    # CIDD (asset cidd_scores; Sec. 3.2, Alg. 1). beta auto: RDED's factor**2 at data.image_size
    # (1 up to 64 px, 4 above; the paper's 4 at 224 px); crop_score mean: CAM-critical = highest
    # mean CAM (sum favours the largest crop); confidence true_class_ce: Alg. 1 line 8, s(p) = L_ce(p)
    beta: object = param("auto", doc="crops per image (a square) or auto")
    num_crop: int = param(5, min=1)
    top_t: int = param(1, min=1)
    mipc: int = param(300, min=1)
    scale: list = param([0.08, 1.0])
    seed: int = param(0)
    crop_score: str = param("mean", choices=CROP_SCORE_CHOICES)
    confidence: str = param("true_class_ce", choices=CONFIDENCE_CHOICES)
    # refinement (Sec. 3.3; supplementary A)
    refine: bool = param(True)
    alpha_bn: float = param(_REFINE.alpha_bn)
    eps: float = param(_REFINE.eps)
    lr: float = param(_REFINE.lr)
    iterations: int = param(_REFINE.iterations, min=1)
    batch_size: int = param(_REFINE.batch_size, min=1)
    mask_on: str = param(_REFINE.mask_on, choices=("grad", "step"))
    label_refine: bool = param(False)
    # labels (Sec. 3.4): fkd | dbr (+ r, alpha_dbr); student_augment: Supp. A.2's 2x RandAugment
    labels: str = param("fkd", choices=("fkd", "dbr", "online", "hard"))
    r: float = param(DEFAULT_R)
    alpha_dbr: float = param(DEFAULT_ALPHA_DBR)
    student_augment: str = param("none", choices=("none", "randaugment"))


def tiles(cfg: NRRParams, ipc: int, size: int) -> int:
    """sqrt(beta); ``beta: auto`` = RDED's factor at the working ``size``, squared."""
    from dd_assets.methods.nrr.cidd import beta_to_factor, resolve_beta

    return beta_to_factor(resolve_beta(cfg.beta, int(size), "methods.nrr.beta"))


def select(cfg: NRRParams, cands: ClassCandidates, ipc: int, size: int):
    """The ``beta * IPC`` least confident CAM-critical crops (Alg. 1 line 9), RDED's tiling."""
    from dd_assets.methods.nrr.cidd import cidd_select

    per_class = ipc * tiles(cfg, ipc, size) ** 2
    cands.need(len(cands.source_id), per_class, "scored crops (methods.<entry>.mipc pool)")
    return interleaved(cands, cidd_select(cands.crops(), per_class, confidence=cfg.confidence), ipc)


def refine(cfg: NRRParams, images, labels, teacher, mean, std, device, on_step=None):
    """Sec. 3.3: refine only the non-critical regions (CAM < eps) of the composites."""
    from dd_assets.methods.nrr.refine import refine as nrr_refine

    rc = _RefineConfig(alpha_bn=float(cfg.alpha_bn), eps=float(cfg.eps), lr=float(cfg.lr),
                      iterations=int(cfg.iterations), batch_size=int(cfg.batch_size), seed=int(cfg.seed),
                      mask_on=cfg.mask_on, r=float(cfg.r))
    return nrr_refine(images, labels, teacher, None, rc, mean, std, device,
                      label_refine=bool(cfg.label_refine), on_step=on_step)


PLUGIN = MethodPlugin(
    name="nrr", config=NRRParams, kind="select", candidates="cidd_scores", select=select, tiles=tiles,
    refine=refine, refines=lambda cfg: bool(cfg.refine),
    description="NRR-DD: lowest-confidence CAM-critical crops (CIDD), non-critical region refinement, DBR labels",
    label_keys=("labels", "r", "alpha_dbr", "student_augment"),
    version="2",  # 2: beta auto, mean-CAM crops, true-class-CE confidence
    compat={"student_augment": "none"},
)
