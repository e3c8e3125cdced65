"""Device-resident hot loops (issue 19, item 2; docs/device_loops.md).

For every loop changed to keep its per-batch / per-step results on the device:

(a) the output is bitwise equal (same dtype, shape and bytes) to a straightforward per-batch
    reference -- the loop as it was, reading each batch back to the host -- on a seeded input;
(b) the number of host read-backs the loop's own code issues does not grow with the number of
    batches (or steps): ``count(2 batches) == count(6 batches)``.

Read-backs are counted by wrapping the tensor methods that need the value on the host
(``item``, ``tolist``, ``cpu``, ``numpy``, ``__float__``, ``__int__``, ``__bool__``, ``__index__``,
``__array__``, ``__format__``, ``__repr__``) and counting the calls made *from the audited
functions themselves* (not from torch internals, e.g. Adam's host-side step counter).  On CPU
every tensor is a host tensor, so the count is what the code *would* read back on a GPU.  With
the old per-batch ``.cpu()`` / ``float()`` the counts grow and (b) fails.

Then the optional precision switches: the defaults change nothing, bf16 / channels_last off
CUDA are refused with a ValueError naming the parameter.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dd_assets
from dd_assets.core.cam import raw_class_activation_maps
from dd_assets.core.imaging import crop_resize, resize_float, to_model_input, to_uint8
from dd_assets.core.soft_labels import render_views, sample_views, teacher_soft_labels
from dd_assets.methods.ddps.config import DDPSConfig
from dd_assets.methods.ddps.dift import dift_features
from dd_assets.methods.ddps.representativeness import patch_scores, representativeness_maps
from dd_assets.methods.ddps.stages import _generator, best_windows, score_windows, source_boxes, window_features
from dd_assets.methods.ddps.windows import candidate_boxes, prepare_images
from dd_assets.methods.edf import distill as edf_mod
from dd_assets.methods.edf.config import EDFConfig
from dd_assets.methods.edf.cpd import common_pattern_dropout, per_tensor_terms
from dd_assets.methods.edf.dae import dae_weights, discriminative_share, synthetic_cams
from dd_assets.methods.edf.experts import ExpertConfig, ExpertTrajectories, expert_accuracy, expert_logits, train_experts
from dd_assets.methods.edf.matching import MatchConfig, start_epoch_bound, trajectory_matching_distill
from dd_assets.methods.edf.student import FunctionalModel, eq1_loss, param_match_terms, unroll_student
from dd_assets.methods.nrr import cidd as cidd_mod
from dd_assets.methods.nrr.cams import raw_image_cams, upsample_cams
from dd_assets.methods.nrr.refine import BNStatistics, NRRConfig, _mix_batch, nrr_mask, refine
from dd_assets.core.dbr import ce_distances, sce_loss
from dd_assets.methods.rded import crops as rded_mod
from dd_assets.methods.rded.crops import _pad_center, score_class, score_crops
from dd_assets.models import create_model

torch.set_num_threads(1)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
PKG = Path(dd_assets.__file__).parent

#: the audited loops, by file -> function (co_name); read-backs issued from these are counted
AUDITED = {
    "methods/rded/crops.py": {"score_crops", "score_class"},
    "methods/nrr/cams.py": {"raw_image_cams", "image_cams"},
    "methods/nrr/cidd.py": {"cidd_candidates", "crop_confidence"},  # cam_mass reads host CAMs
    "methods/nrr/refine.py": {"refine", "_mix_batch"},
    "core/soft_labels.py": {"teacher_soft_labels"},
    "methods/edf/matching.py": {"trajectory_matching_distill", "_check_finite"},
    "methods/edf/student.py": {"unroll_student"},
    "methods/edf/distill.py": {"edf_distill", "cpd_reduce", "dae_hook", "step_cb"},
    "methods/edf/experts.py": {"train_experts", "expert_accuracy", "expert_logits", "flat"},
    "methods/edf/dae.py": {"synthetic_cams"},
    "methods/ddps/representativeness.py": {"representativeness_maps"},
    "methods/ddps/dift.py": {"dift_features"},
    "methods/ddps/stages.py": {"score_windows", "window_features"},
}
_WHERE = {str(PKG / f): names for f, names in AUDITED.items()}
READ_BACKS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__",
              "__format__", "__repr__")


@pytest.fixture
def count_syncs(monkeypatch):
    """``with count_syncs() as c: ...`` -> ``sum(c.values())`` read-backs issued by the audited code."""

    @contextlib.contextmanager
    def counting():
        calls: Counter = Counter()
        with monkeypatch.context() as m:
            for name in READ_BACKS:
                orig = getattr(torch.Tensor, name)

                def wrapper(self, *a, _orig=orig, _name=name, **k):
                    f = sys._getframe(1)
                    if f.f_code.co_name in _WHERE.get(f.f_code.co_filename, ()):
                        calls[(_name, f.f_code.co_name, f.f_lineno)] += 1
                    return _orig(self, *a, **k)

                m.setattr(torch.Tensor, name, wrapper)
            yield calls

    return counting


def _same(a, b) -> bool:
    """Bitwise equality of two arrays / tensors (dtype, shape and bytes)."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _images(n: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _bn_net(size: int, seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    net = create_model("convnet_d3", classes, image_size=size, norm="batch", width=8)
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    return net.eval()


