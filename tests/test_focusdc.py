"""FocusDC: attention extraction, key windows, realism, selection, composites, DFT subsets."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from dd_assets.core.compose import tile_layout
from dd_assets.methods.focusdc.attention import attention_maps, cls_attention, key_window, window_sums, window_to_box
from dd_assets.methods.focusdc.compose import focus_composite
from dd_assets.methods.focusdc.dft import dynamic_finetune_subsets
from dd_assets.methods.focusdc.realism import FocusScores, realism_scores, scores_from_attention
from dd_assets.methods.focusdc.selection import FocusSelection, select_key_and_context
from dd_assets.core.imaging import resize_float, to_uint8
from dd_assets.methods import registry
from dd_assets.core.types import Box

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def _tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, num_classes=5)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def test_registered() -> None:
    plugin = registry.get("focusdc")
    assert plugin.kind == "select" and plugin.candidates == "focusdc_attention" and plugin.protocols == ("dft",)


# ---------------------------------------------------------------- key window (Eq. 6-7)


@pytest.mark.parametrize(
    "grid, alpha, pos",
    [
        ((10, 10), 0.3, (0, 0)),  # top-left corner
        ((10, 10), 0.3, (7, 7)),  # bottom-right corner
        ((10, 10), 0.3, (0, 7)),  # top-right corner
        ((10, 10), 0.3, (4, 2)),  # interior
        ((5, 5), 0.8, (1, 1)),  # paper default alpha: 4x4 window
        ((5, 5), 0.8, (0, 0)),
        ((4, 8), 0.5, (2, 3)),  # rectangular grid: 2x4 window
        ((7, 7), 1.0, (0, 0)),  # whole grid
    ],
)
def test_key_window_covers_planted_block(grid, alpha, pos) -> None:
    rng = np.random.default_rng(0)
    h_p, w_p = grid
    h, w = math.floor(alpha * h_p + 1e-9), math.floor(alpha * w_p + 1e-9)
    attn = rng.uniform(0, 0.01, size=grid).astype(np.float32)
    r, c = pos
    attn[r : r + h, c : c + w] += 1.0
    assert key_window(attn, alpha) == (r, c, h, w)
    assert key_window(torch.from_numpy(attn), alpha) == (r, c, h, w)


def test_key_window_block_smaller_than_window_at_edge() -> None:
    attn = np.zeros((10, 10))
    attn[8:, 8:] = 1.0  # 2x2 block in the corner; only the (7, 7) 3x3 window holds it all
    assert key_window(attn, 0.3) == (7, 7, 3, 3)
    attn = np.zeros((10, 10))
    attn[0:2, 0:2] = 1.0
    assert key_window(attn, 0.3) == (0, 0, 3, 3)


def test_key_window_ties_and_min_and_bruteforce() -> None:
    # uniform map: every window ties -> smallest row, then col
    assert key_window(np.full((6, 6), 1 / 36), 0.5) == (0, 0, 3, 3)
    # two equal blocks: the upper one wins; on the same row, the left one
    a = np.zeros((8, 8))
    a[5:7, 1:3] = 1.0
    a[1:3, 5:7] = 1.0
    assert key_window(a, 0.25) == (1, 5, 2, 2)
    b = np.zeros((8, 8))
    b[3:5, 5:7] = 1.0
    b[3:5, 0:2] = 1.0
    assert key_window(b, 0.25) == (3, 0, 2, 2)
    # min mode finds a planted cold block
    c = np.ones((6, 6))
    c[2:5, 3:6] = 0.0
    assert key_window(c, 0.5, mode="min") == (2, 3, 3, 3)
    # integral image == brute force
    rng = np.random.default_rng(1)
    for _ in range(5):
        m = rng.random((7, 9))
        s = window_sums(m, 3, 4)
        brute = np.array([[m[i : i + 3, j : j + 4].sum() for j in range(6)] for i in range(5)])
        np.testing.assert_allclose(s, brute, rtol=1e-12)
        r, cc, _, _ = key_window(m, 0.5)  # 3x4 window
        assert (r, cc) == np.unravel_index(np.argmax(brute), brute.shape)


def test_window_to_box() -> None:
    # source == ViT input: patch r covers rows r*P:(r+1)*P
    assert window_to_box(2, 3, 3, 4, 4, 40) == Box(12, 8, 28, 20)
    assert window_to_box(0, 0, 10, 10, 4, 40) == Box(0, 0, 40, 40)
    # source twice the ViT input (grid 10x10 of 4 px on a 40 px input, source 80 px)
    assert window_to_box(2, 3, 3, 4, 4, 80, grid_size=(10, 10)) == Box(24, 16, 56, 40)
    # non-integer scale: floor start, ceil end (45 px source, 10 patch rows)
    assert window_to_box(2, 3, 3, 4, 4, (45, 50), grid_size=(10, 10)) == Box(15, 9, 35, 23)
    assert window_to_box(7, 7, 3, 3, 4, 45, grid_size=(10, 10)) == Box(31, 31, 45, 45)
    with pytest.raises(ValueError):
        window_to_box(8, 0, 3, 3, 4, 40, grid_size=(10, 10))


def test_planted_window_maps_to_planted_pixels() -> None:
    # bright 12x8-pixel object in a 32x32 source seen by a 4x4-patch ViT at 16 px
    # (grid 4x4 of 8 source px): attention planted on the object's patches
    attn = np.full((4, 4), 0.01)
    attn[1:3, 2:4] = 0.2  # patches rows 1-2, cols 2-3 -> source rows 8:24, cols 16:32
    r, c, h, w = key_window(attn, 0.5)
    assert (r, c, h, w) == (1, 2, 2, 2)
    assert window_to_box(r, c, h, w, 4, 32, grid_size=(4, 4)) == Box(16, 8, 32, 24)


# ------------------------------------------------------------ cls attention (Eq. 3-4)


def _manual_cls_attention(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t = vit.patch_embed(x)
        t = vit._pos_embed(t)
        t = vit.norm_pre(vit.patch_drop(t))
        for blk in vit.blocks[:-1]:
            t = blk(t)
        blk = vit.blocks[-1]
        y = blk.norm1(t)
        a = blk.attn
        b, n, _ = y.shape
        qkv = y @ a.qkv.weight.T
        if a.qkv.bias is not None:
            qkv = qkv + a.qkv.bias
        qkv = qkv.reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(a.head_dim), dim=-1)
    npt = vit.num_prefix_tokens
    return att[:, :, 0, npt:].mean(dim=1).reshape(b, 4, 4)


@pytest.mark.parametrize(
    "kw", [{}, {"reg_tokens": 2}, {"qk_norm": True, "qkv_bias": False}, {"class_token": True, "no_embed_class": True}]
)
def test_cls_attention_matches_manual_softmax(kw) -> None:
    vit = _tiny_vit(**kw)
    torch.manual_seed(1)
    x = torch.randn(3, 3, 16, 16)
    vit.eval()
    with torch.no_grad():
        ref_logits = vit(x)
    vit.train()  # cls_attention must run in eval mode and restore this
    flags = [blk.attn.fused_attn for blk in vit.blocks]
    attn, logits = cls_attention(vit, x)
    assert vit.training
    assert [blk.attn.fused_attn for blk in vit.blocks] == flags
    assert all(len(blk.attn.attn_drop._forward_hooks) == 0 for blk in vit.blocks)
    assert attn.shape == (3, 4, 4) and attn.dtype == torch.float32
    assert logits.shape == (3, 5)
    torch.testing.assert_close(attn, _manual_cls_attention(vit.eval(), x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    s = attn.sum(dim=(1, 2))
    assert bool(((s > 0) & (s <= 1 + 1e-6)).all())
    # model output afterwards is unchanged
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(x), ref_logits, rtol=0, atol=0)


def test_cls_attention_restores_flag_on_error() -> None:
    vit = _tiny_vit()
    flag = vit.blocks[-1].attn.fused_attn
    with pytest.raises(Exception):
        cls_attention(vit, torch.randn(1, 3, 15, 15))  # wrong size -> timm raises
    assert vit.blocks[-1].attn.fused_attn == flag
    assert len(vit.blocks[-1].attn.attn_drop._forward_hooks) == 0


def test_cls_attention_needs_cls_token() -> None:
    vit = _tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        cls_attention(vit, torch.randn(1, 3, 16, 16))


# --------------------------------------------------------------------- realism (Eq. 5)


def test_realism_formula_and_ordering() -> None:
    # image 0: confident, diffuse attention; image 1: less confident, focused attention;
    # image 2: confident and focused; image 3: neither
    conf = np.array([0.9, 0.6, 0.9, 0.55])
    logits = np.log(np.stack([conf, 1 - conf], 1))  # 2 classes: softmax max == conf
    area = np.array([0.30, 0.34, 0.34, 0.30])
    s = realism_scores(logits, area, eta=30)
    np.testing.assert_allclose(s, conf + 30 * area, rtol=1e-12)
    assert list(np.argsort(-s, kind="stable")) == [2, 1, 0, 3]  # eta=30: area dominates
    s0 = realism_scores(logits, area, eta=0)
    assert list(np.argsort(-s0, kind="stable")) == [0, 2, 1, 3]  # eta=0: confidence only
    # max softmax is label-free; true_class uses p[label]
    lab = np.array([1, 1, 0, 0])
    st = realism_scores(logits, area, eta=30, labels=lab, confidence="true_class")
    np.testing.assert_allclose(st, np.array([0.1, 0.4, 0.9, 0.55]) + 30 * area, rtol=1e-9)
    with pytest.raises(ValueError):
        realism_scores(logits, area[:3])


def test_attention_maps_and_scores_consistency() -> None:
    """The graph's scoring: ``attention_maps`` over the class's images in ``source_id`` order
    (the ``focusdc_attention`` asset), then ``scores_from_attention`` on the stored maps
    (the plugin's ``select``)."""
    vit = _tiny_vit()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
    ids = np.array([40, 10, 30, 20, 50])
    order = np.argsort(ids, kind="stable")  # the asset reads the class's rows sorted by source_id
    attn, logits = attention_maps(vit, imgs[order], MEAN, STD, batch_size=2)
    args = (attn, logits, np.full(5, 2), ids[order], 2, (4, 4), (32, 32))  # patch 4, 32 px sources
    out = scores_from_attention(*args)
    assert isinstance(out, FocusScores)
    np.testing.assert_array_equal(out.source_id, np.sort(ids))
    assert out.attention.shape == (5, 4, 4)
    assert out.boxes.shape == (5, 4) and out.windows.shape == (5, 4)
    # image order follows source_id: row 0 is id 10 = imgs[1]
    x = resize_float(
        (torch.from_numpy(imgs[[1]]).float() / 255 - 0.5) / 0.5, (16, 16)
    )
    a1, lg1 = cls_attention(vit, x)
    np.testing.assert_allclose(out.attention[0], a1[0].numpy(), rtol=1e-4, atol=1e-6)
    for i in range(5):
        r, c, h, w = out.windows[i]
        assert (h, w) == (3, 3)  # floor(0.8 * 4)
        assert (r, c, h, w) == key_window(out.attention[i], 0.8)
        assert tuple(out.boxes[i]) == window_to_box(r, c, h, w, 4, 32, grid_size=(4, 4)).as_tuple()
        a = out.attention[i].astype(np.float64)
        # default s_area: mean of the patch-normalized attention over the window (Eq. 5 scale)
        assert out.s_area[i] == pytest.approx(a[r : r + h, c : c + w].sum() / a.sum() / (h * w), rel=1e-5)
    np.testing.assert_allclose(out.score, out.confidence + 30 * out.s_area, rtol=1e-5)
    old = scores_from_attention(*args, area="sum")
    np.testing.assert_array_equal(old.windows, out.windows)  # Eq. 6 window is the same under both
    for i in range(5):
        r, c, h, w = old.windows[i]
        assert old.s_area[i] == pytest.approx(old.attention[i, r : r + h, c : c + w].sum(), rel=1e-5)


# ------------------------------------------------- realism scale (Eq. 5): s_area on the paper's scale


def _planted_map(share: float, total: float = 1.0, grid: int = 8, top: int = 1, w: int = 6) -> np.ndarray:
    """``grid x grid`` attention with a share ``share`` of the mass ``total`` spread evenly over
    the ``w x w`` block at ``(top, top)`` and the rest evenly over the other patches."""
    a = np.full((grid, grid), (1 - share) * total / (grid * grid - w * w))
    a[top : top + w, top : top + w] = share * total / (w * w)
    return a


def _logits_with_max_prob(p: float, c: int = 10, cls: int = 0) -> np.ndarray:
    """One row of logits whose softmax puts ``p`` on ``cls`` and ``(1-p)/(c-1)`` elsewhere."""
    row = np.zeros(c)
    row[cls] = math.log(p * (c - 1) / (1 - p))
    return row


def test_area_score_is_patch_normalized_window_mean() -> None:
    from dd_assets.methods.focusdc.realism import area_score

    a = _planted_map(0.7, total=0.8)  # the class token keeps 0.2 on itself
    assert key_window(a, 0.8) == (1, 1, 6, 6)
    assert area_score(a, 1, 1, 6, 6) == pytest.approx(0.7 / 36, rel=1e-12)
    assert area_score(a, 1, 1, 6, 6, "sum") == pytest.approx(0.7 * 0.8, rel=1e-12)
    # the class token's self-weight (total mass on the patches) does not change the default score
    assert area_score(_planted_map(0.7, total=0.3), 1, 1, 6, 6) == pytest.approx(0.7 / 36, rel=1e-12)
    # scale: flat attention -> 1/K, all of it in the window -> 1/(h w) (8x8 grid, 6x6 window)
    assert area_score(np.ones((8, 8)), 1, 1, 6, 6) == pytest.approx(1 / 64)
    assert area_score(_planted_map(1.0), 1, 1, 6, 6) == pytest.approx(1 / 36)
    assert area_score(np.zeros((8, 8)), 1, 1, 6, 6) == pytest.approx(1 / 64)  # no mass: flat
    with pytest.raises(ValueError, match="area_score"):
        area_score(a, 1, 1, 6, 6, "max")
    with pytest.raises(ValueError, match="area_score"):
        scores_from_attention(a[None].astype(np.float32), np.zeros((1, 10), np.float32), np.zeros(1),
                                      np.arange(1), 0, (4, 4), (32, 32), area="median")


def test_realism_scale_large_confidence_gap_beats_small_attention_gap() -> None:
    """Eq. 5 with eta = 30 on the project's 8x8 grid (alpha 0.8: 6x6 window).

    Image 0: attention share 0.9 in its window, confidence 0.30.  Image 1: share 0.7,
    confidence 0.95.  Mean scale: 0.30 + 30*0.9/36 = 1.05 < 0.95 + 30*0.7/36 = 1.53, so the
    confident image wins.  Old window SUM: 0.30 + 27 > 0.95 + 21: attention decides alone.
    Images 2/3 (conf 0.50 / 0.60, share 0.95 / flat 36/64): a large attention gap still beats
    a small confidence gap under the mean (0.5 + 0.79 > 0.6 + 0.47), so both terms count.
    """
    attn = np.stack([_planted_map(0.9, 0.8), _planted_map(0.7, 0.8), _planted_map(0.95, 0.8),
                     np.full((8, 8), 0.8 / 64)]).astype(np.float32)
    logits = np.stack([_logits_with_max_prob(p) for p in (0.30, 0.95, 0.50, 0.60)]).astype(np.float32)
    args = (attn, logits, np.zeros(4), np.arange(10, 14), 0, (4, 4), (32, 32))
    new = scores_from_attention(*args)  # defaults: alpha 0.8, eta 30, area_score mean
    np.testing.assert_allclose(new.confidence, [0.30, 0.95, 0.50, 0.60], rtol=1e-5)
    np.testing.assert_allclose(new.s_area, [0.9 / 36, 0.7 / 36, 0.95 / 36, 1 / 64], rtol=1e-5)
    np.testing.assert_allclose(new.score, [1.05, 0.95 + 30 * 0.7 / 36, 0.5 + 30 * 0.95 / 36, 0.6 + 30 / 64],
                               rtol=1e-5)
    assert new.score[1] > new.score[0]  # large confidence gap beats small attention gap
    assert new.score[2] > new.score[3]  # large attention gap beats small confidence gap
    # the attention term spans less than the confidence range [1/C, 1] (balance, not dominance)
    assert 30 * (1 / 36 - 1 / 64) < 1 - 1 / 10
    assert list(select_key_and_context(new, 1, m_factor=2, n_factor=1, seed=0).key) == [1, 2]
    # switched off (old window sum): attention decides alone, image 0 first whatever the confidence
    old = scores_from_attention(*args, area="sum")
    np.testing.assert_array_equal(old.windows, new.windows)
    assert old.score[0] > old.score[1]
    # attention gap 30 * 0.8 * (0.9 - 0.7) = 4.8: no confidence gap (< 1) could close it
    assert old.score[0] - old.score[1] > 1.0
    assert list(select_key_and_context(old, 1, m_factor=2, n_factor=1, seed=0).key) == [2, 0]


def test_context_weights_follow_true_class_confidence() -> None:
    """Class 2.  Images 0-2: keys (share 0.95, p[2] = 0.9).  Images 3-4: predicted class 7 with
    p[7] ~ 1 but p[2] ~ 2e-9; images 5-7: p[2] = 0.6 = max.  Under confidence="true_class" the
    context weights are p[2], so 3-4 are (practically) never drawn and the weights are 0.6;
    under "max" 3-4 weigh ~1 and are drawn about half the time."""
    cidx = 2
    attn = np.stack([_planted_map(0.95)] * 3 + [np.full((8, 8), 1 / 64)] * 5).astype(np.float32)
    logits = np.zeros((8, 10))
    logits[0:3] = _logits_with_max_prob(0.9, cls=cidx)
    logits[3:5, 7] = 20.0
    logits[5:8] = _logits_with_max_prob(0.6, cls=cidx)
    labels = np.full(8, cidx)
    p_true = np.exp(logits[:, cidx]) / np.exp(logits).sum(1)
    assert p_true[3] < 1e-8 and np.exp(logits[3, 7]) / np.exp(logits[3]).sum() > 0.999
    args = (attn, logits.astype(np.float32), labels, np.arange(100, 108), cidx, (4, 4), (32, 32))
    tc = scores_from_attention(*args, confidence="true_class")
    np.testing.assert_allclose(tc.confidence, p_true, rtol=1e-4)
    mx = scores_from_attention(*args, confidence="max")
    assert mx.confidence[3] > 0.999
    picks_tc, picks_mx = [], []
    for seed in range(200):
        sel = select_key_and_context(tc, 1, seed=seed)
        assert sorted(sel.key) == [0, 1, 2]
        np.testing.assert_allclose(sel.context_weights, p_true[sel.context], rtol=1e-4)
        picks_tc.append(int(sel.context[0]))
        sel_mx = select_key_and_context(mx, 1, seed=seed)
        assert sorted(sel_mx.key) == [0, 1, 2]
        picks_mx.append(int(sel_mx.context[0]))
    assert set(picks_tc) <= {5, 6, 7}
    assert 0.3 < np.mean(np.isin(picks_mx, [3, 4])) < 0.75  # the case discriminates the two


def test_focusdc_rows_wire_area_score_and_confidence(monkeypatch) -> None:
    """The selection asset's path (the piece's ``load_candidates`` on the stored attention
    group, the plugin's ``select``) passes area_score and confidence through (m = 2, n = 2: the
    Table 8 row of the cifar10 profile)."""
    from dd_assets.defs.methods import focusdc as piece
    from dd_assets.methods.entries import entry_config

    cidx = 2
    arrays: dict = {}
    monkeypatch.setattr(piece, "read_group", lambda root, key: (arrays, {}))

    def rows(attn, logits, **kw):
        arrays.update(source_id=np.arange(200, 200 + len(attn)), attention=attn.astype(np.float32),
                      logits=logits.astype(np.float32), patch_size=np.array([4, 4]))
        cfg = entry_config("focusdc", {"m": 2, "n": 2, **kw})
        return registry.get("focusdc").select(cfg, piece.load_candidates(None, "focusdc_attention", cidx, "c", 32), 1, 32)

    # area: 0/2 focused but unsure, 1/3 a little less focused and confident, 4/5 flat
    attn = np.stack([_planted_map(s, 0.8) for s in (0.9, 0.7, 0.88, 0.72)] + [np.full((8, 8), 0.8 / 64)] * 2)
    logits = np.stack([_logits_with_max_prob(p, cls=cidx) for p in (0.30, 0.95, 0.32, 0.90, 0.5, 0.5)])
    df = rows(attn, logits)  # paper defaults: area_score mean
    assert sorted(df.loc[df.tile < 2, "source_id"]) == [201, 203]
    df = rows(attn, logits, area_score="sum")
    assert sorted(df.loc[df.tile < 2, "source_id"]) == [200, 202]
    # confidence: keys 0/1; 2/3 sure of class 7 (p[2] ~ 2e-9, max ~ 1); 4/5 p[2] = max = 0.6
    attn = np.stack([_planted_map(0.95)] * 2 + [np.full((8, 8), 1 / 64)] * 4)
    logits = np.zeros((6, 10))
    logits[0:2] = _logits_with_max_prob(0.9, cls=cidx)
    logits[2:4, 7] = 20.0
    logits[4:6] = _logits_with_max_prob(0.6, cls=cidx)
    for seed in range(20):
        df = rows(attn, logits, confidence="true_class", seed=seed)
        assert sorted(df.loc[df.tile < 2, "source_id"]) == [200, 201]
        ctx = df[df.tile >= 2]
        assert sorted(ctx.source_id) == [204, 205]
        np.testing.assert_allclose(ctx.score, 0.6, rtol=1e-4)
    df = rows(attn, logits, confidence="max", seed=0)
    assert (df.loc[df.tile >= 2, "score"] > 0.59).all()


# ------------------------------------------------------------------------ selection


def test_select_variants_and_disjoint_context() -> None:
    real = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 0.0, 6.0, 4.0, 5.0, 10.0])
    ipc = 2
    sel = select_key_and_context(real, ipc, variant="max_as", seed=0)
    assert isinstance(sel, FocusSelection)
    assert list(sel.key) == [11, 2, 6, 4, 8, 0]  # top-6 descending; 5.0 tie -> index 0 before 10
    sel = select_key_and_context(real, ipc, variant="min_as", seed=0)
    assert list(sel.key) == [7, 1, 5, 3, 9, 0]
    r1 = select_key_and_context(real, ipc, variant="r_as", seed=3)
    r2 = select_key_and_context(real, ipc, variant="r_as", seed=3)
    np.testing.assert_array_equal(r1.key, r2.key)
    assert any(
        not np.array_equal(select_key_and_context(real, ipc, variant="r_as", seed=s).key, r1.key)
        for s in range(4, 10)
    )
    for variant in ("max_as", "min_as", "r_as"):
        for seed in range(5):
            s = select_key_and_context(real, ipc, variant=variant, seed=seed)
            assert len(s.key) == 3 * ipc and len(set(s.key)) == 3 * ipc
            assert len(s.context) == ipc and len(set(s.context)) == ipc
            assert not set(s.key) & set(s.context)
    with pytest.raises(ValueError, match="fewer than"):
        select_key_and_context(real, 4)  # needs 12 + 4 > 12


