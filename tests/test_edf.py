"""EDF core: expert trajectories and trajectory matching (Eq. 1), Common Pattern Dropout
(Eq. 2), Grad-CAM (Eq. 3), DAE weights (Eq. 4-5), CAM class mapping, Comp-DD complexity,
determinism.  Tiny problems only (8x8 images, width-4 ConvNets): the whole file runs in a
few seconds on one CPU thread."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dd_assets.core.cam import cam_class_indices, grad_cam
from dd_assets.core.complexity import class_complexity, image_complexity, split_easy_hard
from dd_assets.core.dsa import DSAConfig, diff_augment
from dd_assets.core.imaging import to_model_input
from dd_assets.methods.edf.config import EDFConfig, edf_config, table8_row
from dd_assets.methods.edf.cpd import common_pattern_dropout, dropout_count, per_tensor_terms
from dd_assets.methods.edf.dae import dae_weights, synthetic_cams
from dd_assets.methods.edf.distill import edf_distill
from dd_assets.methods.edf.experts import ExpertConfig, ExpertTrajectories, train_experts
from dd_assets.methods.edf.matching import MatchConfig, mtt_distill, start_epoch_bound, trajectory_matching_distill
from dd_assets.methods.edf.student import (
    FunctionalModel,
    eq1_loss,
    param_match_terms,
    trajectory_matching_loss,
    unroll_student,
)
from dd_assets.methods import registry
from dd_assets.models import create_model

torch.set_num_threads(1)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
ARCH_KW = {"norm": "instance", "width": 4}
NUM_CLASSES = 3


def _data(n_per_class: int = 6, s: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class c has a brighter channel c: learnable in a few SGD steps."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_CLASSES), n_per_class)
    imgs = rng.integers(0, 120, size=(len(labels), 3, s, s)).astype(np.int64)
    for i, c in enumerate(labels):
        imgs[i, c] += 120
    return imgs.astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def experts() -> ExpertTrajectories:
    imgs, labels = _data()
    cfg = ExpertConfig(arch="convnet_d3", arch_kwargs=ARCH_KW, lr=0.05, batch_size=6, seed=3)
    return train_experts((imgs, labels), NUM_CLASSES, num_experts=2, epochs=4, cfg=cfg, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def cam_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("convnet_d3", NUM_CLASSES, image_size=8, **ARCH_KW)


def _tiny_match(**kw) -> MatchConfig:
    base = dict(iterations=3, syn_steps=3, expert_epochs=2, max_start_epoch=2, lr_img=100.0, lr_lr=1e-5, seed=0)
    base.update(kw)
    return MatchConfig(**base)


# ---------------------------------------------------------------------------- registry


def test_registered() -> None:
    """A synthesize plugin (no selection) with a Dagster piece of its own."""
    import importlib.util

    plugin = registry.get("edf")
    assert plugin.name == "edf" and plugin.kind == "synthesize" and plugin.select is None
    assert importlib.util.find_spec("dd_assets.defs.methods.edf") is not None


# ---------------------------------------------------------------------------- experts


def test_train_experts_layout_and_init(experts: ExpertTrajectories, tmp_path) -> None:
    model = create_model("convnet_d3", NUM_CLASSES, image_size=8, **ARCH_KW)
    p = sum(q.numel() for q in model.parameters())
    assert experts.params.shape == (2, 5, p) and experts.params.dtype == np.float32
    assert experts.names == [n for n, _ in model.named_parameters()]
    # checkpoint 0 is the seeded initialization of each expert
    torch.manual_seed(experts.seeds[1])
    init = torch.cat([q.detach().reshape(-1) for q in create_model("convnet_d3", NUM_CLASSES, image_size=8, **ARCH_KW).parameters()])
    np.testing.assert_array_equal(experts.params[1, 0], init.numpy())
    # parameters move every epoch, experts differ
    assert all(np.abs(np.diff(experts.params[0], axis=0)).sum(axis=1) > 0)
    assert not np.array_equal(experts.params[0, -1], experts.params[1, -1])
    assert len(experts.history) == 2 * 4
    experts.save(tmp_path / "traj")
    back = ExpertTrajectories.load(tmp_path / "traj")
    np.testing.assert_array_equal(back.params, experts.params)
    assert back.shapes == experts.shapes and back.expert_lr == experts.expert_lr


def test_train_experts_deterministic_and_streamed(experts: ExpertTrajectories) -> None:
    imgs, labels = _data()
    cfg = ExpertConfig(arch="convnet_d3", arch_kwargs=ARCH_KW, lr=0.05, batch_size=6, seed=3)
    again = train_experts((imgs, labels), NUM_CLASSES, 2, 4, cfg, MEAN, STD)
    np.testing.assert_array_equal(again.params, experts.params)

    def batches(expert: int, epoch: int):
        for s in range(0, len(labels), 6):
            yield imgs[s : s + 6], labels[s : s + 6]

    out = np.zeros((1, 3, experts.num_params), np.float32)
    streamed = train_experts(batches, NUM_CLASSES, 1, 2, cfg, MEAN, STD, image_size=8, in_channels=3, out=out)
    assert streamed.params is out and np.abs(out[0, 2] - out[0, 0]).sum() > 0
    with pytest.raises(ValueError, match="image_size and in_channels"):
        train_experts(batches, NUM_CLASSES, 1, 2, cfg, MEAN, STD)


# ---------------------------------------------------------------------------- Eq. 1


def test_eq1_normalization_hand_computed() -> None:
    student = torch.tensor([1.0, 2.0, 3.0])
    start = torch.tensor([0.0, 0.0, 0.0])
    target = torch.tensor([1.0, 0.0, 1.0])
    num, den = param_match_terms(student, start, target)
    assert num.tolist() == [0.0, 4.0, 4.0] and den.tolist() == [1.0, 0.0, 1.0]
    # ||(0, 2, 2)||^2 / ||(-1, 0, -1)||^2 = 8 / 2
    assert float(trajectory_matching_loss(student, start, target)) == pytest.approx(4.0)
    # a student that never moves scores exactly 1
    assert float(trajectory_matching_loss(start, start, target)) == pytest.approx(1.0)


class _Linear(nn.Module):
    """logits = W x over the flattened image (no bias)."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_unroll_student_one_step_hand_computed() -> None:
    """One CE step from W = 0 on one image x with label 0: dL/dz = softmax(0) - e_0 =
    (-1/2, 1/2), so W_1 = -lr * (dL/dz) x^T = lr/2 * (x, -x)."""
    model = _Linear(4, 2)
    fm = FunctionalModel(model, ["fc.weight"], [(2, 4)])
    x = torch.tensor([[[[1.0, 2.0], [-1.0, 0.5]]]])
    lr = torch.tensor(0.3, requires_grad=True)
    w1 = unroll_student(fm, torch.zeros(8), x, torch.tensor([0]), lr, 1, 1, torch.Generator().manual_seed(0))
    xf = x.flatten()
    np.testing.assert_allclose(w1.detach().numpy(), torch.cat([0.15 * xf, -0.15 * xf]).numpy(), rtol=1e-6)
    # Eq. 1 against a target W* = (x, -x): loss = (1 - 0.15)^2 / 1, differentiable in lr
    target = torch.cat([xf, -xf])
    loss = trajectory_matching_loss(w1, torch.zeros(8), target)
    assert float(loss.detach()) == pytest.approx(0.85**2, rel=1e-6)
    (g,) = torch.autograd.grad(loss, lr)
    assert float(g) == pytest.approx(2 * (0.85) * (-0.5), rel=1e-5)  # d/dlr (1 - lr/2)^2


