"""UDD category-wise feature contrastive loss (Sec. 2.5, Eq. 7) and moving class centres (Eq. 8).

Paper: /work/shared/papers/004_5acb7ff699889e9c.txt.  :func:`cfc_loss` is ``L_c`` of one class
batch against every class centre; :class:`ClassCentres` keeps the centres as a moving average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cfc_loss(
    features: torch.Tensor,
    class_index: int,
    centres: torch.Tensor,
    tau: float = 0.7,
    valid: torch.Tensor | None = None,
    include_positive: bool = False,
) -> torch.Tensor:
    """Category-wise feature contrastive loss (Eq. 7) of one class batch.

    ``f_bar_c`` = mean of ``features`` (the embedded synthetic training batch of class ``c``);
    ``s_i = cos(f_bar_c, F_bar_i) / tau`` against every class centre::

        L_c = -log( exp(s_c) / sum_{i != c} exp(s_i) ) = -s_c + logsumexp_{i != c} s_i      (Eq. 7)

    The denominator excludes the positive as Eq. 7's indicator ``1[i != c]`` says;
    ``include_positive=True`` gives the InfoNCE / SimCLR form (``i`` over all classes).
    Centres are constants here (no gradient through them).  Classes with ``valid[i] = False``
    (no centre yet) are left out; with no negative left the loss is 0 (still in the graph).

    Args:
        features: ``[B, D]``; centres: ``[C, D]``; valid: bool ``[C]`` or None (all valid).

    Returns:
        scalar tensor.
    """
    if features.ndim != 2 or centres.ndim != 2 or features.shape[1] != centres.shape[1]:
        raise ValueError(f"features [B, D] and centres [C, D] expected, got {tuple(features.shape)}, {tuple(centres.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    num = centres.shape[0]
    if not 0 <= class_index < num:
        raise ValueError(f"class_index {class_index} outside [0, {num})")
    ok = torch.ones(num, dtype=torch.bool, device=centres.device) if valid is None else valid.to(centres.device)
    if not bool(ok[class_index]):
        raise ValueError(f"class {class_index} has no centre yet (valid[{class_index}] is False)")
    f = features.mean(0, keepdim=True)
    s = F.cosine_similarity(f, centres.detach().to(f.dtype), dim=1, eps=1e-8) / tau  # [C]
    neg = ok.clone()
    neg[class_index] = False
    if not bool(neg.any()):
        return f.sum() * 0.0
    denom = neg.clone()
    if include_positive:
        denom[class_index] = True
    return -s[class_index] + torch.logsumexp(s[denom], dim=0)


class ClassCentres:
    """Class-mean features as a moving average (Eq. 8): ``F_bar_c <- alpha F_bar_c + (1 - alpha) f_bar_c``.

    ``centres [C, D]`` (detached) and ``valid [C]`` (a centre has been set).  The first
    :meth:`update` of a class sets its centre to ``f_bar_c`` (no average with zeros).
    """

    def __init__(self, num_classes: int, dim: int, alpha: float = 0.5, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.centres = torch.zeros((num_classes, dim), device=device)
        self.valid = torch.zeros(num_classes, dtype=torch.bool, device=device)

    def update(self, class_index: int, batch_mean: torch.Tensor) -> None:
        """Eq. 8 with ``batch_mean [D]`` = ``f_bar_c^t`` (detached)."""
        f = batch_mean.detach().reshape(-1).to(self.centres)
        if bool(self.valid[class_index]):
            self.centres[class_index] = self.alpha * self.centres[class_index] + (1.0 - self.alpha) * f
        else:
            self.centres[class_index] = f
            self.valid[class_index] = True
