"""NRR-DD's student augmentation (Supp. A.2: two RandAugment ops + RandomResizedCrop + flip) as
replayable views: the op table, the stored ops, the replay, the params and the results rows.
Each test is a constructed case with a known answer (docs/methods.md, NRR-DD)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dd_assets.core.randaugment import OP_INDEX, OPS, apply_op, apply_ops, op_magnitude, sample_ops
from dd_assets.core.soft_labels import (
    RA_STREAM,
    SoftLabels,
    ViewParams,
    label_array_bytes,
    render_views,
    sample_views,
    teacher_soft_labels,
)

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)   # normalization that leaves pixels in [0, 1]
RA_KEYS = {"ra_ops", "ra_sign", "ra_magnitude", "ra_bins"}


def _images(n: int = 6, s: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------- the views

def test_views_without_randaugment_are_byte_identical_to_before():
    plain = sample_views(8, 3, 16, seed=0, scale=(0.5, 1.0))
    off = sample_views(8, 3, 16, seed=0, scale=(0.5, 1.0), randaugment=None)
    assert not plain.has_randaugment and off.ra_ops is None and off.ra_sign is None
    assert set(off.to_arrays()) == set(ViewParams.KEYS)
    assert _digest(off.to_arrays()) == _digest(plain.to_arrays())
    # the bytes the code wrote before RandAugment existed (computed at the parent commit)
    assert _digest(off.to_arrays()) == "bd40632faf3b1545"
    assert off.nbytes() == sum(a.nbytes for a in plain.to_arrays().values())


def test_randaugment_keeps_crops_flips_and_cutmix_and_stores_the_ops():
    n, e = 40, 5
    off = sample_views(n, e, 16, seed=7, scale=(0.3, 1.0))
    on = sample_views(n, e, 16, seed=7, scale=(0.3, 1.0), randaugment=(2, 9))
    for k in ViewParams.KEYS:   # a paired comparison: everything but the ops is the same draw
        assert np.array_equal(getattr(on, k), getattr(off, k)), k
    assert on.ra_ops.shape == on.ra_sign.shape == (n, e, 2)
    assert on.ra_ops.dtype == np.int8 and on.ra_sign.dtype == np.int8
    assert on.ra_magnitude == 9 and on.ra_bins == 31
    assert on.ra_ops.min() >= 0 and on.ra_ops.max() < len(OPS) and len(np.unique(on.ra_ops)) == len(OPS)
    signed = np.array([op.signed for op in OPS])[on.ra_ops]
    assert set(np.unique(on.ra_sign[~signed])) == {1}          # unsigned ops are never negated
    assert set(np.unique(on.ra_sign[signed])) == {-1, 1}       # signed ones both ways
    # drawn from the separate stream default_rng([seed, RA_STREAM])
    ops, sign = sample_ops(np.random.default_rng([7, RA_STREAM]), n, e, 2)
    assert np.array_equal(ops, on.ra_ops) and np.array_equal(sign, on.ra_sign)
    assert on.nbytes() > off.nbytes()


def test_view_arrays_round_trip_with_and_without_randaugment():
    on = sample_views(6, 3, 16, seed=1, randaugment=(2, 9))
    back = ViewParams.from_arrays(on.to_arrays())
    assert set(on.to_arrays()) == set(ViewParams.KEYS) | RA_KEYS
    for k in (*ViewParams.KEYS, "ra_ops", "ra_sign"):
        assert np.array_equal(getattr(back, k), getattr(on, k)) and getattr(back, k).dtype == getattr(on, k).dtype
    assert (back.ra_magnitude, back.ra_bins) == (9, 31)
    # as zarr stores a 0-d array: shape (1,)
    stored = {k: (v.reshape(1) if v.ndim == 0 else v) for k, v in on.to_arrays().items()}
    assert ViewParams.from_arrays(stored).ra_magnitude == 9
    off = ViewParams.from_arrays(sample_views(6, 3, 16, seed=1).to_arrays())
    assert not off.has_randaugment
    with pytest.raises(ValueError, match="together"):
        ViewParams(on.crop, on.flip, on.partner, on.mix_box, on.lam, ra_ops=on.ra_ops)


def test_label_bytes_leave_the_ops_out():
    views = sample_views(4, 2, 16, seed=0, randaugment=(2, 9))
    soft = SoftLabels(views, np.zeros((4, 2, 3), np.float16), np.zeros((4, 2, 3), np.int16), num_classes=10)
    store = soft.to_arrays()
    assert RA_KEYS <= set(store)
    assert label_array_bytes(store) == 4 * 2 * 3 * (2 + 2)
    assert SoftLabels.from_arrays(store).views.has_randaugment


def test_same_seed_same_bytes_other_seed_other_ops():
    imgs = _images()
    a = sample_views(6, 3, 16, seed=5, randaugment=(2, 9))
    b = sample_views(6, 3, 16, seed=5, randaugment=(2, 9))
    c = sample_views(6, 3, 16, seed=6, randaugment=(2, 9))
    assert _digest(a.to_arrays()) == _digest(b.to_arrays())
    assert not np.array_equal(a.ra_ops, c.ra_ops)
    for e in range(3):
        x = render_views(imgs, a, e, torch.arange(6), ZERO, ONE)
        y = render_views(imgs, b, e, torch.arange(6), ZERO, ONE)
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------- the replay

def _with_ops(views: ViewParams, ops: np.ndarray, sign: np.ndarray) -> ViewParams:
    return ViewParams(views.crop, views.flip, views.partner, views.mix_box, views.lam,
                      ra_ops=ops.astype(np.int8), ra_sign=sign.astype(np.int8), ra_magnitude=9, ra_bins=31)


def test_render_applies_the_ops_and_identity_ops_change_nothing():
    imgs = _images()
    off = sample_views(6, 2, 16, seed=2, scale=(0.5, 1.0))
    on = sample_views(6, 2, 16, seed=2, scale=(0.5, 1.0), randaugment=(2, 9))
    ident = _with_ops(off, np.zeros_like(on.ra_ops), np.ones_like(on.ra_sign))
    solar = _with_ops(off, np.full_like(on.ra_ops, OP_INDEX["Solarize"]), np.ones_like(on.ra_sign))
    idx = torch.arange(6)
    for e in range(2):
        plain = render_views(imgs, off, e, idx, ZERO, ONE)
        assert torch.equal(render_views(imgs, ident, e, idx, ZERO, ONE), plain)
        assert not torch.equal(render_views(imgs, on, e, idx, ZERO, ONE), plain)
        # Solarize twice at threshold 178.5/255: values >= t become 1 - v (< t), then stay
        t = op_magnitude(OP_INDEX["Solarize"], 9) / 255.0
        want = torch.where(plain >= t, 1.0 - plain, plain)
        assert torch.allclose(render_views(imgs, solar, e, idx, ZERO, ONE), want, atol=1e-6)


def test_the_cutmix_partner_gets_its_own_views_ops():
    """Image 0 pastes the left half of image 1; only image 1's view brightens: the pasted half of
    image 0's view is brightened, its own half is not."""
    imgs = _images(2, 8)
    full = np.array([[[0, 0, 8, 8]], [[0, 0, 8, 8]]], np.int16)
    base = ViewParams(crop=full, flip=np.zeros((2, 1), bool), partner=np.array([[1], [0]], np.int32),
                      mix_box=np.array([[[0, 0, 4, 8]], [[0, 0, 0, 0]]], np.int16),
                      lam=np.array([[0.5], [1.0]], np.float32))
    ops = np.zeros((2, 1, 2), np.int8)
    ops[1, 0, 0] = OP_INDEX["Brightness"]
    ra = _with_ops(base, ops, np.ones_like(ops))
    plain = render_views(imgs, base, 0, [0, 1], ZERO, ONE)
    out = render_views(imgs, ra, 0, [0, 1], ZERO, ONE)
    factor = 1.0 + op_magnitude(OP_INDEX["Brightness"], 9)
    assert torch.allclose(out[0, :, :, :4], (plain[0, :, :, :4] * factor).clamp(0, 1), atol=1e-6)
    assert torch.equal(out[0, :, :, 4:], plain[0, :, :, 4:])
    assert torch.allclose(out[1], (plain[1] * factor).clamp(0, 1), atol=1e-6)