def test_matching_step_decreases_loss(experts: ExpertTrajectories) -> None:
    """One plain gradient step on the pixels lowers Eq. 1 at a fixed (expert, start, batches)."""
    imgs, labels = _data(n_per_class=2, seed=5)
    model = experts.build_model()
    fm = FunctionalModel(model, experts.names, experts.shapes)
    x = to_model_input(imgs, MEAN, STD).requires_grad_(True)
    y = torch.from_numpy(labels)
    start, target = experts.flat(0, 1), experts.flat(0, 3)
    lr = torch.tensor(experts.expert_lr)

    def loss_at(z: torch.Tensor) -> torch.Tensor:
        student = unroll_student(fm, start, z, y, lr, 4, 3, torch.Generator().manual_seed(1))
        return trajectory_matching_loss(student, start, target)

    l0 = loss_at(x)
    (g,) = torch.autograd.grad(l0, x)
    assert float(g.abs().sum()) > 0
    l1 = loss_at((x - 1.0 * g / g.norm()).detach())
    assert float(l1.detach()) < float(l0.detach())


def test_start_epoch_window() -> None:
    cfg = MatchConfig(sequential=True, min_start_epoch=0, initial_max_start_epoch=10, max_start_epoch=20,
                      expansion_end_iteration=1000)
    assert [start_epoch_bound(cfg, t) for t in (0, 500, 1000, 5000)] == [10, 15, 20, 20]
    assert start_epoch_bound(MatchConfig(max_start_epoch=7), 123) == 7


