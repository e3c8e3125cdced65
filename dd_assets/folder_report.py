"""Inspecting an ImageFolder for ``dd-assets init-data`` (pure: no Dagster).

:func:`inspect_folder` streams over the folder (the layouts of :mod:`dd_assets.data.sources`:
``train/<class>/*`` [+ ``test/<class>/*``] or ``<class>/*``) and returns a :class:`FolderReport`:
classes, counts per split and class, image sizes, aspect ratios, modes, per-channel mean/std,
unreadable files.  :mod:`dd_assets.init_data` turns the report into a profile.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dd_assets.data.images import _to_rgb
from dd_assets.data.sources import IMAGE_EXTENSIONS, class_files, discover_classes, split_dirs

ASPECT_LIMIT = 1.25       # long side / short side counted as "off square" above this
EXAMPLES = 5              # unreadable files named in the report


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