def test_the_teacher_labels_the_augmented_pixels():
    imgs = _images(4, 8)
    views = sample_views(4, 2, 8, seed=3, randaugment=(2, 9))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    soft = teacher_soft_labels(teacher, imgs, views, 5, ZERO, ONE)
    plain = teacher_soft_labels(teacher, imgs, ViewParams.from_arrays(
        {k: v for k, v in views.to_arrays().items() if k not in RA_KEYS}), 5, ZERO, ONE)
    with torch.no_grad():
        want = teacher(render_views(imgs, views, 1, torch.arange(4), ZERO, ONE)).topk(5).values
    assert np.allclose(soft.values[:, 1].astype(np.float32), want.numpy().astype(np.float16), atol=1e-3)
    assert not np.array_equal(soft.values, plain.values)


# ------------------------------------------------------------------------------- the ops

def test_op_table_is_torchvisions():
    from torchvision.transforms.autoaugment import RandAugment

    space = RandAugment()._augmentation_space(31, (24, 32))
    assert list(space) == [op.name for op in OPS]
    for i, (name, (mags, signed)) in enumerate(space.items()):
        assert signed == OPS[i].signed, name
        for b in range(31):
            want = float(mags[b]) if mags.ndim else 0.0
            assert op_magnitude(i, b, 31, 32 if name == "TranslateX" else 24) == want, (name, b)