def test_table8_ablation_counts_m0_n4_and_m4_n0() -> None:
    """Table 8 varies m + n = 4: M = m·IPC key and N = n·IPC context images (disjoint)."""
    from dd_assets.methods.focusdc.selection import arrange

    real = np.arange(20, dtype=float)
    only_ctx = select_key_and_context(real, 2, m_factor=0, n_factor=4, seed=1)
    assert len(only_ctx.key) == 0 and len(only_ctx.context) == 8 and len(set(only_ctx.context)) == 8
    key, ctx, _ = arrange(only_ctx, 2, 0, 4, class_index=0)
    assert len(key) == 0 and sorted(ctx) == sorted(only_ctx.context)
    only_key = select_key_and_context(real, 2, m_factor=4, n_factor=0, seed=1)
    assert list(only_key.key) == list(range(19, 11, -1)) and len(only_key.context) == 0
    with pytest.raises(ValueError, match="m_factor \\+ n_factor >= 1"):
        select_key_and_context(real, 2, m_factor=0, n_factor=0)


def test_select_context_confidence_weights() -> None:
    k = 10
    real = np.arange(k, dtype=float)  # max_as keys: 9, 8, 7
    conf = np.zeros(k)
    conf[[2, 5]] = [0.7, 0.3]
    conf[[7, 8, 9]] = 1.0  # key images; never context
    sel = select_key_and_context(real, 1, m_factor=3, confidence=conf, seed=0)
    assert list(sel.key) == [9, 8, 7]
    assert sel.context[0] in (2, 5)
    assert sel.context_weights[0] == conf[sel.context[0]]
    # the probability of drawing 2 is 0.7 (weighted by confidence)
    picks = [select_key_and_context(real, 1, confidence=conf, seed=s).context[0] for s in range(400)]
    assert 0.6 < np.mean(np.array(picks) == 2) < 0.8
    conf2 = np.zeros(k)
    conf2[[0, 2]] = [0.2, 0.9]  # keys for ipc=2 are 9..4; of the rest only 0 and 2 weigh
    sel2 = select_key_and_context(real, 2, m_factor=3, confidence=conf2, seed=0)
    assert list(sel2.key) == [9, 8, 7, 6, 5, 4]
    assert sorted(sel2.context) == [0, 2]
    # FocusScores input carries realism and confidence
    fs = _fake_scores(k, conf=conf.astype(np.float32))
    sel3 = select_key_and_context(fs, 1, seed=0)
    assert list(sel3.key) == [9, 8, 7] and sel3.context[0] in (2, 5)


