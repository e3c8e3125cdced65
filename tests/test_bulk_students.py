"""Bulk students (issue 19, item 1): K students in one vmapped loop equal K one-at-a-time runs.

Constructed case: two distilled sets of 8 images, four members -- stored soft labels (two
seeds on set A), CutMix one-hot targets (set B), NRR-DD's DBR labels (set A) -- each trained
one at a time by ``train_student`` from the same initial weights and by
``train_students_bulk`` together.  Members must agree with their own one-at-a-time student
(logits on a probe batch, selected epoch, validation accuracy, per-epoch losses) far more
closely than two seeds agree with each other, so a swapped seed, a shared batch order or a
wrong member's labels fail the test.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dd_assets.core.bulk_students import StudentJob, train_students_bulk
from dd_assets.core.dbr import teacher_dbr_labels
from dd_assets.core.soft_labels import sample_views, teacher_soft_labels
from dd_assets.core.student_training import train_student
from dd_assets.core.training import TrainConfig, evaluate
from dd_assets.models import create_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
C, S, N = 3, 16, 8  # ConvNet-3 at 16 px: 2 x 2 final maps


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet_d3", C, in_channels=3, image_size=S, width=16, norm="instance")


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    sets = {k: rng.integers(0, 256, (N, 3, S, S), dtype=np.uint8) for k in "AB"}
    labels = np.arange(N) % C
    teacher = _model(99).eval()
    views = sample_views(N, 4, S, seed=5)
    soft = teacher_soft_labels(teacher, sets["A"], views, C, MEAN, STD)
    dbr = teacher_dbr_labels(teacher, sets["A"], labels, sample_views(N, 4, S, seed=6), MEAN, STD)
    val_x = rng.integers(0, 256, (12, 3, S, S), dtype=np.uint8)
    val_y = np.arange(12) % C

    def val(model):
        return evaluate(model, [(val_x, val_y)], MEAN, STD, "cpu")

    probe = torch.from_numpy(rng.normal(size=(6, 3, S, S)).astype(np.float32))
    return sets, labels, soft, dbr, views, val, probe


def _cfg(seed: int, epochs: int = 3) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=3e-3, weight_decay=0.01, batch_size=4, optimizer="adamw",
                       temperature=4.0, eval_every=1, seed=seed)


def _jobs(setup, seeds=(0, 1, 2, 3)):
    sets, labels, soft, dbr, views, _, _ = setup
    return [
        StudentJob(_model(seeds[0]), sets["A"], labels, _cfg(seeds[0]), soft=soft),
        StudentJob(_model(seeds[1]), sets["A"], labels, _cfg(seeds[1]), soft=soft),
        StudentJob(_model(seeds[2]), sets["B"], labels, _cfg(seeds[2]), views=views),
        StudentJob(_model(seeds[3]), sets["A"], labels, _cfg(seeds[3]), dbr=dbr),
    ]


def _alone(setup, job: StudentJob):
    model = copy.deepcopy(job.model)
    res = train_student(model, job.images, job.hard_labels, job.soft, job.cfg, MEAN, STD, setup[5], "cpu",
                        views=job.views, dbr=job.dbr)
    return model, res


def test_bulk_equals_one_at_a_time_member_for_member(setup):
    probe = setup[6]
    jobs = _jobs(setup)
    alone = [_alone(setup, j) for j in jobs]
    results = train_students_bulk(jobs, MEAN, STD, setup[5], "cpu")
    with torch.no_grad():
        bulk_logits = [j.model.eval()(probe) for j in jobs]
        alone_logits = [m.eval()(probe) for m, _ in alone]
    for k, (res, (_, ref)) in enumerate(zip(results, alone)):
        assert res.best_epoch == ref.best_epoch, k
        assert res.best_val_acc == ref.best_val_acc, k
        np.testing.assert_allclose([h["train_loss"] for h in res.history], [h["train_loss"] for h in ref.history],
                                   rtol=1e-4)
        assert [h["train_acc"] for h in res.history] == [h["train_acc"] for h in ref.history]
        torch.testing.assert_close(bulk_logits[k], alone_logits[k], rtol=1e-3, atol=1e-3)
    # the tolerance is meaningful: two seeds on the same set and labels differ by far more
    gap = (alone_logits[0] - alone_logits[1]).abs().max().item()
    assert gap > 100 * 1e-3


def test_a_swapped_seed_is_caught(setup):
    """A member trained with another member's seed is not its one-at-a-time student."""
    probe = setup[6]
    jobs = _jobs(setup)
    ref_model, _ = _alone(setup, jobs[0])
    swapped = _jobs(setup, seeds=(0, 1, 2, 3))
    swapped[0].cfg = _cfg(1)   # seed 1's batch order for seed 0's weights
    train_students_bulk(swapped, MEAN, STD, setup[5], "cpu")
    with torch.no_grad():
        diff = (swapped[0].model.eval()(probe) - ref_model.eval()(probe)).abs().max().item()
    assert diff > 1e-2