def test_bad_start_window_rejected(experts: ExpertTrajectories) -> None:
    imgs, labels = _data(n_per_class=1)
    with pytest.raises(ValueError, match="max_start_epoch"):
        mtt_distill(imgs, labels, experts, _tiny_match(max_start_epoch=4), MEAN, STD)


# ---------------------------------------------------------------------------- CPD (Eq. 2)


def test_dropout_count_floor() -> None:
    assert dropout_count(0.0, 10) == 0
    assert dropout_count(0.25, 7) == 1  # floor(1.75)
    assert dropout_count(0.375, 8) == 3
    assert dropout_count(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001
    with pytest.raises(ValueError, match="alpha"):
        dropout_count(1.0, 10)


def test_cpd_drops_exactly_the_lowest_terms() -> None:
    num = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0], requires_grad=True)
    den = torch.tensor([1.0, 10.0, 1.0, 10.0, 1.0])
    loss, keep = common_pattern_dropout(num, den, alpha=0.4)  # floor(0.4 * 5) = 2: drop 1.0 and 2.0
    assert keep.tolist() == [True, False, True, False, True]
    assert float(loss) == pytest.approx((5 + 3 + 4) / 3)  # kept numerators / kept normalizers
    (g,) = torch.autograd.grad(loss, num)
    assert g.tolist() == pytest.approx([1 / 3, 0.0, 1 / 3, 0.0, 1 / 3])
    full, _ = common_pattern_dropout(num, den, alpha=0.4, normalize="full")
    assert float(full) == pytest.approx(12 / 23)
    # ties: stable, the earlier index is dropped first
    _, keep_t = common_pattern_dropout(torch.tensor([1.0, 1.0, 1.0, 0.5]), torch.ones(4), alpha=0.5)
    assert keep_t.tolist() == [False, True, True, False]


def test_cpd_alpha_zero_is_eq1_and_tensor_granularity() -> None:
    g = torch.Generator().manual_seed(0)
    student, start, target = (torch.randn(9, generator=g) for _ in range(3))
    num, den = param_match_terms(student, start, target)
    loss, keep = common_pattern_dropout(num, den, 0.0)
    assert bool(keep.all()) and float(loss) == pytest.approx(float(trajectory_matching_loss(student, start, target)))
    tn, td = per_tensor_terms(num, den, [2, 3, 4])
    assert torch.allclose(tn, torch.stack([num[:2].sum(), num[2:5].sum(), num[5:].sum()]))
    _, keep_t = common_pattern_dropout(tn, td, 0.34)  # floor(1.02) = 1 tensor dropped
    assert int((~keep_t).sum()) == 1 and not bool(keep_t[int(tn.argmin())])


# ---------------------------------------------------------------------------- DAE (Eq. 4-5)


def test_dae_weights_eq4() -> None:
    cam = torch.tensor([[[0.0, 0.2], [0.6, 1.0]]])  # mean 0.45
    w = dae_weights(cam, beta=2.0)
    assert w.shape == (1, 1, 2, 2)
    torch.testing.assert_close(w[0, 0], torch.tensor([[1.0, 1.0], [2.6, 3.0]]))
    # at the mean itself the pixel is enhanced (>=): a constant map is enhanced everywhere
    w_const = dae_weights(torch.full((1, 2, 2), 0.5), beta=1.0)
    assert w_const.flatten().tolist() == pytest.approx([1.5] * 4)
    # fixed threshold (Table 6b ablation)
    torch.testing.assert_close(dae_weights(cam, beta=1.0, threshold=0.2)[0, 0], torch.tensor([[1.0, 1.2], [1.6, 2.0]]))
    # Eq. 5: element-wise on every channel of the pixel gradient
    grad = torch.ones(1, 3, 2, 2)
    torch.testing.assert_close((grad * w)[0, 2], torch.tensor([[1.0, 1.0], [2.6, 3.0]]))