# ------------------------------------------------------------------------ composite (Eq. 8)


def _solid(color, size=32) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).clone()


def test_focus_composite_layout_and_lineage() -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    keys = []
    for i, col in enumerate(colors):
        src = torch.zeros(3, 32, 32, dtype=torch.uint8)  # black outside the key box
        box = Box(4 + i, 6, 20 + i, 30)
        src[:, box.y0 : box.y1, box.x0 : box.x1] = torch.tensor(col, dtype=torch.uint8).view(3, 1, 1)
        keys.append((src, box))
    ctx = torch.zeros(3, 32, 32, dtype=torch.uint8)
    ctx[:, :, :16] = 200  # left half grey, right half black, plus a gradient row
    ctx[0, 0] = torch.arange(32, dtype=torch.uint8) * 8
    img, tiles = focus_composite(keys, ctx, 33, key_ids=[1, 2, 3], context_ids=[9])
    assert img.shape == (3, 33, 33) and img.dtype == torch.uint8
    dests = tile_layout(33, 2)
    assert [t.dest for t in tiles] == dests
    assert [t.source_id for t in tiles] == [1, 2, 3, 9]
    assert [t.box for t in tiles] == [k[1] for k in keys] + [Box(0, 0, 32, 32)]
    for t, col in zip(tiles[:3], colors, strict=True):
        d = t.dest
        region = img[:, d.y0 : d.y1, d.x0 : d.x1]
        assert bool((region == torch.tensor(col, dtype=torch.uint8).view(3, 1, 1)).all())
    d = tiles[3].dest
    expect = to_uint8(resize_float(ctx.float()[None] / 255, (d.height, d.width))[0])
    assert torch.equal(img[:, d.y0 : d.y1, d.x0 : d.x1], expect)
    assert (d.height, d.width) == (16, 16)  # 33 = 17 + 16: the low-res view is downsampled 2x
    # other square layouts; non-square counts are rejected
    img9, tiles9 = focus_composite([(_solid((9, 9, 9)), Box(0, 0, 8, 8))] * 8, [ctx], 30, m=8, n=1)
    assert len(tiles9) == 9 and tiles9[-1].box == Box(0, 0, 32, 32)
    with pytest.raises(ValueError, match="square"):
        focus_composite(keys[:2], ctx, 32, m=2, n=1)


