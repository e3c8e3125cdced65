from __future__ import annotations

import pytest
import torch

from dd_assets.models import ConvNet, create_model, load_checkpoint, model_names, penultimate, save_checkpoint
from dd_assets.models import factory


@pytest.mark.parametrize("name", model_names())
def test_builtin_models_forward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = penultimate(model, x)
    assert logits.shape == (2, 10)
    assert feats.ndim == 2 and feats.shape[0] == 2
    assert torch.isfinite(logits).all()


def test_registry_names() -> None:
    assert set(model_names()) == {
        "convnet_d3", "convnet_d4", "convnet_d5", "resnet18_small", "mobilenetv2", "efficientnet_b0", "vit_tiny_patch4"
    }
    assert model_names() == list(factory.MODEL_REGISTRY)


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_convnet_structure(norm: str) -> None:
    m = ConvNet(10, depth=3, width=16, norm=norm)
    x = torch.randn(2, 3, 32, 32)
    feat = m.forward_features(x)
    assert feat.shape == (2, 16, 4, 4)
    assert m.num_features == 16 * 4 * 4
    assert m.forward_head(feat, pre_logits=True).shape == (2, m.num_features)
    assert m.get_classifier() is m.classifier
    assert torch.equal(m.forward_head(feat), m(x))
    if norm == "instance":
        gn = m.features[1]
        assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == 16 and gn.affine


def test_convnet_kwargs_and_penultimate_shapes() -> None:
    m = create_model("convnet_d4", 10, in_channels=1, image_size=28, norm="batch", width=32).eval()
    x = torch.randn(2, 1, 28, 28)
    assert penultimate(m, x).shape == (2, 32 * 1 * 1)
    assert create_model("convnet_d3", 10).num_features == 128 * 4 * 4
    r = create_model("resnet18_small", 10).eval()
    assert penultimate(r, torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert r.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)  # stride-1 stem, no max-pool
    v = create_model("vit_tiny_patch4", 10, image_size=32)
    assert penultimate(v, torch.randn(2, 3, 32, 32)).shape == (2, 192)


def test_other_names_go_to_timm() -> None:
    m = create_model("resnet10t", 5, in_channels=3).eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    kwargs = {"in_channels": 3, "image_size": 32, "norm": "batch", "width": 32}
    model = create_model("convnet_d3", 4, **kwargs)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # move BN running stats away from defaults
    model.eval()
    names = ["cat", "dog", "fish", "bird"]
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, model, "convnet_d3", kwargs, names, {"val_acc": 0.5, "epoch": 3})
    assert path.exists() and not list(path.parent.glob("*.tmp-*"))
    loaded, meta = load_checkpoint(path)
    assert meta["class_names"] == names and meta["num_classes"] == 4
    assert meta["arch"] == "convnet_d3" and meta["arch_kwargs"] == kwargs
    assert meta["extra"] == {"val_acc": 0.5, "epoch": 3} and meta["format_version"] == 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # create_model(checkpoint=...) accepts both our format and a plain state_dict
    via_create = create_model("convnet_d3", 4, checkpoint=path, **kwargs).eval()
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    via_plain = create_model("convnet_d3", 4, checkpoint=str(plain), **kwargs).eval()
    with torch.no_grad():
        assert torch.equal(model(x), via_create(x))
        assert torch.equal(model(x), via_plain(x))


def test_checkpoint_round_trip_timm(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18_small", 3).eval()
    path = tmp_path / "r.pt"
    save_checkpoint(path, model, "resnet18_small", {}, ["a", "b", "c"], {})
    loaded, meta = load_checkpoint(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["class_names"] == ["a", "b", "c"]


def test_missing_checkpoint_names_path(tmp_path) -> None:
    missing = tmp_path / "nope" / "missing.pt"
    with pytest.raises(FileNotFoundError) as err:
        create_model("convnet_d3", 10, checkpoint=missing)
    assert str(missing) in str(err.value) and "checkpoint" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(missing)
    assert str(missing) in str(err.value)


def test_pretrained_failure_is_wrapped(monkeypatch) -> None:
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("no network")
        raise AssertionError("unexpected call")

    monkeypatch.setattr(factory.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="checkpoint"):
        create_model("mobilenetv2", 10, pretrained=True)
    with pytest.raises(ValueError):
        create_model("convnet_d3", 10, pretrained=True)
