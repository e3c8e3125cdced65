"""DBR: Distance-Based Representative labels of NRR-DD (Sec. 3.4, Eq. 6-10, 12).

Instead of the teacher's soft label of every mixed view (``C`` floats per view, FKD-style,
see :mod:`dd_assets.core.soft_labels`), DBR stores per view only **two floats**: the
cross-entropy of the teacher's prediction on the mixed view against the one-hot label of
each of the two mixed images.

For a view ``e`` of distilled image ``i`` (``x_org = images[i]``, ``y_org = labels[i]``)
mixed with its partner ``p = views.partner[i, e]`` (``x_aug``, ``y_aug = labels[p]``):

    x_mix  = A(x_org, x_aug)                                  (Eq. 6; A = CutMix here)
    y_soft = T(x_mix)                                         (Eq. 7)
    d_org^T = L_ce(y_soft, y_org) = -log softmax(T(x_mix))[y_org]
    d_aug^T = L_ce(y_soft, y_aug) = -log softmax(T(x_mix))[y_aug]      (Eq. 8)

and the student ``S`` is trained on the same view with

    d_org^S = L_ce(S(x_mix), y_org),  d_aug^S = L_ce(S(x_mix), y_aug)   (Eq. 10)
    L_sce = max(0, d_org^S - r) + max(0, d_aug^S - r)
    L_dbr = |d_org^S - d_org^T| + |d_aug^S - d_aug^T|
    L_S   = L_sce + alpha_dbr * L_dbr                                    (Eq. 9)

with ``r = 0.4`` and ``alpha_dbr = 1`` (supplementary A).  Both "distances" are
cross-entropies of *logits* (class probabilities) against one-hot labels, not distances
between feature vectors.

The pair index and the mixing parameters are the :class:`~dd_assets.core.soft_labels.ViewParams`
the FKD labels already use (crop, flip, partner, CutMix box, lam), so the student replays
the identical view with :func:`~dd_assets.core.soft_labels.render_views`.

Stage registered here: ``("label", "dbr")`` -> :func:`teacher_dbr_labels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.imaging import as_tensor
from dd_assets.core.soft_labels import ViewParams, render_views

DEFAULT_R = 0.4
DEFAULT_ALPHA_DBR = 1.0


# ---------------------------------------------------------------------------- distances / losses


def ce_distances(
    logits: torch.Tensor, y_org: torch.Tensor, y_aug: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(d_org, d_aug)`` of Eq. 8 (teacher logits) / Eq. 10 (student logits).

    ``d = L_ce(softmax(logits), onehot(y)) = -log softmax(logits)[y]`` (temperature 1).

    Args:
        logits: ``[B, num_classes]`` predictions on the mixed views ``x_mix``.
        y_org, y_aug: ``[B]`` int64 labels of the two mixed images.

    Returns:
        ``(d_org [B], d_aug [B])`` float32, differentiable w.r.t. ``logits``.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    y_org = torch.as_tensor(y_org, dtype=torch.long, device=logp.device).view(-1, 1)
    y_aug = torch.as_tensor(y_aug, dtype=torch.long, device=logp.device).view(-1, 1)
    return -logp.gather(1, y_org)[:, 0], -logp.gather(1, y_aug)[:, 0]


def sce_loss(d_org: torch.Tensor, d_aug: torch.Tensor, r: float = DEFAULT_R) -> torch.Tensor:
    """``L_sce`` of Eq. 9 (also ``L_lr`` of Eq. 12 when fed teacher distances), batch mean.

    ``max(0, d_org - r) + max(0, d_aug - r)``; ``d_org, d_aug``: ``[B]`` -> scalar.
    """
    return (F.relu(d_org - r) + F.relu(d_aug - r)).mean()


def dbr_loss(
    d_s_org: torch.Tensor, d_s_aug: torch.Tensor, d_t_org: torch.Tensor, d_t_aug: torch.Tensor
) -> torch.Tensor:
    """``L_dbr`` of Eq. 9: ``|d_org^S - d_org^T| + |d_aug^S - d_aug^T|``, batch mean.

    All inputs ``[B]`` (student distances from Eq. 10, stored teacher distances from
    Eq. 8) -> scalar.
    """
    d_t_org = torch.as_tensor(d_t_org, dtype=d_s_org.dtype, device=d_s_org.device)
    d_t_aug = torch.as_tensor(d_t_aug, dtype=d_s_aug.dtype, device=d_s_aug.device)
    return ((d_s_org - d_t_org).abs() + (d_s_aug - d_t_aug).abs()).mean()


def student_loss(
    student_logits: torch.Tensor,
    y_org: torch.Tensor,
    y_aug: torch.Tensor,
    d_t_org: torch.Tensor,
    d_t_aug: torch.Tensor,
    r: float = DEFAULT_R,
    alpha_dbr: float = DEFAULT_ALPHA_DBR,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Student objective ``L_S = L_sce + alpha_dbr * L_dbr`` (Eq. 9, with Eq. 10).

    Args:
        student_logits: ``[B, num_classes]`` ``S(x_mix)`` on the replayed views.
        y_org, y_aug: ``[B]`` labels of the two mixed images.
        d_t_org, d_t_aug: ``[B]`` stored teacher distances (:class:`DBRLabels`).

    Returns:
        ``(loss, parts)``: scalar loss and ``{"sce", "dbr"}`` floats for logging.
    """
    loss, l_sce, l_dbr = student_objective(student_logits, y_org, y_aug, d_t_org, d_t_aug, r, alpha_dbr)
    return loss, {"sce": float(l_sce.detach()), "dbr": float(l_dbr.detach())}