def _fake_scores(k: int, conf: np.ndarray | None = None) -> FocusScores:
    return FocusScores(
        class_index=4,
        source_id=np.arange(100, 100 + k, dtype=np.int64),
        boxes=np.tile(np.array([[0, 0, 16, 16]], dtype=np.int32), (k, 1)),
        score=np.arange(k, dtype=np.float32),
        attention=np.zeros((k, 4, 4), np.float32),
        pred=np.zeros(k, np.int64),
        confidence=np.full(k, 0.5, np.float32) if conf is None else conf,
        windows=np.tile(np.array([[0, 0, 2, 2]], dtype=np.int32), (k, 1)),
        s_area=np.zeros(k, np.float32),
    )


def _staged_focusdc(monkeypatch, attn, logits, sources, ipc, size=32, **kw):
    """The asset graph's FocusDC chain after the attention maps, without storage: the piece's
    ``load_candidates`` on the stored group, the selection table of ``candidates.select_rows_pl``
    (the plugin's ``select``: ``scores_from_attention``, ``select_key_and_context``, ``arrange``)
    stitched by ``composition.compose_method`` (class 0)."""
    from dd_assets.defs import candidates, composition
    from dd_assets.defs.methods import focusdc as piece
    from dd_assets.methods.entries import entry_config

    ids = np.array(sorted(sources), dtype=np.int64)
    arrays = dict(source_id=ids, attention=attn.astype(np.float32), logits=logits.astype(np.float32),
                  patch_size=np.array([4, 4]))
    monkeypatch.setattr(piece, "read_group", lambda root, key: (arrays, {}))
    monkeypatch.setattr(composition, "load_rows", lambda rows, data: [sources[s] for s in rows["source_id"]])
    plugin, cfg = registry.get("focusdc"), entry_config("focusdc", kw)
    data = {"image_size": size}
    sel = candidates.select_rows_pl(plugin, cfg, ipc, None, ["c"], size, "focusdc_attention")
    man = pl.DataFrame({"source_id": ids, "class_name": "c", "path": [f"{i}.png" for i in ids], "sha256": "",
                        "width": size, "height": size})
    images, labels, lineage = composition.compose_method(sel, man, data, plugin.tiles(cfg, ipc, size))
    return images, labels, lineage


