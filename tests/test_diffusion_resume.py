"""DDPS's diffusion training resumes from a checkpoint and ends exactly as an uninterrupted run
(the CIFAR budget is hours of CPU; a killed run must not lose them)."""

from __future__ import annotations

import io

import pytest
import torch

from dd_assets.methods.ddps.pixel_diffusion import PixelDiffusionConfig, train_class_diffusion

CFG = PixelDiffusionConfig(image_size=8, block_out_channels=(16, 32), cross_attention_dim=16, attention_head_dim=2,
                           steps=7, batch_size=4, seed=3)


class Passes:
    """Re-iterable batches, reshuffled (seeded) per pass, as the asset's ``_Epochs``."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.rand(10, 3, 8, 8, generator=gen) * 2 - 1
        self.y = torch.arange(10) % 2
        self.epoch = 0

    def __iter__(self):
        self.epoch += 1
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(100 + self.epoch))
        for s in range(0, 10, 4):
            idx = perm[s:s + 4]
            yield self.x[idx], self.y[idx]


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)   # as the asset stores it
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resumed_training_is_bit_identical_to_uninterrupted():
    straight, losses = train_class_diffusion(Passes(), None, 2, CFG)
    states: list[dict] = []
    train_class_diffusion(Passes(), None, 2, CFG, on_checkpoint=states.append, checkpoint_every=3)
    assert [s["step"] for s in states] == [3, 6]   # the checkpoint holds steps 0-2 done; step 3 is next
    for state in states:   # 3 crosses a pass boundary (3 batches per pass), 6 lands exactly on one
        seen: list[int] = []
        resumed, rlosses = train_class_diffusion(Passes(), None, 2, CFG, resume=_roundtrip(state),
                                                 on_step=lambda s, v: seen.append(s))
        assert seen == list(range(state["step"], CFG.steps))   # only the remaining steps ran
        assert _same(straight, resumed) and rlosses == losses


def test_resume_needs_the_generator_and_the_data_position():
    straight, _ = train_class_diffusion(Passes(), None, 2, CFG)
    states: list[dict] = []
    train_class_diffusion(Passes(), None, 2, CFG, on_checkpoint=states.append, checkpoint_every=3)
    fresh = dict(states[0], generator=torch.Generator().manual_seed(CFG.seed).get_state())
    assert not _same(straight, train_class_diffusion(Passes(), None, 2, CFG, resume=fresh)[0])
    unreplayed = dict(states[0], batches=0)
    assert not _same(straight, train_class_diffusion(Passes(), None, 2, CFG, resume=unreplayed)[0])
    with pytest.raises(ValueError, match="re-iterable"):
        train_class_diffusion(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), 2, CFG, resume=states[0])
    with pytest.raises(ValueError, match="does not fit"):
        train_class_diffusion(Passes(), None, 2, PixelDiffusionConfig(**{**CFG.__dict__, "steps": 2}), resume=states[0])


@pytest.mark.slow
def test_diffusion_asset_resumes_after_a_failed_run(tiny_env, tmp_path, monkeypatch):
    """The asset keeps checkpoints while it trains; a run that dies mid-training leaves one, the
    next run continues from it (logged) and stores the same model as an uninterrupted run;
    success removes the checkpoint."""
    import dagster as dg

    from dd_assets.config import load_params
    from dd_assets.definitions import build_definitions
    from dd_assets.defs.methods import ddps_diffusion
    from dd_assets.methods.ddps import pixel_diffusion
    from dd_assets import local_backfill
    from dd_assets.orchestrate import RunFailures
    from dd_assets.storage import DataRoot, layout
    from tests.conftest import write_params

    monkeypatch.setenv("DD_ASSETS_PARAMS", str(write_params(tiny_env, "tiny", {"diffusion.steps": 6},
                                                             raw_root=tiny_env / "raw")))
    defs = build_definitions(load_params(), executor="in_process")
    home = tmp_path / "dh"
    local_backfill.materialize(defs, [dg.AssetKey("raw_images"), dg.AssetKey("manifest")], home)
    root = DataRoot(load_params().data_root)
    resume_rel = ddps_diffusion.resume_path()

    real = pixel_diffusion.train_class_diffusion

    def dies_at_step_4(*args, **kwargs):
        def on_step(step, loss):
            if step == 4:
                raise RuntimeError("killed")
        if len(args) > 5:   # (data, labels, num_classes, cfg, device, on_step, ...)
            args = (*args[:5], on_step, *args[6:])
        else:
            kwargs["on_step"] = on_step
        return real(*args, **kwargs)

    monkeypatch.setattr(ddps_diffusion, "train_class_diffusion", dies_at_step_4)
    with pytest.raises(RunFailures, match="killed"):
        local_backfill.materialize(defs, [dg.AssetKey("diffusion_model")], home)
    assert root.exists(resume_rel)   # the last checkpoint before the failure: steps 0-3 done
    monkeypatch.setattr(ddps_diffusion, "train_class_diffusion", real)
    mat = local_backfill.materialize(defs, [dg.AssetKey("diffusion_model")], home).materialization("diffusion_model")
    resumed_version = mat.tags["dagster/data_version"]
    assert mat.metadata["resumed_from_step"].value == 4
    assert not root.exists(resume_rel)
    resumed = root.read_bytes(layout.model_metrics("diffusion_model"))

    # uninterrupted, in another data root: the same model (data version = weights digest)
    monkeypatch.setenv("DD_ASSETS_DATA_ROOT", str(tmp_path / "straight"))
    home2 = tmp_path / "dh2"
    local_backfill.materialize(defs, [dg.AssetKey("raw_images"), dg.AssetKey("manifest")], home2)
    mat2 = local_backfill.materialize(defs, [dg.AssetKey("diffusion_model")], home2).materialization("diffusion_model")
    straight_version = mat2.tags["dagster/data_version"]
    assert mat2.metadata["resumed_from_step"].value == 0
    assert resumed_version == straight_version
    import json

    straight = DataRoot(load_params().data_root).read_bytes(layout.model_metrics("diffusion_model"))
    assert json.loads(resumed)["losses"] == json.loads(straight)["losses"]