# ============================================================================ RDED / CIDD scoring


def _ref_score_crops(model, images, labels, boxes, out_size, mean, std, batch_size=256, device="cpu", pad_to=None,
                     stat="ce", precision="fp32", channels_last=False):
    """The loop as it was: every batch's scores read back into a host buffer."""
    assert precision == "fp32" and not channels_last
    imgs = torch.as_tensor(np.asarray(images))
    bx = np.asarray(boxes).astype(np.int64)
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    n_img, k = bx.shape[:2]
    total = n_img * k
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    out = torch.empty(total, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            n0 = start // k
            pix = imgs[n0 : (stop - 1) // k + 1].float().div_(255.0)
            x = (torch.stack([crop_resize(pix[j // k - n0], bx[j // k, j % k], (out_size, out_size))
                              for j in range(start, stop)]) - m) / s
            if pad_to is not None:
                x = _pad_center(x, pad_to)
            logp = F.log_softmax(model(x).float(), dim=1)
            if stat == "max_prob":
                out[start:stop] = logp.max(dim=1).values.exp().cpu()
            else:
                out[start:stop] = -logp.gather(1, lab[torch.arange(start, stop) // k][:, None])[:, 0].cpu()
    return out.view(n_img, k).numpy()


def _ref_raw_image_cams(model, images, labels, model_size, mean, std, batch_size=256, device="cpu"):
    imgs = torch.as_tensor(np.asarray(images))
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, imgs.shape[0], batch_size):
            x = resize_float(to_model_input(imgs[start : start + batch_size], mean, std), (model_size, model_size))
            out.append(raw_class_activation_maps(model, x, lab[start : start + batch_size]).cpu())
    return torch.cat(out)


def _boxes(n: int, k: int, seed: int = 0) -> np.ndarray:
    xy = np.random.default_rng(seed).integers(0, 20, (n, k, 2))
    return np.concatenate([xy, xy + 15], axis=2)


@pytest.mark.parametrize("stat", ["ce", "max_prob"])
def test_score_crops_equal_reference_and_one_read_back(stat, count_syncs) -> None:
    net, imgs, lab, bx = _bn_net(32), _images(4, 40, seed=1), np.array([0, 1, 2, 1]), _boxes(4, 3)
    want = _ref_score_crops(net, imgs, lab, bx, 32, MEAN, STD, batch_size=5, stat=stat)
    got = score_crops(net, imgs, lab, bx, 32, MEAN, STD, batch_size=5, stat=stat)
    assert _same(got, want)
    counts = []
    for bs in (6, 2):  # 12 crops: 2 vs 6 batches
        with count_syncs() as c:
            score_crops(net, imgs, lab, bx, 32, MEAN, STD, batch_size=bs, stat=stat)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


def test_score_class_equal_reference_and_one_read_back(monkeypatch, count_syncs) -> None:
    net, imgs, ids = _bn_net(32), _images(5, 40, seed=2), np.array([9, 3, 7, 1, 5])
    lab = np.full(5, 2)
    got = score_class(net, imgs, lab, ids, 4, 32, 2, MEAN, STD, seed=1, class_index=2, batch_size=3)
    with monkeypatch.context() as m:
        m.setattr(rded_mod, "score_crops", _ref_score_crops)
        want = score_class(net, imgs, lab, ids, 4, 32, 2, MEAN, STD, seed=1, class_index=2, batch_size=3)
    assert _same(got.boxes, want.boxes) and _same(got.score, want.score) and _same(got.source_id, want.source_id)
    counts = []
    for bs in (10, 4):  # 20 crops: 2 vs 5 batches
        with count_syncs() as c:
            score_class(net, imgs, lab, ids, 4, 32, 2, MEAN, STD, seed=1, class_index=2, batch_size=bs)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


def test_raw_image_cams_equal_reference_and_one_read_back(count_syncs) -> None:
    net, imgs, lab = _bn_net(32), _images(6, 40, seed=3), np.array([0, 1, 2, 0, 1, 2])
    assert _same(raw_image_cams(net, imgs, lab, 32, MEAN, STD, batch_size=4),
                 _ref_raw_image_cams(net, imgs, lab, 32, MEAN, STD, batch_size=4))
    counts = []
    for bs in (3, 1):
        with count_syncs() as c:
            raw_image_cams(net, imgs, lab, 32, MEAN, STD, batch_size=bs)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("confidence", ["true_class_ce", "max_prob"])
def test_cidd_candidates_equal_reference_and_read_backs_per_call(confidence, monkeypatch, count_syncs) -> None:
    net, imgs, ids, lab = _bn_net(32), _images(6, 40, seed=4), np.arange(6)[::-1].copy(), np.full(6, 1)
    kw = dict(seed=2, class_index=1, top_t=2, confidence=confidence)
    got = cidd_mod.cidd_candidates(net, imgs, lab, ids, 4, 32, MEAN, STD, batch_size=5, **kw)
    with monkeypatch.context() as m:
        m.setattr(cidd_mod, "score_crops", _ref_score_crops)
        m.setattr(cidd_mod, "image_cams", lambda *a: upsample_cams(_ref_raw_image_cams(*a), (40, 40)))
        want = cidd_mod.cidd_candidates(net, imgs, lab, ids, 4, 32, MEAN, STD, batch_size=5, **kw)
    assert _same(got.boxes, want.boxes) and _same(got.score, want.score)
    counts = []
    for bs in (6, 2):  # CAMs: 1 vs 3 batches, crops (12): 2 vs 6 batches
        with count_syncs() as c:
            cidd_mod.cidd_candidates(net, imgs, lab, ids, 4, 32, MEAN, STD, batch_size=bs, **kw)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


# ============================================================================ NRR refinement


def _ref_refine(images, labels, teacher, cam, cfg, mean, std, label_refine=False, on_step=None):
    """refine() as it was: three-four float() read-backs per step, one .cpu() per batch."""
    imgs = torch.as_tensor(np.asarray(images))
    n, c, h, w = imgs.shape
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    stats = BNStatistics(teacher)
    mask_all = nrr_mask(torch.as_tensor(np.asarray(cam)).float(), cfg.eps)[:, None]
    m_ = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s_ = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    lo, hi = (0.0 - m_) / s_, (1.0 - m_) / s_
    rng = np.random.default_rng(cfg.seed)
    out = torch.empty((n, c, h, w), dtype=torch.uint8)
    teacher.eval()
    for bi, start in enumerate(range(0, n, cfg.batch_size)):
        sl = slice(start, min(start + cfg.batch_size, n))
        x = to_model_input(imgs[sl], mean, std).requires_grad_(True)
        y, mask = lab[sl], mask_all[sl]
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas)
        for it in range(cfg.iterations):
            with stats:
                logits = teacher(x)
                l_bn = stats.loss()
            l_ce = F.cross_entropy(logits, y)
            loss = l_ce + cfg.alpha_bn * l_bn
            parts = {"ce": float(l_ce.detach()), "bn": float(l_bn.detach())}
            if label_refine:
                perm = torch.from_numpy(rng.permutation(x.shape[0]))
                x_mix = _mix_batch(x, x[perm].detach(), cfg.mix, cfg.mix_alpha, rng)
                d_org, d_aug = ce_distances(teacher(x_mix), y, y[perm])
                l_lr = sce_loss(d_org, d_aug, cfg.r)
                loss = loss + cfg.alpha_lr * l_lr
                parts["lr"] = float(l_lr.detach())
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                if cfg.mask_on == "grad":
                    x.grad = grad * mask
                    opt.step()
                else:
                    before = x.detach().clone()
                    x.grad = grad
                    opt.step()
                    x.copy_(before + mask * (x - before))
                x.copy_(torch.minimum(torch.maximum(x, lo), hi))
            if on_step is not None:
                parts["loss"] = float(loss.detach())
                on_step(bi, it, parts)
        out[sl] = to_uint8(x.detach() * s_ + m_).cpu()
    return out.numpy()


def _refine_case():
    cam = torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(6))
    return _images(5, 16, seed=5), np.array([0, 1, 2, 0, 1]), _bn_net(16, seed=4), cam


@pytest.mark.parametrize("mask_on,label_refine,mix", [("grad", False, "cutmix"), ("step", True, "cutmix"),
                                                      ("grad", True, "mixup")])
def test_refine_equal_reference(mask_on, label_refine, mix) -> None:
    imgs, lab, net, cam = _refine_case()
    cfg = NRRConfig(iterations=3, batch_size=2, mask_on=mask_on, mix=mix, seed=1)
    got_steps, want_steps = [], []
    want = _ref_refine(imgs, lab, net, cam, cfg, MEAN, STD, label_refine, lambda *a: want_steps.append(a))
    got = refine(imgs, lab, net, cam, cfg, MEAN, STD, label_refine=label_refine,
                 on_step=lambda *a: got_steps.append(a))
    assert _same(got, want)
    assert _same(refine(imgs, lab, net, cam, cfg, MEAN, STD, label_refine=label_refine), want)  # no callback
    assert got_steps == want_steps  # same keys, order and float values
    assert all(type(v) is float for *_, parts in got_steps for v in parts.values())


def test_refine_reads_nothing_back_per_step(count_syncs) -> None:
    imgs, lab, net, cam = _refine_case()
    counts, with_cb = [], []
    for iters in (2, 6):
        cfg = NRRConfig(iterations=iters, batch_size=2, seed=1)
        with count_syncs() as c:
            refine(imgs, lab, net, cam, cfg, MEAN, STD, label_refine=True)
        counts.append(sum(c.values()))
        with count_syncs() as c:
            refine(imgs, lab, net, cam, cfg, MEAN, STD, label_refine=True, on_step=lambda *a: None)
        with_cb.append(sum(c.values()))
    assert counts[0] == counts[1], counts  # none per step (one .cpu() per batch of images, after its steps)
    assert with_cb[1] - with_cb[0] == 4 * 3  # with on_step: exactly one read-back per step (3 batches)


# ============================================================================ FKD teacher labels


def _ref_teacher_soft_labels(teacher, images, views, topk, mean, std, batch_size):
    n, e_count = views.num_images, views.epochs
    values = np.empty((n, e_count, topk), np.float16)
    indices = np.empty((n, e_count, topk), np.int16)
    teacher.eval()
    with torch.no_grad():
        for e in range(e_count):
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(start + batch_size, n))
                top = teacher(render_views(images, views, e, idx, mean, std)).float().topk(topk, dim=1)
                fp16_max = float(np.finfo(np.float16).max)
                values[start : start + len(idx), e] = top.values.clamp(-fp16_max, fp16_max).cpu().numpy().astype(np.float16)
                indices[start : start + len(idx), e] = top.indices.cpu().numpy().astype(np.int16)
    return values, indices


def test_teacher_soft_labels_equal_reference_and_one_read_back_per_view(count_syncs) -> None:
    net, imgs = _bn_net(16, seed=7, classes=5), _images(6, 16, seed=8)
    views = sample_views(6, 3, 16, seed=2)
    got = teacher_soft_labels(net, imgs, views, 3, MEAN, STD, batch_size=4)
    want_v, want_i = _ref_teacher_soft_labels(net, imgs, views, 3, MEAN, STD, batch_size=4)
    assert _same(got.values, want_v) and _same(got.indices, want_i) and got.num_classes == 5
    counts = []
    for bs in (3, 1):  # per view: 2 vs 6 batches
        with count_syncs() as c:
            teacher_soft_labels(net, imgs, views, 3, MEAN, STD, batch_size=bs)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


# ============================================================================ EDF: experts and unrolls

ARCH_KW = {"norm": "instance", "width": 4}


def _edf_data(n_per_class: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)
    imgs = rng.integers(0, 120, size=(len(labels), 3, 8, 8)).astype(np.int64)
    for i, c in enumerate(labels):
        imgs[i, c] += 120
    return imgs.astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def experts() -> ExpertTrajectories:
    imgs, labels = _edf_data()
    cfg = ExpertConfig(arch="convnet_d3", arch_kwargs=ARCH_KW, lr=0.05, batch_size=6, seed=3)
    return train_experts((imgs, labels), 3, num_experts=2, epochs=4, cfg=cfg, mean=MEAN, std=STD)


class _Recorder(nn.Module):
    """Wraps a network; keeps every training forward's logits (to recompute the epoch sums)."""

    def __init__(self, inner: nn.Module, seen: list) -> None:
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        self.seen.append(out.detach().clone())
        return out


def test_train_experts_epoch_sums_equal_per_batch_reference(count_syncs) -> None:
    imgs, labels = _edf_data()
    cfg = ExpertConfig(arch="convnet_d3", arch_kwargs=ARCH_KW, lr=0.05, batch_size=4, seed=3)

    def run(batch: int):
        seen: list[torch.Tensor] = []
        def source(k, e):
            return [(imgs[s : s + batch], labels[s : s + batch]) for s in range(0, len(labels), batch)]
        def model_fn():
            return _Recorder(create_model("convnet_d3", 3, image_size=8, **ARCH_KW), seen)
        with count_syncs() as c:
            traj = train_experts(source, 3, 1, 2, cfg, MEAN, STD, image_size=8, in_channels=3, model_fn=model_fn)
        return traj, seen, sum(c.values())

    traj, seen, n_few = run(9)  # 2 batches per epoch
    per_epoch = len(seen) // 2
    for epoch, rec in enumerate(traj.history):  # the per-batch float()/int() arithmetic of the old loop
        loss_sum, correct, n = 0.0, 0, 0
        for b, logits in enumerate(seen[epoch * per_epoch : (epoch + 1) * per_epoch]):
            y = torch.as_tensor(labels[b * 9 : b * 9 + 9])
            loss_sum += float(F.cross_entropy(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        assert rec["train_loss"] == loss_sum / n and rec["train_acc"] == correct / n
    assert run(3)[2] == n_few  # 6 batches per epoch: no more read-backs than with 2


def _ref_expert_accuracy(traj, batches, mean, std, epoch=-1):
    model = traj.build_model("cpu")
    correct, seen = np.zeros(traj.num_experts, np.int64), 0
    for images, labels in batches:
        x = to_model_input(images, mean, std)
        y = torch.as_tensor(np.asarray(labels)).reshape(-1)
        for k in range(traj.num_experts):
            correct[k] += int((expert_logits(traj, x, k, epoch, model).argmax(1).cpu() == y).sum())
        seen += len(y)
    return (correct / max(1, seen)).tolist()


def test_expert_accuracy_equal_reference_and_one_read_back(experts, count_syncs) -> None:
    imgs, labels = _edf_data(seed=1)
    batches = lambda b: [(imgs[s : s + b], labels[s : s + b]) for s in range(0, len(labels), b)]  # noqa: E731
    assert expert_accuracy(experts, batches(4), MEAN, STD, epoch=1) == _ref_expert_accuracy(experts, batches(4), MEAN, STD, 1)
    counts = []
    for b in (9, 3):
        with count_syncs() as c:
            expert_accuracy(experts, batches(b), MEAN, STD)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


def _ref_tmd(real_init, labels, traj, cfg, mean, std, reduce=None, grad_hook=None, on_step=None):
    """trajectory_matching_distill() as it was: isfinite check, float(loss), float(lr) per iteration."""
    imgs = torch.as_tensor(np.asarray(real_init))
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    n = imgs.shape[0]
    reduce = eq1_loss if reduce is None else reduce
    model = traj.build_model("cpu")
    model.train()
    fm = FunctionalModel(model, traj.names, traj.shapes)
    x = to_model_input(imgs, mean, std).requires_grad_(True)
    lr0 = float(traj.expert_lr if cfg.lr_init is None else cfg.lr_init)
    lr_p = torch.tensor(math.log(lr0) if cfg.lr_param == "log" else lr0).requires_grad_(True)
    opts = [torch.optim.SGD([x], lr=cfg.lr_img, momentum=cfg.img_momentum),
            torch.optim.SGD([lr_p], lr=cfg.lr_lr, momentum=cfg.lr_momentum)]
    soft = None
    if cfg.soft_labels:
        soft = expert_logits(traj, x.detach(), cfg.soft_label_expert, -1, model).clone().requires_grad_(True)
        opts.append(torch.optim.SGD([soft], lr=cfg.lr_label, momentum=cfg.label_momentum))
        model.train()
    batch_syn = n if cfg.batch_syn is None else min(int(cfg.batch_syn), n)
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    losses, lrs = np.zeros(cfg.iterations), np.zeros(cfg.iterations)
    skipped = 0
    for it in range(cfg.iterations):
        k = int(rng.integers(traj.num_experts))
        s = int(rng.integers(cfg.min_start_epoch, start_epoch_bound(cfg, it)))
        start, target = traj.flat(k, s), traj.flat(k, s + cfg.expert_epochs)
        lr = lr_p.exp() if cfg.lr_param == "log" else lr_p
        student = unroll_student(fm, start, x, lab if soft is None else soft, lr, cfg.syn_steps, batch_syn, gen,
                                 cfg.augment)
        loss = reduce(*param_match_terms(student, start, target))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"trajectory matching loss is {float(loss.detach())} at iteration {it} "
                                     f"(student lr {float(lr.detach()):.4g}); lower MatchConfig.lr_img / lr_lr")
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None and x.grad is not None:
            x.grad = grad_hook(it, x.detach(), x.grad)
        skip = cfg.max_loss is not None and float(loss.detach()) > cfg.max_loss
        if skip:
            skipped += 1
        else:
            for opt in opts:
                opt.step()
        losses[it], lrs[it] = float(loss.detach()), float(lr.detach())
        if on_step is not None:
            on_step(it, {"loss": losses[it], "lr": lrs[it], "expert": k, "start_epoch": s, "skipped": float(skip)})
    final = x.detach()
    m_, s_ = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return dict(images=to_uint8(final * s_ + m_).numpy(), images_float=final.numpy(), loss=losses, lr_curve=lrs,
                soft_labels=None if soft is None else soft.detach().numpy(), skipped=skipped,
                lr=float((lr_p.exp() if cfg.lr_param == "log" else lr_p).detach()))


def _match(**kw) -> MatchConfig:
    base = dict(iterations=4, syn_steps=3, expert_epochs=2, max_start_epoch=2, lr_img=100.0, lr_lr=1e-5, seed=0)
    return MatchConfig(**{**base, **kw})


def _assert_result(got, want: dict) -> None:
    for key in ("images", "images_float", "loss", "lr_curve"):
        assert _same(getattr(got, key), want[key]), key
    assert (got.soft_labels is None) == (want["soft_labels"] is None)
    if got.soft_labels is not None:
        assert _same(got.soft_labels, want["soft_labels"])
    assert got.lr == want["lr"] and got.skipped == want["skipped"]


@pytest.mark.parametrize("kw", [{}, {"lr_param": "log"}, {"soft_labels": True, "batch_syn": 4}, {"max_loss": 0.9}])
def test_trajectory_matching_equal_reference(experts, kw) -> None:
    imgs, labels = _edf_data(n_per_class=2, seed=9)
    cfg = _match(**kw)
    got_steps, want_steps = [], []
    want = _ref_tmd(imgs, labels, experts, cfg, MEAN, STD, on_step=lambda t, m: want_steps.append(m))
    _assert_result(trajectory_matching_distill(imgs, labels, experts, cfg, MEAN, STD), want)
    _assert_result(trajectory_matching_distill(imgs, labels, experts, cfg, MEAN, STD,
                                               on_step=lambda t, m: got_steps.append(m)), want)
    assert [sorted((k, type(v), v) for k, v in m.items()) for m in got_steps] == \
           [sorted((k, type(v), v) for k, v in m.items()) for m in want_steps]


@pytest.mark.parametrize("kw", [{}, {"on_step": True}, {"finite_check_every": 1}, {"max_loss": 1e9}])
def test_non_finite_loss_error_names_the_same_iteration_and_lr(experts, kw) -> None:
    imgs, labels = _edf_data(n_per_class=2, seed=9)
    cfg = _match(lr_img=1e30, iterations=6, max_loss=kw.pop("max_loss", None))
    if kw.pop("on_step", False):
        kw["on_step"] = lambda t, m: None
    with pytest.raises(FloatingPointError) as want:
        _ref_tmd(imgs, labels, experts, cfg, MEAN, STD)
    with pytest.raises(FloatingPointError) as got:
        trajectory_matching_distill(imgs, labels, experts, cfg, MEAN, STD, **kw)
    assert str(got.value) == str(want.value) and "at iteration 1 " in str(want.value)


def test_trajectory_matching_reads_nothing_back_per_iteration(experts, count_syncs) -> None:
    imgs, labels = _edf_data(n_per_class=2, seed=9)
    counts, with_cb = [], []
    for iters in (2, 6):
        cfg = _match(iterations=iters, soft_labels=True, batch_syn=2)
        with count_syncs() as c:
            trajectory_matching_distill(imgs, labels, experts, cfg, MEAN, STD)
        counts.append(sum(c.values()))
        with count_syncs() as c:
            trajectory_matching_distill(imgs, labels, experts, cfg, MEAN, STD, on_step=lambda t, m: None)
        with_cb.append(sum(c.values()))
    assert counts[0] == counts[1], counts
    assert with_cb[1] - with_cb[0] == 4  # on_step asked for floats: one read-back per iteration


def _ref_edf(imgs, labels, traj, cam_model, cfg: EDFConfig, names):
    """edf_distill() as it was: int((~keep).sum()) per iteration, float(share) per CAM recomputation."""
    extra = {"cam_iterations": [], "discriminative_share": [], "cpd_dropped": 0}
    numels = [math.prod(s) for s in traj.shapes]

    def cpd_reduce(num, den):
        if cfg.cpd_granularity == "tensor":
            num, den = per_tensor_terms(num, den, numels)
        loss, keep = common_pattern_dropout(num, den, cfg.alpha, cfg.cpd_normalize)
        extra["cpd_dropped"] = int((~keep).sum())
        return loss

    cam_idx, state = torch.from_numpy(np.asarray(labels)), {}

    def dae_hook(it, images, grad):
        if it % cfg.cam_every == 0 or "w" not in state:
            cams = synthetic_cams(cam_model, images, cam_idx, cfg.cam_image_size, cfg.cam_batch_size)
            state["w"] = dae_weights(cams, cfg.beta, cfg.cam_threshold)
            extra["cam_iterations"].append(it)
            extra["discriminative_share"].append(float(discriminative_share(cams).mean()))
        return grad * state["w"]

    out = _ref_tmd(imgs, labels, traj, cfg.match, MEAN, STD, reduce=cpd_reduce if cfg.use_cpd else eq1_loss,
                   grad_hook=dae_hook if cfg.use_dae else None)
    return out, extra


@pytest.mark.parametrize("use_cpd,use_dae,gran", [(True, True, "element"), (True, False, "tensor"), (False, True, "element")])
def test_edf_distill_equal_reference_and_no_per_iteration_read_back(experts, use_cpd, use_dae, gran, count_syncs) -> None:
    imgs, labels = _edf_data(n_per_class=2, seed=9)
    names = ["a", "b", "c"]
    torch.manual_seed(0)
    cam_model = create_model("convnet_d3", 3, image_size=8, **ARCH_KW)

    def cfg(iters: int) -> EDFConfig:
        return EDFConfig(match=_match(iterations=iters, soft_labels=True, batch_syn=4), alpha=0.25, beta=2.0,
                         cam_every=2, use_cpd=use_cpd, use_dae=use_dae, cpd_granularity=gran, cam_batch_size=3)

    want, want_extra = _ref_edf(imgs, labels, experts, cam_model, cfg(4), names)
    got = edf_mod.edf_distill(imgs, labels, experts, cam_model, cfg(4), MEAN, STD, class_names=names,
                              cam_class_names=names)
    _assert_result(got, want)
    assert got.extra == want_extra
    assert all(type(v) is float for v in got.extra["discriminative_share"])
    counts = []
    for iters in (2, 6):
        with count_syncs() as c:
            edf_mod.edf_distill(imgs, labels, experts, cam_model, cfg(iters), MEAN, STD, class_names=names,
                                cam_class_names=names)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


# ============================================================================ DDPS scoring


@pytest.fixture(scope="module")
def predictor():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_ddps import OraclePredictor

    return OraclePredictor(with_unet=True)


def test_representativeness_maps_equal_per_batch_and_one_read_back(predictor, count_syncs) -> None:
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    g = torch.Generator().manual_seed(4)
    want = torch.cat([representativeness_maps(predictor, x[s : s + 4], 1, 3, generator=g, batch_size=4) for s in (0, 4)])
    got = representativeness_maps(predictor, x, 1, 3, generator=torch.Generator().manual_seed(4), batch_size=4)
    assert _same(got, want)
    counts = []
    for bs in (3, 1):
        with count_syncs() as c:
            representativeness_maps(predictor, x, 1, 2, generator=torch.Generator().manual_seed(4), batch_size=bs)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("mode", ["crop", "pool"])
def test_dift_features_equal_per_batch_and_one_read_back(predictor, mode, count_syncs) -> None:
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    xy = np.random.default_rng(2).integers(0, 8, (6, 2))
    bx = np.concatenate([xy, xy + 8], axis=1)
    kw = dict(t=100, up_block=1, ensemble=2, mode=mode)
    g = torch.Generator().manual_seed(5)
    want = np.concatenate([dift_features(predictor, x[s : s + 4], 1, bx[s : s + 4], generator=g, batch_size=4, **kw)
                           for s in (0, 4)])
    assert _same(dift_features(predictor, x, 1, bx, generator=torch.Generator().manual_seed(5), batch_size=4, **kw), want)
    counts = []
    for bs in (3, 1):
        with count_syncs() as c:
            dift_features(predictor, x, 1, bx, generator=torch.Generator().manual_seed(5), batch_size=bs, **kw)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


def _ref_score_windows(predictor, images, ids, class_index, cfg, keep_maps):
    """score_windows() as it was: maps read back per batch, R taken per batch."""
    n, _, src_h, src_w = images.shape
    gen = _generator(cfg.seed, class_index, 0)
    frames, kept = [], []
    for start in range(0, n, cfg.batch_size):
        x, scale = prepare_images(images[start : start + cfg.batch_size], cfg.image_size)
        boxes = candidate_boxes(*x.shape[-2:], cfg.patch_size, cfg.patch_stride)
        maps = representativeness_maps(predictor, x, class_index, cfg.n_draws, cfg.t_range, gen, cfg.batch_size)
        r = patch_scores(maps, boxes, predictor.latent_scale)
        b, nw = r.shape
        src = source_boxes(boxes, scale, src_w, src_h)
        frames.append({"source_id": np.repeat(ids[start : start + b], nw), "src": np.tile(src, (b, 1)),
                       "model": np.tile(boxes, (b, 1)).astype(np.int64), "r": r.reshape(-1).astype(np.float64)})
        if sum(len(m) for m in kept) < keep_maps:
            kept.append(maps.numpy())
    return frames, np.concatenate(kept)[:keep_maps]


def _ddps_case(batch_size: int):
    cfg = DDPSConfig(image_size=16, patch_size=8, patch_stride=4, n_draws=2, batch_size=batch_size, patches_per_image=2)
    return _images(6, 20, seed=8), np.arange(6) * 3, cfg


def test_score_windows_equal_reference_and_one_read_back(predictor, count_syncs) -> None:
    imgs, ids, cfg = _ddps_case(4)
    table, maps = score_windows(predictor, imgs, ids, 1, cfg, keep_maps=5)
    frames, want_maps = _ref_score_windows(predictor, imgs, ids, 1, cfg, keep_maps=5)
    assert _same(maps, want_maps)
    assert _same(table["r"], np.concatenate([f["r"] for f in frames]))
    assert _same(table["source_id"], np.concatenate([f["source_id"] for f in frames]))
    assert _same(np.stack([table[k] for k in ("x0", "y0", "x1", "y1")], 1).astype(np.int64),
                 np.concatenate([f["src"] for f in frames]))
    assert _same(np.stack([table[k] for k in ("mx0", "my0", "mx1", "my1")], 1).astype(np.int64),
                 np.concatenate([f["model"] for f in frames]))
    counts = []
    for bs in (3, 1):
        with count_syncs() as c:
            score_windows(predictor, imgs, ids, 1, _ddps_case(bs)[2], keep_maps=5)
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


def test_window_features_equal_reference_and_one_read_back(predictor, count_syncs) -> None:
    imgs, ids, cfg = _ddps_case(4)
    table, _ = score_windows(predictor, imgs, ids, 1, cfg)
    got = window_features(predictor, imgs, ids, table, 1, cfg)
    best, gen, want = best_windows(table, ids, cfg), _generator(cfg.seed, 1, 1), []
    for start in range(0, 6, 4):  # the loop as it was: one numpy array per batch
        x, _ = prepare_images(imgs[start : start + 4], cfg.image_size)
        want.append(dift_features(predictor, x.repeat_interleave(2, dim=0), 1,
                                  best["model_boxes"][start : start + x.shape[0]].reshape(-1, 4), 160,
                                  cfg.dift_up_block, cfg.dift_ensemble, cfg.dift_input, gen, cfg.batch_size))
    assert _same(got["features"], np.concatenate(want))
    counts = []
    for bs in (3, 1):
        with count_syncs() as c:
            window_features(predictor, imgs, ids, table, 1, _ddps_case(bs)[2])
        counts.append(sum(c.values()))
    assert counts[0] == counts[1], counts


# ============================================================================ precision switches


def test_precision_defaults_change_nothing() -> None:
    from dd_assets.core.device_loops import inference_context, upload

    net, imgs, ids, lab = _bn_net(32), _images(5, 40, seed=2), np.array([9, 3, 7, 1, 5]), np.full(5, 2)
    base = score_class(net, imgs, lab, ids, 4, 32, 2, MEAN, STD, seed=1, class_index=2, batch_size=3)
    explicit = score_class(net, imgs, lab, ids, 4, 32, 2, MEAN, STD, seed=1, class_index=2, batch_size=3,
                           precision="fp32", channels_last=False)
    assert _same(base.score, explicit.score) and _same(base.boxes, explicit.boxes)
    views, imgs32 = sample_views(5, 2, 32, seed=1), _images(5, 32, seed=3)
    a = teacher_soft_labels(net, imgs32, views, 2, MEAN, STD, batch_size=2)
    b = teacher_soft_labels(net, imgs32, views, 2, MEAN, STD, batch_size=2, precision="fp32", channels_last=False)
    assert _same(a.values, b.values) and _same(a.indices, b.indices)
    with inference_context(net, "cpu") as forward:
        assert forward is net  # the default path is the plain model call
    t = torch.arange(6)
    assert upload(t, "cpu") is t


def test_bf16_and_channels_last_refused_off_cuda_with_the_parameter_named() -> None:
    from dd_assets.core.device_loops import check_inference_options, inference_context

    net, imgs, ids, lab = _bn_net(32), _images(3, 40), np.arange(3), np.zeros(3, np.int64)
    net.train()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    for kw, name in (({"precision": "bf16"}, "precision='bf16'"), ({"channels_last": True}, "channels_last=True"),
                     ({"precision": "fp16"}, "precision must be one of")):
        with pytest.raises(ValueError, match=name):
            score_class(net, imgs, lab, ids, 2, 32, 2, MEAN, STD, seed=0, class_index=0, **kw)
        with pytest.raises(ValueError, match=name):
            score_crops(net, imgs, lab, _boxes(3, 2), 32, MEAN, STD, **kw)
        with pytest.raises(ValueError, match=name):
            cidd_mod.cidd_candidates(net, imgs, lab, ids, 3, 32, MEAN, STD, seed=0, class_index=0, **kw)
        with pytest.raises(ValueError, match=name):
            teacher_soft_labels(net, imgs, sample_views(3, 1, 40, seed=0), 2, MEAN, STD, **kw)
        with pytest.raises(ValueError, match=name):
            check_inference_options("cpu", **kw)
        with pytest.raises(ValueError, match=name), inference_context(net, "cpu", **kw):
            pass
    assert not calls and net.training  # refused before any forward pass or mode change
    with pytest.raises(ValueError, match="CUDA-only, got device 'cpu'"):
        check_inference_options("cpu", "bf16")
