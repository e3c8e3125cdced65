"""Comp-DD complexity of a batch of real images (EDF Sec. 3, App. D), pure torch/numpy: the
teacher's Grad-CAM of each image's own class and ``1 - share(CAM >= 0.5)``.  The
``comp_dd_complexity`` asset (:mod:`dd_assets.defs.methods.edf`) and ``benchmarks/gpu_table.py``
call :func:`comp_dd_batch` per batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from dd_assets.core.cam import cam_class_indices, grad_cam
from dd_assets.core.complexity import image_complexity
from dd_assets.core.imaging import to_model_input

#: Comp-DD's activation threshold (Sec. 3: "percentage of pixels whose activation >= 0.5").
COMP_DD_THRESHOLD = 0.5


def comp_dd_batch(teacher: nn.Module, images, labels, class_names: Sequence[str], teacher_class_names: Sequence[str],
                  mean: Sequence[float], std: Sequence[float], device: torch.device | str,
                  ) -> tuple[np.ndarray, torch.Tensor]:
    """``(complexity float64 [B], Grad-CAM [B, H, W])`` of uint8 ``images [B, 3, S, S]`` with class
    indices ``labels [B]`` (into ``class_names``; mapped to the teacher's classes by name)."""
    idx = cam_class_indices(np.asarray(labels), class_names, teacher_class_names)
    cams = grad_cam(teacher, to_model_input(images, mean, std, device), idx)
    return image_complexity(cams, COMP_DD_THRESHOLD), cams
