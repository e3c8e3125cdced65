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
    # bump when the method's own code changes its outputs (feeds the code_version of every asset
    # that hashes ``methods.<entry>``; "1" leaves the hashes of unchanged methods as they were)
    version: str = "1"
    # parameters added after outputs existed -> the value that reproduces those outputs: a key at
    # that value is left out of the hashed parameters, so adding it re-versions nothing
    compat: dict[str, Any] = field(default_factory=dict)


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
                  "confidence": "max", "context_sampling": "confidence", "area_score": "mean", "seed": 0},
        description="FocusDC: ViT-attention key patches (m=3) + a low-res view (n=1) per image",
        # 2: s_area on the paper's scale (window mean of patch-normalized attention, Eq. 5) and
        #    context weights follow the configured confidence
        version="2",
    ),
    "nrr": MethodSpec(
        "nrr",
        select="cidd",
        candidates="cidd_scores",
        # beta auto: RDED's factor**2 at data.image_size (1 up to 64 px, 4 above; the paper's 4 at 224 px);
        # crop_score mean: CAM-critical = highest mean CAM (sum favours the largest crop);
        # confidence true_class_ce: Alg. 1 line 8, s(p) = L_ce(p), highest CE kept
        defaults={"beta": "auto", "num_crop": 5, "top_t": 1, "mipc": 300, "scale": [0.08, 1.0], "seed": 0,
                  "crop_score": "mean", "confidence": "true_class_ce",
                  "refine": True, "alpha_bn": 10.0, "eps": 0.5, "lr": 0.05, "iterations": 2000, "batch_size": 100,
                  "mask_on": "grad", "label_refine": False, "labels": "fkd", "r": 0.4, "alpha_dbr": 1.0,
                  # none | randaugment: Supp. A.2's 2x RandAugment on the stored views (docs/methods.md)
                  "student_augment": "none"},
        description="NRR-DD: lowest-confidence CAM-critical crops (CIDD), non-critical region refinement, DBR labels",
        label_keys=("labels", "r", "alpha_dbr", "student_augment"),
        version="2",  # 2: beta auto, mean-CAM crops, true-class-CE confidence
        compat={"student_augment": "none"},
    ),
    "kmeans": MethodSpec(
        "kmeans",
        select="kmeans",
        candidates="teacher_features",
        defaults={"seed": 0, "n_init": 10},
        description="k-means coreset: real image nearest each of IPC centres per class",
    ),
    "edf": MethodSpec(
        "edf",
        select="",
        candidates="expert_trajectories",
        synthesize="edf",
        defaults={
            # the modules (Table 4 ablation): mtt = both off, edf_cpd / edf_dae = one on
            "use_cpd": True, "use_dae": True,
            # null = App. B Table 8 for this IPC (edf.edf_config); a number, or {ipc: number, ...}
            "alpha": None, "beta": None, "cam_every": None, "iterations": None, "batch_syn": None,
            "lr_img": None, "lr_label": None, "syn_steps": None,
            # null = the authors' public config for this IPC (M, DATM start-epoch window)
            "expert_epochs": None, "max_start_epoch": None, "initial_max_start_epoch": None,
            "expansion_end_iteration": None,
            # IPC-independent (public configs; MTT/DATM): student lr, momenta, soft labels, loss cap
            "min_start_epoch": 0, "lr_init": 0.01, "lr_lr": 1e-5, "lr_param": "raw", "img_momentum": 0.5,
            "lr_momentum": 0.5, "soft_labels": True, "soft_label_expert": 0, "label_momentum": 0.9,
            "sequential": True, "max_loss": 1.5,
            # CPD (Eq. 2) / DAE (Eq. 3-5) details: one term per scalar, Eq. 4's per-image mean threshold
            "cpd_granularity": "element", "cpd_normalize": "kept", "cam_threshold": None, "cam_image_size": None,
            "augment": "dsa", "table8_subset": None, "seed": 0,
        },
        description="EDF: trajectory matching (DATM options) + Common Pattern Dropout + Grad-CAM-weighted "
                    "pixel updates (DAE); synthetic images start from seeded real images",
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
    "udd": MethodSpec(
        "udd",
        select="",
        candidates="manifest",
        synthesize="udd",
        # dd_assets.methods.udd.UDDConfig's fields (same names; tests/test_udd_graph.py checks they agree)
        defaults={
            # Algorithm 1 loops and the pixel optimizer (App. A; IDC where UDD is silent)
            "iterations": 2000, "inner_steps": 100, "lr_img": 0.005, "momentum_img": 0.5,
            "lr_milestones": [0.6, 0.8, 0.9], "lr_gamma": 0.5, "optimize_in": "pixels", "clamp": True,
            # gradient matching (Eq. 9) and the proxy network trained on real data (Eq. 6)
            "batch_real": 64, "batch_syn_max": 128, "distance": "mse", "match_params": "all",
            "net_train_on": "real", "net_lr": 0.01, "net_momentum": 0.9, "net_weight_decay": 0.0005,
            "net_batch_size": 64, "net_steps": 1, "arch": "convnet_d3", "arch_kwargs": {"norm": "instance"},
            # under-used regions (Sec. 2.2-2.4): policy none | response | jitter
            "policy": "jitter", "response": "activation", "window_fractions": [1 / 3, 1 / 2, 2 / 3], "top_p": 8,
            "jitter": "gaussian", "jitter_copies": 2, "jitter_std": 0.1, "jitter_prob": 0.05,
            # CFC (Eq. 7-8, 10)
            "cfc": True, "cfc_weight": 1.0, "tau": 0.7, "alpha": 0.5, "cfc_include_positive": False,
            # the seeded real initialization (the random baseline's images at the same seed) and every draw
            "seed": 0,
        },
        description="UDD: gradient matching from real initial images, under-used regions (jitter policy) "
                    "upsampled into the matching batch, CFC loss",
        version="2",  # 2: lr milestones round halves up (0.9 * 5 iterations = 4.5 -> 5, was 4)
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


def hashed_params(name: str, block: dict[str, Any] | None) -> dict[str, Any]:
    """The resolved parameters as hashed into versions and ``params_hash`` columns: a parameter
    at its ``MethodSpec.compat`` value (added after outputs existed, at the value that
    reproduces them) is left out, so adding it changes no existing version or table."""
    spec = METHODS[base_method(name, block)]
    return {k: v for k, v in method_params(name, block).items() if not (k in spec.compat and v == spec.compat[k])}


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
