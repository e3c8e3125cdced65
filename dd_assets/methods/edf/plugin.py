"""Plugin: EDF (Emphasizing Discriminative Features) -- trajectory matching (DATM options) with
Common Pattern Dropout (Eq. 2) and Grad-CAM-weighted pixel updates (DAE, Eq. 3-5); synthetic
images start from seeded real images. Its Dagster piece (experts, Comp-DD, the distilled asset)
is ``dd_assets/defs/methods/edf.py``."""

from __future__ import annotations

from dataclasses import dataclass

from dd_assets.methods.plugin import MethodPlugin, param


@dataclass(frozen=True)
class EDFParams:
    # the modules (Table 4 ablation): mtt = both off, edf_cpd / edf_dae = one on
    use_cpd: bool = param(True)
    use_dae: bool = param(True)
    # null = App. B Table 8 for this IPC (edf.edf_config); a number, or {ipc: number, ...}
    alpha: object = param(None)
    beta: object = param(None)
    cam_every: object = param(None)
    iterations: object = param(None, min=1)
    batch_syn: object = param(None, min=1)
    lr_img: object = param(None)
    lr_label: object = param(None)
    syn_steps: object = param(None, min=1)
    # null = the authors' public config for this IPC (M, DATM start-epoch window)
    expert_epochs: object = param(None, min=1)
    max_start_epoch: object = param(None)
    initial_max_start_epoch: object = param(None)
    expansion_end_iteration: object = param(None)
    # IPC-independent (public configs; MTT/DATM): student lr, momenta, soft labels, loss cap
    min_start_epoch: int = param(0)
    lr_init: float = param(0.01)
    lr_lr: float = param(1e-05)
    lr_param: str = param("raw")
    img_momentum: float = param(0.5)
    lr_momentum: float = param(0.5)
    soft_labels: bool = param(True)
    soft_label_expert: int = param(0)
    label_momentum: float = param(0.9)
    sequential: bool = param(True)
    max_loss: float = param(1.5)
    # CPD (Eq. 2) / DAE (Eq. 3-5) details: one term per scalar, Eq. 4's per-image mean threshold
    cpd_granularity: str = param("element")
    cpd_normalize: str = param("kept")
    cam_threshold: object = param(None)
    cam_image_size: object = param(None)
    augment: str = param("dsa", choices=("dsa", "none"))
    table8_subset: object = param(None)
    seed: int = param(0)


PLUGIN = MethodPlugin(
    name="edf", config=EDFParams, kind="synthesize", candidates="expert_trajectories",
    description="EDF: trajectory matching (DATM options) + Common Pattern Dropout + Grad-CAM-weighted "
                "pixel updates (DAE); synthetic images start from seeded real images",
)
