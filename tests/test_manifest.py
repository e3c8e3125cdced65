from __future__ import annotations

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dd_assets.data.images import BadImageError, inspect_image, load_image
from dd_assets.data.manifest import build_class_manifest, source_id
from dd_assets.data.sources import discover_classes


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def _folder(tmp_path, n=20, test=False):
    rng = np.random.default_rng(0)
    for c in ("cat", "dög"):  # non-ASCII class name
        for i in range(n):
            _png(tmp_path / "train" / c / f"{i:03d}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
        if test:
            for i in range(5):
                _png(tmp_path / "test" / c / f"t{i}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    return {"source": "folder", "root": str(tmp_path), "classes": None, "image_size": 8,
            "test_fraction": 0.2, "val_fraction": 0.25, "split_seed": 0, "max_per_class": None}


def test_split_from_one_folder_is_seeded_and_stratified(tmp_path):
    data = _folder(tmp_path)
    assert discover_classes(data) == ["cat", "dög"]
    a = build_class_manifest(data, "dög", 1).frame
    b = build_class_manifest(data, "dög", 1).frame
    assert a.equals(b)
    counts = dict(a["split"].value_counts().iter_rows())
    assert counts == {"train": 12, "val": 4, "test": 4}
    assert ((a["source_id"].to_numpy() >> 32) == 1).all()
    assert a["source_id"].is_unique().all()
    other = build_class_manifest({**data, "split_seed": 1}, "dög", 1).frame
    assert not other["split"].equals(a["split"])


def test_test_dir_is_used_when_present(tmp_path):
    data = _folder(tmp_path, n=8, test=True)
    t = build_class_manifest(data, "cat", 0).frame
    assert (t["split"] == "test").sum() == 5
    assert t.filter(pl.col("split") == "test")["path"].str.starts_with("test/").all()
    assert (t["split"] == "val").sum() == 2


def test_bad_files_are_skipped_and_counted(tmp_path):
    data = _folder(tmp_path, n=6)
    cdir = tmp_path / "train" / "cat"
    (cdir / "notes.txt").write_text("not an image")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG")
    (cdir / "truncated.jpg").write_bytes(buf.getvalue()[:100])
    (cdir / "fake.png").write_bytes(b"\x89PNG garbage")
    cm = build_class_manifest(data, "cat", 0)
    assert len(cm.frame) == 6
    reasons = dict(cm.skipped)
    assert len(reasons) == 3
    assert "extension" in reasons[str(cdir / "notes.txt")]
    assert "truncated.jpg" in reasons[str(cdir / "truncated.jpg")]


def test_empty_class_is_a_clear_error(tmp_path):
    data = _folder(tmp_path, n=3)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'empty'.*missing or empty"):
        build_class_manifest(data, "empty", 2)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_image_modes_decode_to_rgb(tmp_path, mode):
    p = tmp_path / f"x_{mode.replace(';', '')}.png"
    if mode == "I;16":
        arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
        Image.frombytes("I;16", (8, 8), arr.astype("<u2").tobytes()).save(p)
    elif mode == "P":
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).convert("P").save(p)
    elif mode == "RGBA":
        a = np.zeros((8, 8, 4), np.uint8)
        a[..., 0] = 255
        a[..., 3] = 128
        Image.fromarray(a, mode="RGBA").save(p)
    else:
        Image.fromarray(np.full((8, 8), 77, np.uint8), mode="L").save(p)
    info = inspect_image(p)
    img = load_image(p, 4)
    assert img.shape == (3, 4, 4) and img.dtype == np.uint8
    if mode == "L":
        assert (img == 77).all()
    if mode == "RGBA":  # composited over black at alpha 128/255
        assert abs(int(img[0, 0, 0]) - 128) <= 1 and img[1].max() == 0
    if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped
        full = load_image(p)
        assert full.max() == 245 and full.min() == 0  # 63000 / 65535 * 255
    assert info.width == 8


def test_non_image_raises_named_error(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"hello")
    with pytest.raises(BadImageError, match="x.jpg"):
        inspect_image(p)


def test_source_id_packs_class_and_position():
    assert source_id(3, 7) == (3 << 32) | 7


def test_non_ascii_file_names_are_kept_and_load(tmp_path):
    from dd_assets.data.loading import load_rows

    data = _folder(tmp_path, n=4)
    arr = np.full((8, 8, 3), 77, np.uint8)
    _png(tmp_path / "train" / "dög" / "ñandú ü 猫.png", arr)
    table = build_class_manifest(data, "dög", 1).frame
    row = table.filter(pl.col("path").str.contains("ñandú ü 猫.png", literal=True))
    assert len(row) == 1
    pixels = load_rows(row, data)
    assert pixels.shape == (1, 3, 8, 8) and int(pixels.min()) == int(pixels.max()) == 77