# ---------------------------------------------------------------------------- Grad-CAM (Eq. 3)


class _GapNet(nn.Module):
    """Features = the input itself; head = global average pool + linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.fill_(0.7)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean(dim=(2, 3)))


class _FlatNet(_GapNet):
    """Features = the input; head = linear on the flattened map (like ConvNet)."""

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.flatten(1))


def _minmax(m: torch.Tensor) -> torch.Tensor:
    return (m - m.min()) / (m.max() - m.min())


def test_grad_cam_known_answer_gap_head() -> None:
    # dy^c/dA_k(i,j) = W[c,k] / (h w)  ->  M^c = minmax(ReLU(sum_k W[c,k] A_k))
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -2.0]])
    net = _GapNet(weight)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 4, generator=g)
    cams = grad_cam(net, x, torch.tensor([0, 2]))
    for b, c in enumerate([0, 2]):
        expected = _minmax(F.relu(torch.einsum("k,kij->ij", weight[c], x[b])))
        torch.testing.assert_close(cams[b], expected)
    # the class picks the map: one bump per channel
    bumps = torch.zeros(1, 2, 4, 4)
    bumps[0, 0, 0, 0] = 1.0
    bumps[0, 1, 3, 3] = 1.0
    assert grad_cam(net, bumps, [0])[0].argmax().item() == 0
    assert grad_cam(net, bumps, [1])[0].argmax().item() == 15
    # upsampling to a larger size keeps [0, 1] and the peak corner
    up = grad_cam(net, bumps, [1], size=(8, 8))
    assert up.shape == (1, 8, 8) and float(up.min()) == 0.0 and float(up.max()) == 1.0
    assert up[0].argmax().item() == 63


def test_grad_cam_known_answer_flattened_head() -> None:
    # flattened head: dy^c/dA_k(i,j) = V_c[k,i,j], alpha_k = mean_ij V_c[k]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 2 * 3 * 3, generator=g)
    net = _FlatNet(weight)
    x = torch.rand(1, 2, 3, 3, generator=g)
    alpha = weight[1].view(2, 3, 3).mean(dim=(1, 2))
    expected = _minmax(F.relu(torch.einsum("k,kij->ij", alpha, x[0])))
    torch.testing.assert_close(grad_cam(net, x, [1])[0], expected)
    with pytest.raises(ValueError, match="class indices"):
        grad_cam(net, x, [3])


def test_grad_cam_restores_mode_and_leaves_params_untouched(cam_model: nn.Module) -> None:
    cam_model.train()
    x = torch.randn(2, 3, 8, 8)
    cams = grad_cam(cam_model, x, [0, 2])
    assert cams.shape == (2, 8, 8) and float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    assert cam_model.training and all(p.grad is None for p in cam_model.parameters())


# ---------------------------------------------------------------------------- CAM class mapping


def test_cam_class_mapping_by_name() -> None:
    subset = ["a", "b"]
    cam_names = ["x", "b", "y", "a"]
    assert cam_class_indices([1, 0, 1], subset, cam_names).tolist() == [1, 3, 1]
    with pytest.raises(ValueError, match=r"no class named \['c'\]"):
        cam_class_indices([0, 1], ["a", "c"], cam_names)
    # a missing class that no label uses is fine
    assert cam_class_indices([0], ["a", "c"], cam_names).tolist() == [3]
    with pytest.raises(ValueError, match="labels must be in"):
        cam_class_indices([2], subset, cam_names)


def test_subset_label_b_gets_the_cam_of_class_b() -> None:
    """Label 1 = 'b' of the subset must use the CAM model's class 'b' (index 3), not class 1."""
    net = _GapNet(torch.eye(4))  # CAM of class c = channel c
    x = torch.zeros(1, 4, 4, 4)
    x[0, 1, 0, 0] = 1.0  # channel 1 ('y' in the CAM model) peaks at pixel 0
    x[0, 3, 2, 2] = 1.0  # channel 3 ('b') peaks at pixel 10
    idx = cam_class_indices([1], ["a", "b"], ["x", "y", "a", "b"])
    assert idx.tolist() == [3]
    assert synthetic_cams(net, x, idx)[0].argmax().item() == 10


