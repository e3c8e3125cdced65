"""The evaluation protocol: how every distilled set's students are trained and compared.

One protocol for every row of a report (the "identical ruler" DD-Ranking asks for): the
``labels`` block (views, CutMix, label mode), the ``student`` block (architecture, optimizer,
epochs, temperature) and the ``eval`` block (extra budgets, hard-label students, the
full-data reference, the LRS weight).  :func:`resolve` turns those blocks into one
:class:`Protocol` and names it (``recipe``) so a results row says which ruler it used.

View crop scale (``labels.crop_scale: auto``) follows RDED's student pipeline,
``RandomResizedCrop(scale=(1 / factor, 1))`` (RDED ``validation/main.py``), with RDED's factor
by resolution: its scripts use factor 1 for CIFAR-10/100 (32 px) and Tiny-ImageNet (64 px) and
factor 2 for ImageNet-scale inputs (ImageNette/Woof/100/1K).  So a 32-px set gets scale (1, 1):
no zoom crops, only flips and CutMix.  (RDED also shuffles the factor x factor patches of each
view; at factor 1 that is the identity, and dd_assets does not do it at factor 2.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Largest working resolution at which RDED uses factor 1 (its Tiny-ImageNet scripts, 64 px).
RDED_FACTOR1_MAX_SIZE = 64


def rded_factor(image_size: int) -> int:
    """RDED's composite factor for a working resolution: 1 up to 64 px, 2 above."""
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return 1 if int(image_size) <= RDED_FACTOR1_MAX_SIZE else 2


def resolve_crop_scale(crop_scale: Any, image_size: int, where: str = "labels.crop_scale") -> tuple[float, float]:
    """``auto`` / None -> RDED's ``(1 / factor, 1)`` at ``image_size``; else a validated pair.

    >>> resolve_crop_scale("auto", 32)
    (1.0, 1.0)
    >>> resolve_crop_scale("auto", 224)
    (0.5, 1.0)
    """
    if crop_scale is None or crop_scale == "auto":
        return (1.0 / rded_factor(image_size), 1.0)
    try:
        lo, hi = (float(v) for v in crop_scale)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be 'auto' or [min, max] area fractions, got {crop_scale!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{where} = [{lo}, {hi}]: need 0 < min <= max <= 1 (area fractions of the image)")
    return (lo, hi)


@dataclass(frozen=True)
class Protocol:
    """The resolved student recipe shared by every row of one profile.

    ``epochs``: the main budget; ``budgets``: every budget trained, ascending (the main one
    included); ``views``: augmentation views stored per image (enough for the longest budget).
    """

    crop_scale: tuple[float, float]
    cutmix_alpha: float
    label_mode: str
    temperature: float
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    budgets: tuple[int, ...]
    views: int
    hard_labels: bool | tuple[str, ...]
    lrs_weight: float
    arch: str
    hard_seeds: tuple[int, ...] | None = None   # None: every student seed

    def hard_for(self, entry: str) -> bool:
        """Whether entry ``entry`` trains hard-label students (``eval.hard_labels``: true, or a list of entries)."""
        return entry in self.hard_labels if isinstance(self.hard_labels, tuple) else bool(self.hard_labels)

    @property
    def recipe(self) -> str:
        """A short name of the ruler, stored in every results row."""
        lo, hi = self.crop_scale
        mix = f"cutmix{self.cutmix_alpha:g}" if self.cutmix_alpha > 0 else "nocutmix"
        return (f"{self.optimizer}-lr{self.lr:g}-wd{self.weight_decay:g}-bs{self.batch_size}-T{self.temperature:g}"
                f"-crop{lo:g}-{hi:g}-{mix}")


def eval_block(params_raw: Mapping[str, Any]) -> dict[str, Any]:
    """The ``eval`` block with its defaults (profiles written before it existed still load)."""
    ev = dict(params_raw.get("eval") or {})
    ev.setdefault("budgets", [])
    ev.setdefault("hard_labels", False)
    ev.setdefault("lrs_weight", 0.5)
    return ev


def budgets(student: Mapping[str, Any], ev: Mapping[str, Any]) -> tuple[int, ...]:
    """Every student budget (epochs) trained: ``student.epochs`` plus ``eval.budgets``, ascending."""
    out = {int(student["epochs"])}
    for b in ev.get("budgets") or []:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"eval.budgets must hold positive integers (epochs), got {b!r}")
        out.add(int(b))
    return tuple(sorted(out))


def resolve(params_raw: Mapping[str, Any]) -> Protocol:
    """The :class:`Protocol` of a profile's effective parameters (``Params.raw``)."""
    data, lab, st = params_raw["data"], params_raw["labels"], params_raw["student"]
    ev = eval_block(params_raw)
    w = float(ev["lrs_weight"])
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"eval.lrs_weight must be in [0, 1] (DD-Ranking's w), got {w}")
    bud = budgets(st, ev)
    views = int(lab.get("views") or max(bud))
    return Protocol(
        crop_scale=resolve_crop_scale(lab.get("crop_scale", "auto"), int(data["image_size"])),
        cutmix_alpha=float(lab["cutmix_alpha"]), label_mode=str(lab["mode"]),
        temperature=float(st["temperature"]), optimizer=str(st["optimizer"]), lr=float(st["lr"]),
        weight_decay=float(st["weight_decay"]), batch_size=int(st["batch_size"]), epochs=int(st["epochs"]),
        budgets=bud, views=views, lrs_weight=w, arch=str(st["arch"]),
        hard_labels=tuple(ev["hard_labels"]) if isinstance(ev["hard_labels"], list) else bool(ev["hard_labels"]),
        hard_seeds=None if ev.get("hard_seeds") is None else tuple(int(s) for s in ev["hard_seeds"]),
    )


def student_runs(proto: Protocol, entry: str, label_mode: str, seeds) -> list[tuple[int, int, str]]:
    """Every student an entry trains, as ``(seed, epochs, label mode)`` in training order:
    each budget with the entry's own labels, then (``eval.hard_labels`` naming the entry, and
    the seed in ``eval.hard_seeds``) one hard-label student at the main budget."""
    out = []
    for seed in seeds:
        out += [(int(seed), e, label_mode) for e in proto.budgets]
        if proto.hard_for(entry) and label_mode != "hard" and (proto.hard_seeds is None or int(seed) in proto.hard_seeds):
            out.append((int(seed), proto.epochs, "hard"))
    return out
