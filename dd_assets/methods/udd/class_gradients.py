"""Per-class parameter gradients from ONE forward pass (vectorized gradient matching).

Gradient matching (UDD Eq. 9, /work/shared/papers/004_5acb7ff699889e9c.txt; DC / IDC) needs,
for every class ``c``, the gradient of that class's mean cross-entropy w.r.t. every weight
tensor, ``g_c = grad_theta (1/n_c) sum_{i in c} CE_i`` -- on the synthetic side with the graph
kept (second order).  The reference loop (:func:`dd_assets.methods.udd.distill.udd_distill` with
``vectorized=False``) runs the whole network once per class.  Here all classes go through the
network in one batch and the per-class gradients are separated at each layer:

1. forward hooks record, for every parameterized layer call, its input ``a`` and add a zero
   *probe* ``z`` to its output (``out + z``; ``z`` is a stride-0 view of one zero, so it costs
   no memory);
2. ``L = sum_c (1/n_c) sum_{i in c} CE_i`` and ONE ``autograd.grad(L, probes)`` gives every
   layer's output gradient ``delta`` (per sample; the ``1/n_c`` of each class is inside);
3. per class, the weight gradient is the layer's usual reduction over that class's rows only:
   ``Conv2d``: ``aten.convolution_backward(delta_c, a_c, W)`` (weight, bias);
   ``Linear``: ``delta_c^T a_c`` and ``sum delta_c``; ``GroupNorm`` (instance norm of the
   ConvNet): ``sum delta_c * a_hat_c`` and ``sum delta_c`` with ``a_hat = group_norm(a)``.

With ``create_graph=True`` every step is differentiable, so ``g_c`` carries the graph back to
the synthetic pixels exactly as the per-class ``autograd.grad(..., create_graph=True)`` does.

This is exact only when samples do not interact inside the network (each row's output depends
on its own input only): instance / group norm yes, batch norm (train mode) no.  Layers with
parameters other than the three above, batch norm and dropout make :func:`batched_support`
report a reason; the caller then keeps the per-class loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, nn.GroupNorm)
_COUPLING = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Dropout)


def batched_support(model: nn.Module) -> str | None:
    """``None`` if :class:`LayerTape` computes exact per-class gradients for ``model``, else the
    reason why not (a layer type it cannot separate, or one that couples samples)."""
    for name, mod in model.named_modules():
        if isinstance(mod, _COUPLING):
            return f"{name or 'model'} ({type(mod).__name__}) couples the samples of a batch"
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if own and not isinstance(mod, SUPPORTED_LAYERS):
            return f"{name or 'model'} ({type(mod).__name__}) has parameters of an unsupported layer type"
        if isinstance(mod, nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
            return f"{name} uses padding {mod.padding!r} / mode {mod.padding_mode!r}"
    return None


class LayerTape:
    """Context manager recording every supported layer call of ``model`` (see module docs).

    ::

        with LayerTape(model) as tape:
            logits = model(x)                       # all classes, rows grouped by class
        grads = tape.class_gradients(logits, y, sizes, create_graph=True)

    ``grads[c]`` lists the gradients of class ``c``'s mean CE w.r.t. the model's trainable
    parameters, in ``model.parameters()`` order (zeros for a parameter the forward never used).
    """

    def __init__(self, model: nn.Module) -> None:
        reason = batched_support(model)
        if reason is not None:
            raise ValueError(f"per-class gradients from one batch are not exact for this model: {reason}")
        self.model = model
        self.records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []

    def _hook(self, mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        probe = out.new_zeros(()).expand(out.shape).requires_grad_(True)
        self.records.append((mod, inputs[0], probe))
        return out + probe

    def __enter__(self) -> LayerTape:
        self.records = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.model.modules()
                         if isinstance(m, SUPPORTED_LAYERS) and any(True for _ in m.parameters(recurse=False))]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def class_gradients(
        self, logits: torch.Tensor, labels: torch.Tensor, sizes: Sequence[int], create_graph: bool = False
    ) -> list[list[torch.Tensor]]:
        """Per-class gradients of the mean CE of each class's rows.

        Args:
            logits: ``[B, K]`` from the recorded forward; labels: ``[B]``.
            sizes: rows per class, in row order (``sum(sizes) = B``; class ``c`` = the
                ``c``-th block).
            create_graph: keep the graph (the synthetic side of Eq. 9); otherwise detached.
        """
        sizes = [int(s) for s in sizes]
        if sum(sizes) != logits.shape[0] or any(s < 1 for s in sizes):
            raise ValueError(f"sizes {sizes} must be positive and sum to the batch ({logits.shape[0]})")
        params = [p for p in self.model.parameters() if p.requires_grad]
        loss = sum(F.cross_entropy(lg, y) for lg, y in zip(torch.split(logits, sizes), torch.split(labels, sizes)))
        deltas = torch.autograd.grad(loss, [r[2] for r in self.records], create_graph=create_graph,
                                     allow_unused=True)
        acc: list[dict[int, torch.Tensor]] = [{} for _ in sizes]

        def add(c: int, p: torch.Tensor | None, g: torch.Tensor) -> None:
            if p is None or not p.requires_grad:
                return
            acc[c][id(p)] = g if id(p) not in acc[c] else acc[c][id(p)] + g

        for (mod, a, _), delta in zip(self.records, deltas):
            if delta is None:
                continue
            a_s, d_s = torch.split(a, sizes), torch.split(delta, sizes)
            if isinstance(mod, nn.GroupNorm):
                a_hat = torch.split(F.group_norm(a, mod.num_groups, None, None, mod.eps), sizes)
            for c in range(len(sizes)):
                if isinstance(mod, nn.Conv2d):
                    has_b = mod.bias is not None
                    _, gw, gb = torch.ops.aten.convolution_backward(
                        d_s[c], a_s[c], mod.weight, [mod.out_channels] if has_b else None, list(mod.stride),
                        list(mod.padding), list(mod.dilation), False, [0, 0], mod.groups, [False, True, has_b])
                    add(c, mod.weight, gw)
                    if has_b:
                        add(c, mod.bias, gb)
                elif isinstance(mod, nn.Linear):
                    d2, a2 = d_s[c].reshape(-1, mod.out_features), a_s[c].reshape(-1, mod.in_features)
                    add(c, mod.weight, d2.t() @ a2)
                    add(c, mod.bias, d2.sum(0))
                else:  # GroupNorm: y = a_hat * gamma + beta, per channel
                    red = [0] + list(range(2, d_s[c].ndim))
                    add(c, mod.weight, (d_s[c] * a_hat[c]).sum(red))
                    add(c, mod.bias, d_s[c].sum(red))
        out = []
        for c in range(len(sizes)):
            row = [acc[c].get(id(p), torch.zeros_like(p)) for p in params]
            out.append(row if create_graph else [g.detach() for g in row])
        return out