def test_staged_compose_uses_every_selected_image_once(monkeypatch) -> None:
    """Eq. 8 as the graph builds it: with M = m IPC and N = n IPC every selected image is used
    exactly once, key tiles crop their key window and carry their realism, low-res tiles show
    the whole image and carry their context weight."""
    k, ipc, size = 10, 2, 32
    rng = np.random.default_rng(0)
    attn = rng.random((k, 8, 8)).astype(np.float32)
    logits = rng.normal(size=(k, 10)).astype(np.float32)
    sources = {100 + i: _solid((i * 20, 0, 0)).numpy() for i in range(k)}
    images, labels, lineage = _staged_focusdc(monkeypatch, attn, logits, sources, ipc, seed=1)
    sc = scores_from_attention(attn, logits, np.zeros(k, np.int64), np.arange(100, 100 + k), 0, (4, 4), (size, size))
    sel = select_key_and_context(sc, ipc, seed=1, class_index=0)
    assert images.shape == (ipc, 3, size, size) and list(labels) == [0] * ipc
    assert len(lineage) == 4 * ipc
    key_ids = sorted(lineage.filter(pl.col("tile") < 3)["source_id"].to_list())
    ctx_ids = sorted(lineage.filter(pl.col("tile") == 3)["source_id"].to_list())
    assert key_ids == sorted(100 + int(i) for i in sel.key)
    assert ctx_ids == sorted(100 + int(i) for i in sel.context)
    assert len(set(key_ids) | set(ctx_ids)) == 4 * ipc  # each selected image exactly once
    for t in lineage.iter_rows(named=True):
        t = SimpleNamespace(**t)
        j = t.source_id - 100
        assert int(images[t.image_index, 0, t.dest_y0, t.dest_x0]) == j * 20
        box = (t.box_x0, t.box_y0, t.box_x1, t.box_y1)
        if t.tile == 3:
            assert box == (0, 0, size, size)
            assert t.score == pytest.approx(float(sc.confidence[j]), rel=1e-6)
        else:
            assert box == tuple(int(v) for v in sc.boxes[j])
            assert t.score == pytest.approx(float(sc.score[j]), rel=1e-6)


# ---------------------------------------------------------------------- DFT (App. 6.2.1)


def test_dynamic_finetune_subsets() -> None:
    pools = {0: range(0, 20), 1: range(100, 130), 2: range(200, 210)}
    subs = dynamic_finetune_subsets(pools, ipc=4, epochs=6, seed=7)
    assert len(subs) == 6
    for s in subs:
        assert s.dtype == np.int64 and len(s) == 12 and len(set(s.tolist())) == 12
        for c, lo in enumerate((0, 100, 200)):
            block = s[4 * c : 4 * (c + 1)]
            assert bool(((block >= lo) & (block < lo + 30)).all()) and set(block) <= set(pools[c])
    assert len({tuple(s) for s in subs}) == 6  # a fresh subset every epoch
    again = dynamic_finetune_subsets(pools, ipc=4, epochs=6, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(subs, again, strict=True))
    other = dynamic_finetune_subsets(pools, ipc=4, epochs=6, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(subs, other, strict=True))
    small = dynamic_finetune_subsets([[1, 2], [5, 6, 7, 8, 9]], ipc=3, epochs=2, seed=0)
    assert all(sorted(s[:2]) == [1, 2] and len(s) == 5 for s in small)
