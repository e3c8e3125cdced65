"""Distillation methods as data: which stage implementations each method composes and
which parameters (with paper defaults) it accepts.  No Dagster imports; the Dagster layer
builds one asset chain per entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodSpec:
    name: str
    select: str  # registry name of the ``select`` stage ("" for pixel-optimizing methods)
    candidates: str  # the asset its candidates come from (manifest, rded_scores, teacher_features, ...)
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    label_keys: tuple[str, ...] = ()  # parameters that change only the labels/students, not the images
    # pixel-optimizing methods (EDF, UDD): the module ``dd_assets.defs.<synthesize>_assets`` builds
    # the entry's ``<entry>_distilled`` asset (no selection asset) and any shared assets it needs
    synthesize: str | None = None


METHODS: dict[str, MethodSpec] = {
    "random": MethodSpec(
        "random",
        select="random",
        candidates="manifest",
        defaults={"seed": 0},
        description="seeded random real subset (the baseline every result is compared with)",
    ),
    "rded": MethodSpec(
        "rded",
        select="rded",
        candidates="rded_scores",
        defaults={"num_crop": 5, "mipc": 300, "factor": 1, "scale": [0.08, 1.0], "seed": 0},
        description="RDED: lowest observer-CE crops, factor x factor composites",
    ),
    "herding": MethodSpec(
        "herding",
        select="herding",
        candidates="teacher_features",
        defaults={},
        description="herding coreset over teacher penultimate features",
    ),
    "focusdc": MethodSpec(
        "focusdc",
        select="focusdc",
        candidates="focusdc_attention",
        defaults={"alpha": 0.8, "eta": 30.0, "m": 3, "n": 1, "variant": "max_as", "window": "max",
                  "confidence": "max", "context_sampling": "confidence", "seed": 0},
        description="FocusDC: ViT-attention key patches (m=3) + a low-res view (n=1) per image",
    ),
    "nrr": MethodSpec(
        "nrr",
        select="cidd",
        candidates="cidd_scores",
        defaults={"beta": 4, "num_crop": 5, "top_t": 1, "mipc": 300, "scale": [0.08, 1.0], "seed": 0,
                  "refine": True, "alpha_bn": 10.0, "eps": 0.5, "lr": 0.05, "iterations": 2000, "batch_size": 100,
                  "mask_on": "grad", "label_refine": False, "labels": "fkd", "r": 0.4, "alpha_dbr": 1.0},
        description="NRR-DD: lowest-confidence CAM-critical crops (CIDD), non-critical region refinement, DBR labels",
        label_keys=("labels", "r", "alpha_dbr"),
    ),
    "kmeans": MethodSpec(
        "kmeans",
        select="kmeans",
        candidates="teacher_features",
        defaults={"seed": 0, "n_init": 10},
        description="k-means coreset: real image nearest each of IPC centres per class",
    ),
    "ddps": MethodSpec(
        "ddps",
        select="ddps",
        candidates="ddps_clusters",
        defaults={
            # Stage I, R of every candidate window (asset ddps_scores; Sec. 3.2, Eq. 4-6)
            "mipc": 300, "image_size": 256, "patch_size": 224, "patch_stride": 8, "n_draws": 10,
            "t_range": [0.1, 0.7], "seed": 0,
            # Stage II, DIFT features of each image's best window, k-means (dift_features, ddps_clusters; Sec. 3.3)
            "patches_per_image": 1, "prefer": "low", "dift_t": 0.16, "dift_up_block": 1, "dift_ensemble": 1,
            "dift_input": "crop", "n_clusters": 32, "kmeans_n_init": 10,
            # the IPC-dependent take and composition (ddps_selection; Sec. 3.4, 4.2, supp. 5)
            "top_clusters": 10, "cluster": True, "concat_max_ipc": 10, "tiles": 4, "low_res_tiles": 1,
            "grouping": "contiguous",
        },
        description="DDPS: diffusion-scored patches (R, Eq. 6), DIFT k-means clusters, nearest-centre picks of "
                    "the top clusters; 2x2 composites for IPC <= 10 (whole images at low resolution, as RDED)",
    ),
}


def base_method(name: str, block: dict[str, Any] | None) -> str:
    """The catalog method an entry instantiates: ``method:`` in its block, else its name.

    Variants are data: ``nrr_dbr: {method: nrr, labels: dbr}`` is NRR-DD with DBR labels,
    a chain of its own next to ``nrr``.
    """
    return str((block or {}).get("method", name))


def check_methods(block: Any, where: str) -> None:
    """Raise a ValueError naming the unknown method or parameter and what is allowed."""
    if not isinstance(block, dict) or not block:
        raise ValueError(f"{where}: 'methods' must map method names to parameter blocks")
    for name, params in block.items():
        params = params or {}
        if not isinstance(params, dict):
            raise ValueError(f"{where}: methods.{name} must be a mapping of parameters")
        base = base_method(name, params)
        if base not in METHODS:
            raise ValueError(
                f"{where}: unknown method {base!r} under 'methods'{f' (methods.{name}.method)' if base != name else ''}; "
                f"known: {', '.join(sorted(METHODS))}"
            )
        if not str(name).replace("_", "").isalnum():
            raise ValueError(f"{where}: method name {name!r} must be letters, digits and '_' (it names assets)")
        allowed = {**METHODS[base].defaults, "method": base}
        for key in params:
            if key not in allowed:
                raise ValueError(
                    f"{where}: unknown parameter methods.{name}.{key}; "
                    f"allowed: {', '.join(sorted(allowed))}"
                )


def method_params(name: str, block: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults of the entry's base method overlaid with the user's block."""
    out = dict(METHODS[base_method(name, block)].defaults)
    out.update(block or {})
    out.pop("method", None)
    return out


def images_source(methods_block: dict[str, Any], name: str) -> str:
    """The entry whose distilled images entry ``name`` trains on: itself, unless an earlier
    entry of the same base method differs from it only in label parameters
    (``MethodSpec.label_keys``) -- then the images are identical and are computed once
    (e.g. ``nrr_dbr: {method: nrr, labels: dbr}`` labels ``nrr``'s refined images)."""
    base = base_method(name, methods_block.get(name))
    skip = set(METHODS[base].label_keys)
    mine = {k: v for k, v in method_params(name, methods_block.get(name)).items() if k not in skip}
    for other, block in methods_block.items():
        if other == name:
            return name
        if base_method(other, block) != base:
            continue
        theirs = {k: v for k, v in method_params(other, block).items() if k not in skip}
        if theirs == mine:
            return images_source(methods_block, other)
    return name


def uses(methods_block: dict[str, Any], base: str) -> bool:
    """Whether any entry of the ``methods`` block instantiates catalog method ``base``."""
    return any(base_method(n, b) == base for n, b in methods_block.items())
