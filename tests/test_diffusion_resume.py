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
