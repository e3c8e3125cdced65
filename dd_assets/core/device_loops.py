"""Helpers for device-resident hot loops (issue 19, item 2; ``docs/device_loops.md``).

* :func:`upload` -- a host tensor to the device without the stream synchronisation a plain
  ``tensor.to("cuda")`` from pageable memory makes (the host would wait for every queued
  kernel): pinned staging plus ``non_blocking``.  Same values; a plain ``.to`` off CUDA.
* :func:`check_inference_options` / :func:`inference_context` -- the optional bf16 autocast
  and ``channels_last`` switches of the inference-only scoring loops (RDED / CIDD crop
  scoring, FKD teacher labels).  Both switches are CUDA-only: on any other device they raise
  a ``ValueError`` naming the parameter, so CPU results -- which feed the content hashes of
  stored artifacts -- can never change through them.  The defaults (``precision="fp32"``,
  ``channels_last=False``) call ``model(x)`` exactly as before.  bf16 changes the scores
  (see the parity check in ``docs/device_loops.md``): a caller that enables it must make it
  part of the data version of what it stores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

#: Accepted values of the ``precision`` keyword.
PRECISIONS = ("fp32", "bf16")


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)`` that does not make the host wait for queued GPU work.

    A CPU tensor bound for CUDA is copied into pinned memory (PyTorch's caching host
    allocator keeps that block alive until the copy has run) and sent with
    ``non_blocking=True``; the caller's tensor is never read after this returns.  Anything
    else (CPU target, a tensor already on a device, or already pinned memory the caller owns)
    is a plain ``t.to(device)``.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or t.device.type != "cpu" or t.is_pinned():
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def check_inference_options(
    device: torch.device | str, precision: str = "fp32", channels_last: bool = False
) -> torch.device:
    """Validate the precision switches for ``device``; returns ``torch.device(device)``.

    Raises:
        ValueError naming ``precision`` (not in :data:`PRECISIONS`, or ``"bf16"`` off CUDA)
        or ``channels_last`` (``True`` off CUDA).
    """
    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision == "bf16" and dev.type != "cuda":
        raise ValueError(f"precision='bf16' (bf16 autocast) is CUDA-only, got device {str(dev)!r}; use "
                         "precision='fp32' there (CPU scores feed content hashes and stay fp32)")
    if channels_last and dev.type != "cuda":
        raise ValueError(f"channels_last=True is CUDA-only, got device {str(dev)!r}; leave channels_last=False there")
    return dev


@contextlib.contextmanager
def inference_context(
    model: nn.Module, device: torch.device | str, precision: str = "fp32", channels_last: bool = False
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Yield ``forward(x) -> model output`` under the requested precision switches.

    Defaults: ``forward`` *is* ``model`` (nothing changes).  ``channels_last=True``: the
    model's 4-D parameters/buffers are converted to ``torch.channels_last`` for the block
    (back to the contiguous format afterwards) and each 4-D input is made channels_last.
    ``precision="bf16"``: the forward runs under ``torch.autocast("cuda", torch.bfloat16)``;
    callers keep their post-processing (softmax, CE, top-k) outside it, in fp32 after
    ``.float()``.  Options are checked first (:func:`check_inference_options`).
    """
    check_inference_options(device, precision, channels_last)
    if precision == "fp32" and not channels_last:
        yield model
        return
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model(x)

    try:
        yield forward
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