# ---------------------------------------------------------------------------- Comp-DD


def test_comp_dd_complexity_and_split() -> None:
    cams = torch.tensor([
        [[0.5, 0.1], [0.2, 0.3]],  # 1 of 4 >= 0.5 (the 0.5 counts) -> complexity 0.75
        [[0.9, 0.8], [0.7, 0.1]],  # 3 of 4 -> 0.25
        [[0.0, 0.0], [0.0, 0.0]],  # 0 of 4 -> 1.0
        [[1.0, 1.0], [1.0, 1.0]],  # 4 of 4 -> 0.0
    ])
    comp = image_complexity(cams)
    assert comp.tolist() == pytest.approx([0.75, 0.25, 1.0, 0.0])
    table = class_complexity(comp, [0, 0, 1, 2], ["p", "q", "r", "s"])
    assert list(table.columns) == ["class_index", "class_name", "complexity", "high_activation_share", "n_images"]
    assert isinstance(table, pl.DataFrame) and table["complexity"].to_list()[:3] == pytest.approx([0.5, 1.0, 0.0])
    assert np.isnan(table["complexity"][3]) and table["n_images"].to_list() == [2, 1, 1, 0]
    split = split_easy_hard(table, k=1)
    assert split.hard["class_name"].to_list() == ["q"] and split.easy["class_name"].to_list() == ["r"]
    by_thr = split_easy_hard(table, threshold=0.5)
    assert by_thr.hard["class_name"].to_list() == ["q", "p"] and by_thr.easy["class_name"].to_list() == ["r"]
    with pytest.raises(ValueError, match="2k=4"):
        split_easy_hard(table, k=2)


def test_comp_dd_staged_path_streams(cam_model: nn.Module) -> None:
    """The comp_dd_complexity asset's per-batch path (labels -> CAM classes by name ->
    Grad-CAM -> image complexity), streamed in two batches, then the per-class table that
    ``dd-assets easy-hard`` builds: batching changes nothing and every class counts its images."""
    imgs, labels = _data(n_per_class=2)
    names = ["a", "b", "c"]
    comps = []
    for x, y in [(imgs[:4], labels[:4]), (imgs[4:], labels[4:])]:
        idx = cam_class_indices(y, names, names)
        comps.append(image_complexity(grad_cam(cam_model, to_model_input(x, MEAN, STD), idx), 0.5))
    comp = np.concatenate(comps)
    one = image_complexity(grad_cam(cam_model, to_model_input(imgs, MEAN, STD), labels), 0.5)
    np.testing.assert_allclose(comp, one)
    table = class_complexity(comp, labels, names)
    assert isinstance(table, pl.DataFrame) and table["n_images"].to_list() == [2, 2, 2]
    assert ((table["complexity"] >= 0) & (table["complexity"] <= 1)).all()
    assert table["complexity"].to_list() == pytest.approx([one[labels == c].mean() for c in range(3)])


# ---------------------------------------------------------------------------- DSA


