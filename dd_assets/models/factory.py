"""Build models by name, and save/load self-describing checkpoints.

Built-in names (see :data:`MODEL_REGISTRY`):

* ``convnet_d3`` / ``convnet_d4`` / ``convnet_d5``: :class:`ConvNet` (kwargs ``norm``,
  ``width``, ``pooling``);
* ``resnet18_small``: timm ResNet-18 with a 3x3 stride-1 stem and no max-pool (32-64 px);
* ``mobilenetv2``: timm ``mobilenetv2_100``; ``efficientnet_b0``: timm ``efficientnet_b0``;
* ``vit_tiny_patch4``: timm ``VisionTransformer`` with patch 4, dim 192, depth 4, 3 heads.

Any other name goes to ``timm.create_model``.  Nothing is ever downloaded on purpose:
``pretrained=True`` only works when timm finds the weights in its local cache; otherwise
pass ``checkpoint=`` (a local file).

A checkpoint written by :func:`save_checkpoint` is a dict
``{state_dict, arch, arch_kwargs, num_classes, class_names, extra, format_version: 1}``,
so the class-name map always travels with the weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from dd_assets.models.convnet import ConvNet

FORMAT_VERSION = 1

Builder = Callable[..., nn.Module]


def _convnet(depth: int) -> Builder:
    def build(
        num_classes: int, in_channels: int, image_size: int, pretrained: bool, **kwargs: Any
    ) -> nn.Module:
        if pretrained:
            raise ValueError(f"convnet_d{depth} has no pretrained weights; pass checkpoint= instead")
        return ConvNet(num_classes, in_channels=in_channels, image_size=image_size, depth=depth, **kwargs)

    return build


def _timm(name: str, num_classes: int, in_channels: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch weights is re-raised with advice
        raise RuntimeError(
            f"could not build {name!r} with pretrained=True: {type(exc).__name__}: {exc}. "
            "timm only finds weights already in its local cache here (no network); "
            "pass a local checkpoint= path instead."
        ) from exc


def _resnet18_small(
    num_classes: int, in_channels: int, image_size: int, pretrained: bool, **kwargs: Any
) -> nn.Module:
    model = _timm("resnet18", num_classes, in_channels, pretrained, **kwargs)
    # CIFAR-style stem: keep the resolution for 32-64 px inputs (the stem's weights are fresh).
    model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _named_timm(timm_name: str) -> Builder:
    def build(
        num_classes: int, in_channels: int, image_size: int, pretrained: bool, **kwargs: Any
    ) -> nn.Module:
        return _timm(timm_name, num_classes, in_channels, pretrained, **kwargs)

    return build


def _vit_tiny_patch4(
    num_classes: int, in_channels: int, image_size: int, pretrained: bool, **kwargs: Any
) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if pretrained:
        raise ValueError("vit_tiny_patch4 has no pretrained weights; pass checkpoint= instead")
    cfg: dict[str, Any] = dict(patch_size=4, embed_dim=192, depth=4, num_heads=3)
    cfg.update(kwargs)
    return VisionTransformer(img_size=image_size, in_chans=in_channels, num_classes=num_classes, **cfg)


#: Built-in model names -> ``builder(num_classes, in_channels, image_size, pretrained, **kwargs)``.
MODEL_REGISTRY: dict[str, Builder] = {
    "convnet_d3": _convnet(3),
    "convnet_d4": _convnet(4),
    "convnet_d5": _convnet(5),
    "resnet18_small": _resnet18_small,
    "mobilenetv2": _named_timm("mobilenetv2_100"),
    "efficientnet_b0": _named_timm("efficientnet_b0"),
    "vit_tiny_patch4": _vit_tiny_patch4,
}


def model_names() -> list[str]:
    """The built-in names (any other name is tried as a timm model name)."""
    return list(MODEL_REGISTRY)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build model ``name`` for ``[N, in_channels, image_size, image_size]`` inputs -> ``[N, num_classes]``.

    ``checkpoint``: a local file written by :func:`save_checkpoint` or a plain
    ``state_dict``; its weights are loaded (strictly) after building.
    Raises ``FileNotFoundError`` if it does not exist, ``RuntimeError`` if
    ``pretrained=True`` weights are not available locally.
    """
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(
            f"checkpoint file {os.fspath(checkpoint)!r} (parameter 'checkpoint' of create_model) does not exist"
        )
    builder = MODEL_REGISTRY.get(name)
    if builder is not None:
        model = builder(num_classes, in_channels, image_size, pretrained, **kwargs)
    else:
        model = _timm(name, num_classes, in_channels, pretrained, **kwargs)
    if checkpoint is not None:
        state = _read_state_dict(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RuntimeError(f"checkpoint {os.fspath(checkpoint)!r} does not fit model {name!r}: {exc}") from exc
    return model


def _read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and "format_version" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds neither a state_dict nor a dd_assets checkpoint")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _plain(value: Any) -> Any:
    """Turn metadata into types ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise TypeError(f"cannot store {type(value).__name__} in checkpoint metadata: {value!r}")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    class_names: list[str],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write ``{state_dict, arch, arch_kwargs, num_classes, class_names, extra, format_version}``.

    ``arch``/``arch_kwargs`` must rebuild the model via ``create_model(arch, num_classes,
    **arch_kwargs)`` (e.g. ``in_channels``, ``image_size``, ``norm``); ``num_classes`` is
    ``len(class_names)``.  Written to ``path + ".tmp-<pid>"`` then ``os.replace``'d.
    """
    kwargs = _plain(dict(arch_kwargs))
    num_classes = len(class_names)
    if kwargs.pop("num_classes", num_classes) != num_classes:
        raise ValueError(f"arch_kwargs['num_classes'] disagrees with len(class_names)={num_classes}")
    kwargs.pop("checkpoint", None)
    kwargs.pop("pretrained", None)
    payload = {
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "arch": arch,
        "arch_kwargs": kwargs,
        "num_classes": num_classes,
        "class_names": [str(c) for c in class_names],
        "extra": _plain(dict(extra or {})),
        "format_version": FORMAT_VERSION,
    }
    path = os.fspath(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a checkpoint written by :func:`save_checkpoint`.

    Returns ``(model in eval mode on device, meta)`` where ``meta`` holds ``arch``,
    ``arch_kwargs``, ``num_classes``, ``class_names``, ``extra``, ``format_version``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint file {os.fspath(path)!r} (parameter 'path' of load_checkpoint) does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(obj, Mapping) and "format_version" in obj and "arch" in obj):
        raise ValueError(
            f"{os.fspath(path)!r} is not a dd_assets checkpoint (no arch/format_version); "
            "a plain state_dict can be loaded with create_model(name, ..., checkpoint=path)"
        )
    if obj["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)!r} has format_version {obj['format_version']} > {FORMAT_VERSION}")
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    model = create_model(meta["arch"], meta["num_classes"], **meta["arch_kwargs"])
    model.load_state_dict(obj["state_dict"], strict=True)
    return model.to(device).eval(), meta


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features ``[N, D]`` of a normalized float batch ``x [N, C, H, W]``.

    Uses ``forward_features`` + ``forward_head(pre_logits=True)`` (ConvNet and timm models);
    anything left with spatial dims is flattened.
    """
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return feats.flatten(1) if feats.ndim > 2 else feats