def test_every_op_matches_torchvision_on_uint8():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    u8 = torch.randint(0, 256, (3, 24, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for i, op in enumerate(OPS):
        for s in (1, -1) if op.signed else (1,):
            m = s * op_magnitude(i, 9, 31, 32 if op.name == "TranslateX" else 24)
            theirs = _apply_op(u8, op.name, m, InterpolationMode.NEAREST, None).float() / 255
            ours = apply_op(u8.float() / 255, i, m)
            # torchvision's uint8 path rounds blends to integers; geometry and the rest are exact
            tol = 1.5 / 255 if op.name in ("Brightness", "Color", "Contrast", "Sharpness") else 1e-6
            assert (theirs - ours).abs().max() <= tol, (op.name, s)


def test_known_answers_on_constructed_images():
    half = torch.full((3, 4, 4), 0.5)
    assert torch.equal(apply_op(half, OP_INDEX["Identity"], 0.0), half)
    # Brightness at magnitude 9: factor 1 +- 0.27
    b = OP_INDEX["Brightness"]
    assert torch.allclose(apply_ops(half, [b], [1], 9), torch.full_like(half, 0.635), atol=1e-6)
    assert torch.allclose(apply_ops(half, [b], [-1], 9), torch.full_like(half, 0.365), atol=1e-6)
    # Solarize: bin 30 = threshold 0 inverts everything, bin 0 = threshold 255 only pure white
    s = OP_INDEX["Solarize"]
    x = torch.tensor([0.0, 0.2, 0.7, 1.0]).view(1, 1, 4).expand(3, 1, 4)
    assert torch.allclose(apply_ops(x, [s], [1], 30), 1.0 - x)
    assert torch.equal(apply_ops(x, [s], [1], 0)[0, 0], torch.tensor([0.0, 0.2, 0.7, 0.0]))
    t = op_magnitude(s, 9) / 255.0   # at magnitude 9: >= 178.5/255 inverted
    y = torch.tensor([178 / 255, 179 / 255]).view(1, 1, 2).expand(3, 1, 2)
    assert torch.allclose(apply_ops(y, [s], [1], 9)[0, 0], torch.tensor([178 / 255, 76 / 255]), atol=1e-6) and t > 178 / 255
    # Posterize: 7 bits at magnitude 9, 4 bits at 30 (on the uint8 quantization)
    p = OP_INDEX["Posterize"]
    v = torch.tensor([255, 17, 3]).float().div(255).view(1, 1, 3).expand(3, 1, 3)
    assert torch.equal(apply_ops(v, [p], [1], 9)[0, 0] * 255, torch.tensor([254.0, 16.0, 2.0]))
    assert torch.equal(apply_ops(v, [p], [1], 30)[0, 0] * 255, torch.tensor([240.0, 16.0, 0.0]))


def test_translate_moves_a_dot_by_the_expected_pixels():
    dot = torch.zeros(3, 32, 32)
    dot[:, 10, 10] = 1.0
    tx, ty = OP_INDEX["TranslateX"], OP_INDEX["TranslateY"]
    assert int(op_magnitude(tx, 9, 31, 32)) == 4      # 150/331 * 32 * 9/30 = 4.35 -> 4 px
    for ops, sign, want in (([tx], [1], (10, 14)), ([tx], [-1], (10, 6)), ([ty], [1], (14, 10)),
                            ([tx, ty], [1, -1], (6, 14))):
        out = apply_ops(dot, ops, sign, 9)
        assert out[0].nonzero().tolist() == [list(want)], (ops, sign)
        assert out.sum() == 3.0


# ------------------------------------------------------------------------------- params

def test_compat_keeps_nrr_code_versions_and_randaugment_changes_them(tmp_path, monkeypatch):
    import dataclasses

    import importlib

    from dd_assets.methods import registry
    from dd_assets.config import load_params
    from dd_assets.defs.common import code_version
    from tests.conftest import write_params

    blocks = ["labels", "methods.nrr", "methods.nrr_dbr"]
    p = load_params(write_params(tmp_path, "tiny"))
    now = code_version(p, "soft_labels", blocks)
    module = importlib.import_module(registry.PLUGINS["nrr"])
    spec = registry.get("nrr")
    # the plugin before the key existed
    monkeypatch.setattr(module, "PLUGIN", dataclasses.replace(spec.with_defaults(drop=("student_augment",)), compat={}))
    assert code_version(p, "soft_labels", blocks) == now
    # the mechanism: without compat the new key would re-version nrr
    monkeypatch.setattr(module, "PLUGIN", dataclasses.replace(spec, compat={}))
    assert code_version(p, "soft_labels", blocks) != now
    monkeypatch.setattr(module, "PLUGIN", spec)
    ra = load_params(write_params(tmp_path, "tiny", {"methods.nrr": {"mipc": 8, "iterations": 2,
                                                                     "student_augment": "randaugment"}}))
    assert code_version(ra, "soft_labels", ["methods.nrr"]) != code_version(p, "soft_labels", ["methods.nrr"])
    assert code_version(ra, "soft_labels", ["methods.nrr_dbr"]) == code_version(p, "soft_labels", ["methods.nrr_dbr"])


def test_randaugment_entry_shares_nrrs_images():
    from dd_assets.methods.entries import images_source

    block = {"nrr": {"iterations": 500}, "nrr_ra": {"method": "nrr", "iterations": 500, "student_augment": "randaugment"},
             "nrr_ra_long": {"method": "nrr", "iterations": 2000, "student_augment": "randaugment"}}
    assert images_source(block, "nrr_ra") == "nrr"
    assert images_source(block, "nrr_ra_long") == "nrr_ra_long"   # other images: a chain of its own


def test_schema_refuses_an_unknown_student_augment(tmp_path):
    from dd_assets.config import ParamsError, load_params
    from tests.conftest import write_params

    with pytest.raises(ParamsError, match=r"methods\.nrr_x\.student_augment = 'foo': must be one of none, randaugment"):
        load_params(write_params(tmp_path, "tiny", {"methods.nrr_x": {"method": "nrr", "student_augment": "foo"}}))
    load_params(write_params(tmp_path, "tiny", {"methods.nrr_x": {"method": "nrr", "student_augment": "randaugment"}}))


# ------------------------------------------------------------------------------- results rows

def _students() -> pd.DataFrame:
    rows = []
    for seed, a in enumerate([0.40, 0.42, 0.44]):
        rows.append(("random", 10, seed, "convnet_d3", 300, "fkd", a, 4000))
        rows.append(("nrr_ra", 10, seed, "convnet_d3", 300, "fkd", a + 0.05, 4000))
    return pd.DataFrame(rows, columns=["method", "ipc", "seed", "student", "epochs", "label_mode", "test_acc",
                                       "label_bytes"])


def test_a_row_is_compared_with_random_only_under_the_same_recipe():
    from dd_assets.evaluation.results import results_rows

    bases = {"random": "random", "nrr_ra": "nrr"}
    kw = dict(dataset="X", recipe="r", main_labels="fkd", full_data_acc=0.8)
    other = results_rows(_students(), bases, recipes={"nrr_ra": "r-ra2m9"}, **kw).set_index("method")
    assert other.at["nrr_ra", "recipe"] == "r-ra2m9" and other.at["random", "recipe"] == "r"
    assert math.isnan(other.at["nrr_ra", "vs_random_pts"]) and other.at["nrr_ra", "vs_random_n"] == 0
    assert other.at["nrr_ra", "beats_random"] == "" and math.isnan(other.at["nrr_ra", "ior_pts"])
    same = results_rows(_students(), bases, recipes={"nrr_ra": "r-ra2m9", "random": "r-ra2m9"}, **kw).set_index("method")
    assert same.at["nrr_ra", "vs_random_pts"] == pytest.approx(5.0) and same.at["nrr_ra", "vs_random_n"] == 3
    assert same.at["nrr_ra", "ior_pts"] == pytest.approx(5.0)
    plain = results_rows(_students(), bases, **kw).set_index("method")   # one recipe string: as before
    assert plain.at["nrr_ra", "recipe"] == "r" and plain.at["nrr_ra", "vs_random_pts"] == pytest.approx(5.0)


def test_results_record_names_the_randaugment_recipe(tmp_path):
    from dd_assets.config import load_params
    from dd_assets.defs.report_assets import results_record
    from dd_assets.evaluation.protocol import resolve
    from tests.conftest import write_params

    class NoFiles:
        def exists(self, rel):
            return False

    p = load_params(write_params(tmp_path, "tiny", {"methods.nrr_ra": {"method": "nrr", "student_augment": "randaugment"}}))
    out = results_record(p, NoFiles(), _students()).set_index("method")
    recipe = resolve(p.raw).recipe
    assert out.at["random", "recipe"] == recipe and out.at["nrr_ra", "recipe"] == recipe + "-ra2m9"
    assert math.isnan(out.at["nrr_ra", "vs_random_pts"]) and out.at["nrr_ra", "beats_random"] == ""
