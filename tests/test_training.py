from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.soft_labels import sample_views, teacher_soft_labels
from dd_assets.core.student_training import kd_loss, mixed_targets, train_student
from dd_assets.core.training import TrainConfig, evaluate, predict_logits, random_crop_flip, train_teacher
from dd_assets.models import ConvNet

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
S = 16


def _make(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: class 0 bright top half, class 1 bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    base = torch.full((n, 3, S, S), 110.0)
    top = y == 0
    base[top, :, : S // 2] = 140.0
    base[~top, :, S // 2 :] = 140.0
    noise = torch.randn(n, 3, S, S, generator=g) * 40
    return (base + noise).clamp(0, 255).round().to(torch.uint8), y


class _HalfTeacher(nn.Module):
    """Logit = +/- scaled brightness difference between top and bottom halves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x[:, :, : S // 2].mean(dim=(1, 2, 3)) - x[:, :, S // 2 :].mean(dim=(1, 2, 3))
        return torch.stack([2 * d, -2 * d], dim=1)


def _student(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet(2, image_size=S, depth=2, width=8)


def _batches(images: torch.Tensor, labels: torch.Tensor, bs: int = 32):
    for s in range(0, len(images), bs):
        yield images[s : s + bs], labels[s : s + bs]


def test_kd_loss_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 6, generator=g)
    t = torch.randn(4, 6, generator=g) * 3
    temp = 2.5
    p = torch.softmax(t / temp, 1)
    hand = (p * (p.log() - torch.log_softmax(s / temp, 1))).sum() / 4 * temp**2
    torch.testing.assert_close(kd_loss(s, t, temp), hand)
    ref = F.kl_div(torch.log_softmax(s / temp, 1), p, reduction="batchmean") * temp**2
    torch.testing.assert_close(kd_loss(s, t, temp), ref)
    # -inf outside a top-k: KL to the renormalized top-k distribution, finite gradients
    t_k = t.clone()
    t_k[:, 3:] = float("-inf")
    s_req = s.clone().requires_grad_(True)
    loss = kd_loss(s_req, t_k, temp)
    pk = torch.softmax(t[:, :3] / temp, 1)
    hand_k = (pk * (pk.log() - torch.log_softmax(s / temp, 1)[:, :3])).sum() / 4 * temp**2
    torch.testing.assert_close(loss, hand_k)
    loss.backward()
    assert torch.isfinite(s_req.grad).all()


def test_mixed_targets_and_augment() -> None:
    tgt = mixed_targets(torch.tensor([0, 2]), torch.tensor([1, 2]), torch.tensor([0.75, 0.5]), 3)
    torch.testing.assert_close(tgt, torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]]))
    x = torch.randn(8, 3, 16, 16)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = random_crop_flip(x, 2, g1), random_crop_flip(x, 2, g2)
    assert a.shape == x.shape and torch.equal(a, b)
    flipped_only = random_crop_flip(x, 0, torch.Generator().manual_seed(0))
    for i in range(8):
        assert torch.equal(flipped_only[i], x[i]) or torch.equal(flipped_only[i], x[i].flip(-1))


def test_train_teacher_learns_streamed_problem() -> None:
    val_x, val_y = _make(64, seed=100)

    def train_batches(epoch: int):
        for step in range(4):
            yield _make(32, seed=epoch * 10 + step)

    seen: list[dict] = []
    model = _student(0)
    cfg = TrainConfig(epochs=3, lr=0.05, weight_decay=5e-4, batch_size=32, seed=0)
    res = train_teacher(
        model,
        train_batches,
        steps_per_epoch=4,
        evaluate_val=lambda m: evaluate(m, _batches(val_x, val_y), MEAN, STD, "cpu"),
        cfg=cfg,
        mean=MEAN,
        std=STD,
        device="cpu",
        on_epoch=seen.append,
    )
    assert len(res.history) == 3 and seen == res.history
    assert set(seen[0]) == {"epoch", "train_loss", "train_acc", "val_acc", "lr", "seconds"}
    assert res.best_val_acc >= 0.95
    vals = [h["val_acc"] for h in res.history]
    assert res.best_epoch == int(np.argmax(vals)) and res.best_val_acc == max(vals)
    assert seen[-1]["lr"] < cfg.lr  # cosine decays per step
    logits = predict_logits(model, val_x, MEAN, STD, batch_size=16, device="cpu")
    assert logits.shape == (64, 2) and logits.dtype == torch.float32
    assert (logits.argmax(1) == val_y).float().mean().item() == pytest.approx(res.best_val_acc)


def _student_run(soft, images, labels, val, seed=0, epochs=8, teacher=None, eval_every=1):
    val_x, val_y = val
    cfg = TrainConfig(
        epochs=epochs, lr=3e-3, weight_decay=1e-4, batch_size=8, temperature=4.0, seed=seed, eval_every=eval_every
    )
    model = _student(seed)
    res = train_student(
        model,
        images,
        labels,
        soft,
        cfg,
        MEAN,
        STD,
        evaluate_val=lambda m: evaluate(m, _batches(val_x, val_y), MEAN, STD, "cpu"),
        device="cpu",
        teacher=teacher,
    )
    return model, res


@pytest.fixture(scope="module")
def distilled():
    images, labels = _make(16, seed=7)
    views = sample_views(16, 4, S, seed=0, scale=(0.25, 1.0))
    soft = teacher_soft_labels(_HalfTeacher(), images, views, topk=2, mean=MEAN, std=STD)
    return images, labels, soft, _make(64, seed=200)


def test_train_student_soft_labels_learns_and_selects_best(distilled) -> None:
    images, labels, soft, val = distilled
    model, res = _student_run(soft, images, labels, val, eval_every=2)
    vals = [h["val_acc"] for h in res.history]
    assert vals[0] is None and vals[1] is not None and vals[-1] is not None
    scored = {h["epoch"]: h["val_acc"] for h in res.history if h["val_acc"] is not None}
    assert res.best_val_acc == max(scored.values()) >= 0.8
    assert res.best_epoch == max(scored, key=lambda k: (scored[k], -k))
    for k, v in model.state_dict().items():  # model holds the selected weights
        assert torch.equal(v, res.best_state[k])


def test_train_student_keeps_best_epoch_weights(distilled) -> None:
    images, labels, soft, _ = distilled
    scripted = iter([0.3, 0.9, 0.5, 0.6])
    snapshots = []

    def fake_val(m: nn.Module) -> float:
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scripted)

    model = _student(0)
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=8, temperature=4.0)
    res = train_student(model, images, labels, soft, cfg, MEAN, STD, fake_val, "cpu")
    assert res.best_epoch == 1 and res.best_val_acc == 0.9
    for k, v in snapshots[1].items():
        assert torch.equal(res.best_state[k], v) and torch.equal(model.state_dict()[k], v)
    assert not all(torch.equal(snapshots[3][k], v) for k, v in snapshots[1].items())


def test_train_student_is_deterministic(distilled) -> None:
    images, labels, soft, val = distilled
    m1, r1 = _student_run(soft, images, labels, val, epochs=3)
    m2, r2 = _student_run(soft, images, labels, val, epochs=3)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]
    m3, _ = _student_run(soft, images, labels, val, epochs=3, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))


def test_train_student_hard_and_online_teacher_modes(distilled) -> None:
    images, labels, soft, val = distilled
    _, hard = _student_run(None, images, labels, val, epochs=6)
    assert hard.best_val_acc >= 0.8
    _, online = _student_run(None, images, labels, val, epochs=6, teacher=_HalfTeacher())
    assert online.best_val_acc >= 0.8
    with pytest.raises(ValueError):
        _student_run(soft, images, labels, val, teacher=_HalfTeacher())


def test_dynamic_finetune_sees_a_fresh_subset_each_epoch_and_selects_on_val():
    """FocusDC DFT: subset(e) is called once per epoch; the best-val epoch's weights are kept."""
    from dd_assets.core.student_training import dynamic_finetune
    from dd_assets.core.training import TrainConfig

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    calls: list[int] = []

    def subset(e: int):
        calls.append(e)
        imgs = rng.integers(0, 255, (6, 3, 8, 8), dtype=np.uint8)
        return imgs, np.array([0, 1] * 3)

    scripted = iter([0.2, 0.9, 0.4])
    snapshots = []

    def val(m):
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scripted)

    cfg = TrainConfig(epochs=3, lr=0.01, weight_decay=0.0, batch_size=4, optimizer="adamw", eval_every=1, seed=0)
    res = dynamic_finetune(student, subset, teacher, cfg, [0.5] * 3, [0.25] * 3, val, "cpu", steps_per_epoch=2)
    assert calls == [0, 1, 2]
    assert res.best_epoch == 1 and res.best_val_acc == 0.9
    for k, v in student.state_dict().items():
        assert torch.equal(v, snapshots[1][k])
    assert not torch.equal(snapshots[0]["1.weight"], snapshots[2]["1.weight"])  # it trained