def test_rendering_per_batch_equals_the_epoch_cache(setup):
    """Views rendered once per epoch and shared, or per batch per member: the same pixels."""
    a, b = _jobs(setup), _jobs(setup)
    train_students_bulk(a, MEAN, STD, setup[5], "cpu")
    train_students_bulk(b, MEAN, STD, setup[5], "cpu", render_cache_bytes=0)
    for ja, jb in zip(a, b):
        for (n, pa), pb in zip(ja.model.state_dict().items(), jb.model.state_dict().values()):
            assert torch.equal(pa, pb), n


def test_bulk_is_deterministic(setup):
    a, b = _jobs(setup)[:2], _jobs(setup)[:2]
    ra = train_students_bulk(a, MEAN, STD, setup[5], "cpu")
    rb = train_students_bulk(b, MEAN, STD, setup[5], "cpu")
    for x, y in zip(ra, rb):
        assert all(torch.equal(x.best_state[k], y.best_state[k]) for k in x.best_state)


def test_refusals(setup):
    sets, labels, soft, *_ = setup
    jobs = _jobs(setup)[:2]
    jobs[1].cfg = TrainConfig(**{**vars(_cfg(1)), "lr": 0.1})
    with pytest.raises(ValueError, match="differ in \\['lr'\\]"):
        train_students_bulk(jobs, MEAN, STD, setup[5], "cpu")
    with pytest.raises(ValueError, match="precision='bf16' needs a CUDA device"):
        train_students_bulk(_jobs(setup)[:1], MEAN, STD, setup[5], "cpu", precision="bf16")
    small = StudentJob(_model(0), sets["A"][:4], labels[:4], _cfg(0), views=sample_views(4, 3, S, seed=1))
    with pytest.raises(ValueError, match="sets of one size"):
        train_students_bulk([_jobs(setup)[2], small], MEAN, STD, setup[5], "cpu")
    other = StudentJob(create_model("convnet_d3", C, in_channels=3, image_size=S, width=8), sets["A"], labels,
                       _cfg(1), soft=soft)
    with pytest.raises(ValueError, match="one architecture"):
        train_students_bulk([_jobs(setup)[0], other], MEAN, STD, setup[5], "cpu")


def test_batched_rendering_trains_the_same_students(setup):
    """render='batched' (equal views up to rounding) gives the exact renderer's students."""
    probe = setup[6]
    a, b = _jobs(setup)[:3], _jobs(setup)[:3]
    ra = train_students_bulk(a, MEAN, STD, setup[5], "cpu")
    rb = train_students_bulk(b, MEAN, STD, setup[5], "cpu", render="batched")
    with torch.no_grad():
        for ja, jb, x, y in zip(a, b, ra, rb):
            assert x.best_epoch == y.best_epoch
            torch.testing.assert_close(jb.model.eval()(probe), ja.model.eval()(probe), rtol=1e-3, atol=1e-3)