def student_objective(
    student_logits: torch.Tensor,
    y_org: torch.Tensor,
    y_aug: torch.Tensor,
    d_t_org: torch.Tensor,
    d_t_aug: torch.Tensor,
    r: float = DEFAULT_R,
    alpha_dbr: float = DEFAULT_ALPHA_DBR,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 9 with Eq. 10 as tensors, no host synchronisation: ``(L_S, L_sce, L_dbr)``
    (what :func:`student_loss` returns, before its floats for logging)."""
    d_s_org, d_s_aug = ce_distances(student_logits, y_org, y_aug)
    l_sce = sce_loss(d_s_org, d_s_aug, r)
    l_dbr = dbr_loss(d_s_org, d_s_aug, d_t_org, d_t_aug)
    return l_sce + alpha_dbr * l_dbr, l_sce, l_dbr


# ---------------------------------------------------------------------------- stored labels


@dataclass
class DBRLabels:
    """Stored DBR targets for ``E`` views of each of ``N`` distilled images.

    ``views``: the :class:`ViewParams` (crop, flip, partner = pair index, CutMix box, lam)
    the distances were computed on; ``d_org [N, E] float32`` and ``d_aug [N, E] float32``:
    Eq. 8 for each view -- two floats per view, whatever the number of classes.
    The labels ``y_org = labels[i]``, ``y_aug = labels[views.partner[i, e]]`` come from the
    distilled set's hard labels and are not stored again.
    """

    views: ViewParams
    d_org: np.ndarray
    d_aug: np.ndarray

    def __post_init__(self) -> None:
        want = (self.views.num_images, self.views.epochs)
        if self.d_org.shape != want or self.d_aug.shape != want:
            raise ValueError(f"d_org {self.d_org.shape} / d_aug {self.d_aug.shape} disagree with views {want}")

    def label_nbytes(self) -> int:
        """Bytes of the distances alone: ``N * E * 2 * 4``."""
        return int(self.d_org.nbytes + self.d_aug.nbytes)

    def nbytes(self) -> int:
        """Bytes of all stored label data: the two distances + view parameters."""
        return int(self.label_nbytes() + self.views.nbytes())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat dict of arrays for storage (inverse: :meth:`from_arrays`)."""
        v = self.views
        return {**v.to_arrays(), "d_org": self.d_org, "d_aug": self.d_aug}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> DBRLabels:
        """Rebuild from :meth:`to_arrays` output."""
        return cls(
            views=ViewParams.from_arrays(arrays),
            d_org=np.asarray(arrays["d_org"], np.float32),
            d_aug=np.asarray(arrays["d_aug"], np.float32),
        )

    def batch_targets(
        self,
        e: int,
        idx: torch.Tensor | Sequence[int] | np.ndarray,
        hard_labels: np.ndarray | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targets of view ``e`` for images ``idx [B]``: ``(y_org, y_aug, d_org, d_aug)``.

        ``hard_labels [N]``: class of every distilled image.  Returns CPU tensors, ``[B]``
        each (int64, int64, float32, float32), ready for :func:`student_loss`.
        """
        idx_np = np.asarray(torch.as_tensor(idx).cpu(), dtype=np.int64).reshape(-1)
        lab = np.asarray(torch.as_tensor(np.asarray(hard_labels)).cpu(), dtype=np.int64).reshape(-1)
        partner = self.views.partner[idx_np, e].astype(np.int64)
        return (
            torch.from_numpy(lab[idx_np]),
            torch.from_numpy(lab[partner]),
            torch.from_numpy(self.d_org[idx_np, e].astype(np.float32)),
            torch.from_numpy(self.d_aug[idx_np, e].astype(np.float32)),
        )


@torch.no_grad()
def teacher_dbr_labels(
    teacher: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    views: ViewParams,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> DBRLabels:
    """Teacher distances (Eq. 6-8) for every stored view of ``images`` (uint8 ``[N, C, S, S]``).

    Views are rendered exactly as :func:`render_views` does (CutMix with
    ``views.partner``); the teacher runs in eval mode (previous mode restored).

    Args:
        labels: ``[N]`` hard label of every distilled image.

    Returns:
        :class:`DBRLabels` with ``d_org, d_aug [N, E] float32``.
    """
    # Deviation/reading: A is CutMix (the mixing the shared ViewParams replay implements);
    # the paper allows CutMix or Mixup.  y_aug is the partner's label for every view, also
    # the rare views where the CutMix box came out empty (then d_aug is simply the
    # teacher's CE for the partner class on an un-mixed view).
    imgs = as_tensor(images)
    n, e_count = views.num_images, views.epochs
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if imgs.shape[0] != n or lab.shape[0] != n:
        raise ValueError(f"{imgs.shape[0]} images, {lab.shape[0]} labels, views for {n}")
    partner = torch.from_numpy(views.partner.astype(np.int64))
    d_org = np.empty((n, e_count), np.float32)
    d_aug = np.empty((n, e_count), np.float32)
    was_training = teacher.training
    teacher.eval()
    try:
        for e in range(e_count):
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(start + batch_size, n))
                x = render_views(imgs, views, e, idx, mean, std, device=device)
                logits = teacher(x)
                do, da = ce_distances(logits, lab[idx].to(logits.device), lab[partner[idx, e]].to(logits.device))
                d_org[idx.numpy(), e] = do.cpu().numpy()
                d_aug[idx.numpy(), e] = da.cpu().numpy()
    finally:
        teacher.train(was_training)
    return DBRLabels(views=views, d_org=d_org, d_aug=d_aug)
