"""``dd-assets init-data`` (dd_assets/folder_report.py, init_data.py, profile_writer.py): inspecting
a user's ImageFolder and writing a params.yaml profile for it, on folders built here with PIL
(known sizes, modes and colours)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dd_assets import folder_report, init_data, profile_writer
from dd_assets.cli import build_parser, main
from dd_assets.config import PROJECT_ROOT, ParamsError, load_params

# (class, file, mode, (width, height), colour as RGB after conversion)
IMAGES = [
    ("a", "1.png", "L", (40, 30), (100, 100, 100)),
    ("a", "2.png", "RGB", (64, 64), (200, 10, 30)),
    ("a", "3.png", "RGBA", (100, 50), (0, 0, 255)),
    ("b", "1.png", "P", (64, 64), (10, 200, 30)),
    ("b", "2.png", "RGB", (64, 64), (50, 60, 70)),
    ("b", "3.png", "RGB", (200, 160), (255, 255, 255)),
]


def solid(mode: str, size: tuple[int, int], rgb: tuple[int, int, int]) -> Image.Image:
    if mode == "L":
        return Image.new("L", size, rgb[0])
    if mode == "RGBA":
        return Image.new("RGBA", size, (*rgb, 255))
    if mode == "P":
        img = Image.new("P", size, 0)
        img.putpalette(list(rgb) + [0] * 765)
        return img
    return Image.new(mode, size, rgb)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """``pets/<class>/*``: mixed sizes and modes, one corrupt file, one non-image file."""
    root = tmp_path / "pets"
    for cls, name, mode, size, rgb in IMAGES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        solid(mode, size, rgb).save(root / cls / name)
    (root / "a" / "broken.png").write_bytes(b"this is not a PNG")
    (root / "b" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "params.yaml"
    shutil.copy(PROJECT_ROOT / "params.yaml", dst)
    return dst


def numpy_mean_std(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std over images in [0, 1], each image weighted equally."""
    means = np.stack([a.reshape(-1, 3).mean(axis=0) for a in arrays])
    squares = np.stack([(a.reshape(-1, 3) ** 2).mean(axis=0) for a in arrays])
    mean = means.mean(axis=0)
    return mean, np.sqrt(squares.mean(axis=0) - mean ** 2)


# -- the report ----------------------------------------------------------------------------------


def test_report_has_exact_classes_counts_sizes_modes_and_names_the_corrupt_file(mixed):
    r = folder_report.inspect_folder(mixed)
    assert r.classes == ["a", "b"]
    assert r.splits == ["all"]
    assert r.counts == {"all": {"a": 3, "b": 3}}   # broken.png does not count, notes.txt is no image
    assert (r.n_files, r.inspected, r.readable, r.non_image_files) == (7, 7, 6, 1)
    assert r.unreadable == 1
    assert r.unreadable_examples[0][0] == "a/broken.png"
    assert r.width == folder_report.SizeStats(40, 64.0, 200)
    assert r.height == folder_report.SizeStats(30, 64.0, 160)
    assert r.short_side == folder_report.SizeStats(30, 64.0, 160)
    assert r.aspect_range == (1.0, 2.0)
    assert r.off_square == 2                        # 40x30 and 100x50; 200x160 is exactly 1.25
    assert r.modes == {"L": 1, "RGB": 3, "RGBA": 1, "P": 1}
    text = r.summary()
    assert "a/broken.png" in text and "40/64/200" in text and "30/64/160" in text


def test_mean_std_equal_numpy_on_the_same_images(mixed):
    r = folder_report.inspect_folder(mixed)
    known = [np.full((h, w, 3), rgb, dtype=np.float64) / 255.0 for _, _, _, (w, h), rgb in IMAGES]
    mean, std = numpy_mean_std(known)
    np.testing.assert_allclose(r.mean, mean, atol=1e-12)
    np.testing.assert_allclose(r.std, std, atol=1e-12)
    decoded = [np.asarray(Image.open(mixed / c / f).convert("RGB"), dtype=np.float64) / 255.0 for c, f, *_ in IMAGES]
    mean2, std2 = numpy_mean_std(decoded)
    np.testing.assert_allclose(r.mean, mean2, atol=1e-12)
    np.testing.assert_allclose(r.std, std2, atol=1e-12)
    assert r.stats_images == 6


def test_a_train_test_layout_is_recognised_and_mean_std_use_train_only(tmp_path):
    root = tmp_path / "split"
    for split, cls, i, value in [("train", "x", 0, 0), ("train", "x", 1, 255), ("train", "y", 0, 0),
                                 ("train", "y", 1, 255), ("test", "x", 0, 128), ("test", "z", 0, 128)]:
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (value,) * 3).save(root / split / cls / f"{i}.png")
    r = folder_report.inspect_folder(root)
    assert r.splits == ["train", "test"]
    assert r.classes == ["x", "y"]                      # from train/, as the pipeline reads them
    assert r.counts == {"train": {"x": 2, "y": 2}, "test": {"x": 1, "y": 0}}
    assert r.extra_test_classes == ["z"]
    np.testing.assert_allclose(r.mean, [0.5] * 3, atol=1e-12)   # the grey test images are left out
    np.testing.assert_allclose(r.std, [0.5] * 3, atol=1e-12)
    s = init_data.suggest_profile(r, "split")
    assert s.profile["data"]["image_size"] == 32
    assert any("no test images for: y" in w for w in s.warnings)
    assert any("test/ folders without a train/ folder are ignored: z" in w for w in s.warnings)


def test_the_sample_is_capped_per_class_and_seeded(tmp_path):
    root = tmp_path / "many"
    for cls in ("p", "q"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16 + i, 16), (40 * i,) * 3).save(root / cls / f"{i}.png")
    a = folder_report.inspect_folder(root, max_images_per_class=2, seed=3)
    b = folder_report.inspect_folder(root, max_images_per_class=2, seed=3)
    assert a.inspected == 4 and a.readable == 4 and a.sampled
    assert a.counts == {"all": {"p": 6, "q": 6}}   # counts are files, not the sample
    assert a.mean == b.mean and a.size_counts == b.size_counts
    assert "seeded sample of at most 2" in a.summary()


def test_an_unreadable_only_folder_is_reported_not_crashed(tmp_path):
    root = tmp_path / "bad"
    (root / "c").mkdir(parents=True)
    for i in range(3):
        (root / "c" / f"{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    r = folder_report.inspect_folder(root)
    assert r.unreadable == 3 and r.mean is None
    with pytest.raises(ValueError, match="no readable image"):
        init_data.suggest_profile(r, "bad")


# -- the suggestion ------------------------------------------------------------------------------


@pytest.mark.parametrize("short, size", [(20, 20), (28, 28), (30, 28), (32, 32), (50, 32), (64, 64), (100, 96),
                                         (200, 128), (375, 224), (1000, 224)])
def test_image_size_is_the_largest_candidate_not_above_the_median_short_side(short, size):
    assert init_data.suggest_image_size(short) == size


def test_budget_rule():
    demo = init_data.suggest_budget(28, 500)
    assert demo == {"teacher.epochs": 5, "vit_scorer.epochs": 2, "eval.full_data.epochs": 3,
                    "student.epochs": 100, "student.eval_every": 25}
    assert init_data.suggest_budget(32, 500) == demo
    few = init_data.suggest_budget(32, 50)              # 10x fewer images: 10x the epochs, capped at 30
    assert few["teacher.epochs"] == 30 and few["vit_scorer.epochs"] == 20 and few["student.epochs"] == 100
    big = init_data.suggest_budget(64, 500)             # 4x the pixels: a quarter of the epochs
    assert big["teacher.epochs"] == 1 and big["student.epochs"] == 25 and big["student.eval_every"] == 6
    assert init_data.suggest_budget(224, 500)["student.epochs"] == 10   # clamped at MIN_STUDENT_EPOCHS
    assert init_data.suggest_budget(224, 5000)["teacher.epochs"] == 1


def test_suggestion_warns_about_aspect_sizes_classes_modes_and_unreadable_files(mixed, tmp_path):
    r = folder_report.inspect_folder(mixed)
    s = init_data.suggest_profile(r, "pets", tmp_path)
    data = s.profile["data"]
    assert data == {"source": "folder", "root": "pets", "classes": ["a", "b"], "image_size": 64,
                    "mean": [round(v, 4) for v in r.mean], "std": [round(v, 4) for v in r.std]}
    assert init_data.suggest_profile(r, "pets").profile["data"]["root"] == str(mixed)   # absolute without a base
    text = "\n".join(s.warnings)
    assert "2 of 6 images (33%) are more than 1.25:1 off square" in text and "squashed" in text
    assert "1 of 6 images have a short side more than 2x image_size 64 (up to 160 px)" in text
    assert "1 of 6 images have a short side below image_size 64 / 2 (down to 30 px)" in text
    assert "fewer than 10 images: a (3), b (3)" in text
    assert "modes L (1), P (1), RGBA (1)" in text and "converted to RGB" in text
    assert "unreadable" in text and "a/broken.png" in text
    assert s.profile["teacher"]["epochs"] == 30 and s.profile["student"]["epochs"] == 25


def test_a_clean_square_rgb_folder_has_no_warnings(tmp_path):
    root = tmp_path / "clean"
    for cls in ("u", "v"):
        (root / "train" / cls).mkdir(parents=True)
        (root / "test" / cls).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (32, 32), (i * 20, 255 - i * 20, i * 10)).save(root / "train" / cls / f"{i}.png")
        Image.new("RGB", (32, 32), (0, 0, 0)).save(root / "test" / cls / "0.png")
    s = init_data.suggest_profile(folder_report.inspect_folder(root), "clean")
    assert s.warnings == []
    assert s.profile["data"]["image_size"] == 32


# -- writing params.yaml ---------------------------------------------------------------------------


def _subsequence(old: str, new: str) -> bool:
    it = iter(new.splitlines())
    return all(line in it for line in old.splitlines())


def test_write_adds_a_profile_that_load_params_accepts_and_refuses_an_existing_name(mixed, params_copy, capsys):
    before = params_copy.read_text()
    argv = ["init-data", str(mixed), "--name", "pets", "--params", str(params_copy)]
    assert main([*argv, "--write"]) == 0
    after = params_copy.read_text()
    assert _subsequence(before, after)                  # every line (comments included) is kept
    assert "# pets: written by `dd-assets init-data" in after
    assert "DD_ASSETS_PROFILE=pets" in after and "<repo>/data/pets/" in after and ".dagster_home/pets/" in after
    params = load_params(params_copy, profile="pets")
    data = params.block("data")
    assert data["source"] == "folder" and data["root"] == str(mixed) and data["image_size"] == 64
    assert data["classes"] == ["a", "b"]
    assert params.raw["diffusion"]["steps"] == 150       # the demo budget, not the top-level 2000
    assert params.raw["experts"]["epochs"] == 2          # ... of every method (default_all's), not the top-level 100
    assert params.methods == list(load_params(params_copy, profile="default_all").methods)   # every entry, not the demo's set
    for other in ("default", "default_all", "cifar10", "tiny"):
        assert load_params(params_copy, profile=other).raw == load_params(PROJECT_ROOT / "params.yaml", profile=other).raw
    capsys.readouterr()

    assert main([*argv, "--write"]) == 2                 # the name exists: refused, file untouched
    err = capsys.readouterr().err
    assert "profile 'pets' exists" in err and "--force" in err
    assert params_copy.read_text() == after

    assert main([*argv, "--write", "--force"]) == 0      # replaced in place, not duplicated
    forced = params_copy.read_text()
    assert forced.count("\n  pets:\n") == 1 and forced.count("written by `dd-assets init-data") == 1
    assert _subsequence(before, forced)
    load_params(params_copy, profile="pets")
    assert not list(params_copy.parent.glob(".params.yaml.*"))   # no temp file left behind


def test_write_uses_dd_assets_params_and_the_folder_name(mixed, params_copy, monkeypatch, capsys):
    monkeypatch.setenv("DD_ASSETS_PARAMS", str(params_copy))
    assert main(["init-data", str(mixed), "--write"]) == 0
    assert "added profile 'pets'" in capsys.readouterr().out
    assert load_params(params_copy, profile="pets").block("data.image_size") == 64


def test_a_profile_the_schema_refuses_is_not_written(mixed, params_copy):
    s = init_data.suggest_profile(folder_report.inspect_folder(mixed), "pets")
    s.profile["student"]["epoch"] = 3                   # a typo: the schema names it
    before = params_copy.read_text()
    with pytest.raises(ParamsError, match="student.epoch"):
        profile_writer.write_profile(params_copy, s)
    assert params_copy.read_text() == before
    assert not list(params_copy.parent.glob(".params.yaml.*"))


def test_insertion_keeps_comments_and_later_top_level_keys():
    text = ("a: 1  # keep me\nprofiles:\n    x: {b: 2}   # x's comment\n\n    # about y\n    y:\n      b: 3\n"
            "# a comment about z\nz: 4\n")
    s = init_data.ProfileSuggestion("new", {"data": {"image_size": 32}}, ["w"], ["n"], "/src")
    out = profile_writer.insert_profile_text(text, s)
    doc = yaml.safe_load(out)
    assert doc == {"a": 1, "profiles": {"x": {"b": 2}, "y": {"b": 3}, "new": {"data": {"image_size": 32}}}, "z": 4}
    assert _subsequence(text, out)
    assert out.index("    new:") < out.index("# a comment about z")
    replaced = profile_writer.insert_profile_text(out, init_data.ProfileSuggestion("new", {"data": {"image_size": 64}}, [], [], "/src"),
                                             replace=True)
    assert yaml.safe_load(replaced)["profiles"]["new"] == {"data": {"image_size": 64}}
    assert replaced.count("written by `dd-assets init-data") == 1 and "# warning: w" not in replaced
    assert "# about y" in replaced and "# a comment about z" in replaced
    bare = profile_writer.insert_profile_text("a: 1\n", s)    # no profiles: yet
    assert yaml.safe_load(bare)["profiles"]["new"] == {"data": {"image_size": 32}}


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_prints_report_warnings_and_profile_without_writing(mixed, params_copy, capsys):
    before = params_copy.read_text()
    assert main(["init-data", str(mixed), "--params", str(params_copy)]) == 0
    out = capsys.readouterr().out
    assert "classes: 2: a, b" in out and "modes:" in out and "a/broken.png" in out
    assert "warnings (6):" in out and "off square" in out
    profile = yaml.safe_load(out[out.index("  # pets:"):out.index("\nnot written")])
    assert profile["pets"]["data"]["image_size"] == 64 and profile["pets"]["data"]["classes"] == ["a", "b"]
    assert "not written: add --write" in out
    assert params_copy.read_text() == before


def test_cli_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["init-data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("init-data: ") and "is not a folder" in err and len(err.splitlines()) == 1


def test_init_data_has_a_description(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["init-data", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Inspect an ImageFolder" in out and "MNIST defaults" in out and "--max-per-class" in out