def test_diff_augment_deterministic_and_differentiable() -> None:
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    cfg = DSAConfig(mode="multiple")
    a = diff_augment(x, cfg, torch.Generator().manual_seed(7))
    b = diff_augment(x, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == x.shape
    (g,) = torch.autograd.grad(a.sum(), x)
    assert float(g.abs().sum()) > 0
    with pytest.raises(ValueError, match="unknown ops"):
        diff_augment(x, DSAConfig(strategy="color_blur"), torch.Generator())


# ---------------------------------------------------------------------------- EDF loop


def test_table8_defaults() -> None:
    assert table8_row(1)["alpha"] == 0.0 and table8_row(10)["alpha"] == 0.25 and table8_row(50)["alpha"] == 0.375
    assert table8_row(10, "ImageWoof")["beta"] == 2.0 and table8_row(50, "imagewoof")["beta"] == 1.0
    cfg = edf_config(50, "imagenette")
    assert (cfg.alpha, cfg.beta, cfg.cam_every) == (0.375, 2.0, 200)
    assert (cfg.match.iterations, cfg.match.batch_syn, cfg.match.lr_img, cfg.match.syn_steps) == (10000, 200, 100.0, 40)
    assert cfg.match.lr_label == 5.0 and cfg.match.soft_labels
    assert edf_config(10, iterations=5, beta=3.0).match.iterations == 5
    with pytest.raises(ValueError, match="unknown EDF parameter 'nope'"):
        edf_config(10, nope=1)


def _edf_cfg(**kw) -> EDFConfig:
    base = dict(match=_tiny_match(), alpha=0.25, beta=2.0, cam_every=2)
    base.update(kw)
    return EDFConfig(**base)


def test_edf_distill_runs_and_is_deterministic(experts: ExpertTrajectories, cam_model: nn.Module) -> None:
    imgs, labels = _data(n_per_class=2, seed=9)
    names = ["a", "b", "c"]
    steps: list[dict] = []
    cfg = _edf_cfg(match=_tiny_match(soft_labels=True, batch_syn=4))
    r1 = edf_distill(imgs, labels, experts, cam_model, cfg, MEAN, STD, class_names=names, cam_class_names=names,
                     on_step=lambda t, m: steps.append(m))
    r2 = edf_distill(imgs, labels, experts, cam_model, cfg, MEAN, STD, class_names=names, cam_class_names=names)
    assert r1.images.dtype == np.uint8 and r1.images.shape == imgs.shape
    assert r1.images_float.dtype == np.float32 and r1.soft_labels.shape == (6, 3)
    np.testing.assert_array_equal(r1.images, r2.images)
    np.testing.assert_array_equal(r1.images_float, r2.images_float)
    assert r1.lr == r2.lr and np.array_equal(r1.loss, r2.loss)
    assert not np.array_equal(r1.images_float, to_model_input(imgs, MEAN, STD).numpy())  # pixels moved
    assert r1.extra["cam_iterations"] == [0, 2] and len(steps) == 3 and "cpd_dropped" in steps[0]
    r3 = edf_distill(imgs, labels, experts, cam_model, _edf_cfg(match=_tiny_match(seed=1, soft_labels=True, batch_syn=4)),
                     MEAN, STD, class_names=names, cam_class_names=names)
    assert not np.array_equal(r1.images_float, r3.images_float)


def test_edf_modules_off_is_mtt_and_dae_changes_update(experts: ExpertTrajectories, cam_model: nn.Module) -> None:
    imgs, labels = _data(n_per_class=1, seed=11)
    names = ["a", "b", "c"]
    m = mtt_distill(imgs, labels, experts, _tiny_match(), MEAN, STD)
    off = edf_distill(imgs, labels, experts, None, _edf_cfg(use_cpd=False, use_dae=False), MEAN, STD)
    np.testing.assert_array_equal(m.images_float, off.images_float)
    assert m.lr == off.lr
    dae = edf_distill(imgs, labels, experts, cam_model, _edf_cfg(use_cpd=False), MEAN, STD,
                      class_names=names, cam_class_names=names)
    assert not np.array_equal(m.images_float, dae.images_float)
    np.testing.assert_array_equal(m.loss[:1], dae.loss[:1])  # same draws, DAE only rescales the update
    with pytest.raises(ValueError, match="class_names and cam_class_names"):
        edf_distill(imgs, labels, experts, cam_model, _edf_cfg(), MEAN, STD)
    with pytest.raises(ValueError, match=r"no class named \['c'\]"):
        edf_distill(imgs, labels, experts, cam_model, _edf_cfg(), MEAN, STD, class_names=names,
                    cam_class_names=["a", "b", "z"])


# ---------------------------------------------------------------------------- CPD and DAE inside the loop


def test_cpd_in_the_loop_changes_the_matched_loss(experts: ExpertTrajectories) -> None:
    """Iteration 0 of EDF with CPD (alpha = 0.5) matches the SAME student as MTT (same draws,
    same pixels), so its loss must be Eq. 2 on MTT's terms: drop the floor(alpha P) smallest
    (theta_hat - theta*_{s+M})^2, sum the rest over the kept normalizers -- and differ from Eq. 1."""
    imgs, labels = _data(n_per_class=1, seed=11)
    terms: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        terms.append((num.detach().clone(), den.detach().clone()))
        return eq1_loss(num, den)

    cfg = _tiny_match(iterations=1)
    mtt = trajectory_matching_distill(imgs, labels, experts, cfg, MEAN, STD, reduce=record)
    num, den = terms[0]
    d = int(np.floor(0.5 * num.numel()))
    order = torch.argsort(num, stable=True)
    kept = order[d:]
    expected = float(num[kept].sum() / den[kept].sum())
    cpd = edf_distill(imgs, labels, experts, None, _edf_cfg(match=cfg, alpha=0.5, use_dae=False), MEAN, STD)
    assert float(mtt.loss[0]) == pytest.approx(float(num.sum() / den.sum()), rel=1e-6)
    assert float(cpd.loss[0]) == pytest.approx(expected, rel=1e-5)
    assert abs(float(cpd.loss[0]) - float(mtt.loss[0])) > 1e-3 * float(mtt.loss[0])
    assert cpd.extra["cpd_dropped"] == d
    # alpha = 0 switches the dropout off: exactly MTT
    cpd0 = edf_distill(imgs, labels, experts, None, _edf_cfg(match=cfg, alpha=0.0, use_dae=False), MEAN, STD)
    assert float(cpd0.loss[0]) == pytest.approx(float(mtt.loss[0]), rel=1e-6)


def test_dae_step_scales_the_pixel_update_by_eq4_weights(experts: ExpertTrajectories) -> None:
    """One EDF step with DAE vs MTT from the same pixels and draws: the update ratio of every
    pixel is F(M, beta) of Eq. 4 on a CAM known by hand.  The CAM model's features are the
    (normalized) image itself and its head a global-average-pool + linear, so
    M^c = minmax(ReLU(sum_k W[c, k] x_k)) (Grad-CAM, Eq. 3); F = beta + M where M >= mean(M), else 1."""
    imgs, labels = _data(n_per_class=1, seed=11)
    weight = torch.tensor([[1.0, -0.5, 0.2], [-0.3, 1.0, 0.4], [-0.2, 0.3, 1.0]])  # no all-zero (constant) CAM
    cam_net = _GapNet(weight)
    beta = 2.0
    cfg = _tiny_match(iterations=1, lr_img=100.0)
    names = ["a", "b", "c"]
    x0 = to_model_input(imgs, MEAN, STD)
    mtt = mtt_distill(imgs, labels, experts, cfg, MEAN, STD)
    dae = edf_distill(imgs, labels, experts, cam_net, _edf_cfg(match=cfg, use_cpd=False, beta=beta, cam_every=1),
                      MEAN, STD, class_names=names, cam_class_names=names)
    step_mtt = torch.from_numpy(mtt.images_float) - x0
    step_dae = torch.from_numpy(dae.images_float) - x0
    for i, c in enumerate(labels.tolist()):
        m = F.relu(torch.einsum("k,khw->hw", weight[c], x0[i]))
        m = (m - m.min()) / (m.max() - m.min())
        w = torch.where(m >= m.mean(), beta + m, torch.ones_like(m))  # Eq. 4
        ok = step_mtt[i].abs() > 1e-3 * float(step_mtt[i].abs().max())
        ratio = step_dae[i][ok] / step_mtt[i][ok]
        torch.testing.assert_close(ratio, w.expand_as(step_mtt[i])[ok], rtol=2e-3, atol=0)
        assert float(w.max()) > beta and float(w.min()) == 1.0  # both branches occur
        # two pixels, one enhanced and one not: their update ratio is (beta + M) / 1
        hi, lo = int(torch.argmax(w)), int(torch.argmin(w))
        ch = int(step_mtt[i].abs().flatten(1).min(1).values.argmax())  # a channel where both move
        r = (step_dae[i, ch].flatten()[hi] / step_mtt[i, ch].flatten()[hi]) / (
            step_dae[i, ch].flatten()[lo] / step_mtt[i, ch].flatten()[lo])
        assert float(r) == pytest.approx(float(w.flatten()[hi]), rel=2e-3)
