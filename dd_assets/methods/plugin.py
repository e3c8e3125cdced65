"""The one shape every distillation method has (no Dagster, no I/O).

A method is a :class:`MethodPlugin`: a typed config dataclass (the only home of its paper
defaults; ``params.yaml`` holds overrides), its ``kind`` and one of two signatures:

* ``select`` methods pick crops of real images: ``select(cfg, cands, ipc, size)`` gets the
  candidates of one class (:class:`ClassCandidates`, loaded by the Dagster layer from the asset
  the plugin names in ``candidates``) and returns that class's rows of the common selection
  schema (:data:`SELECTION_COLUMNS` without ``class_index``, types :data:`SELECTION_DTYPES`; a
  pandas or Polars frame, :func:`rows` builds it): which source crop fills tile
  ``tile`` of distilled image ``image_index``. ``tiles(cfg, ipc, size)`` says how many tiles per
  side a distilled image has; composition, labels and students are shared code. An optional
  ``refine`` optimizes the composed pixels with the teacher (NRR-DD).
* ``synthesize`` methods optimize pixels (EDF, UDD); their distilled asset is built by their
  Dagster piece (``dd_assets/defs/methods/<name>.py``) and stores the same Zarr images/labels.

Variants are data: a ``params.yaml`` entry ``nrr_dbr: {method: nrr, labels: dbr}`` is the
``nrr`` plugin with other parameters.

Polars is imported where it is used (:func:`selection_frame`): ``benchmarks/gpu_table.py`` imports
this module on a GPU machine that has pandas and no Polars.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import polars as pl

#: the common selection schema: one row per tile (crop boxes at the working resolution)
SELECTION_DTYPES = {
    "class_index": np.int64, "image_index": np.int64, "tile": np.int64, "source_id": np.int64,
    "x0": np.int32, "y0": np.int32, "x1": np.int32, "y1": np.int32, "score": np.float32,
}
SELECTION_COLUMNS = list(SELECTION_DTYPES)
ROW_COLUMNS = SELECTION_COLUMNS[1:]   # what ``select`` returns for one class

Kind = Literal["select", "synthesize"]


def param(default: Any, *, min: int | None = None, choices: tuple[Any, ...] | None = None, doc: str = "") -> Any:
    """A config field: its paper default, optional integer lower bound / allowed values (checked
    when params.yaml is loaded, :mod:`dd_assets.params_schema`) and a one-line meaning.

    Mutable defaults (lists, dicts) are copied per instance."""
    meta = {"min": min, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: _copy(d), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(v: Any) -> Any:
    if isinstance(v, list):
        return [_copy(x) for x in v]
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class ClassCandidates:
    """What a selection reads for one class: candidate source images with optional crop boxes
    (working resolution) and scores, plus whatever else the candidate asset stores (``arrays``:
    features, attention maps, logits ...; ``table``: a per-candidate table)."""

    class_index: int
    class_name: str
    source_id: np.ndarray
    boxes: np.ndarray | None = None
    score: np.ndarray | None = None
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    table: pd.DataFrame | pl.DataFrame | None = None

    def crops(self):
        """The candidates as :class:`~dd_assets.core.types.CandidateCrops` (boxes and scores needed)."""
        from dd_assets.core.types import CandidateCrops

        return CandidateCrops(self.class_index, np.asarray(self.source_id, np.int64),
                              np.asarray(self.boxes, np.int32), np.asarray(self.score, np.float32))

    def need(self, have: int, need: int, what: str) -> None:
        """Refuse an IPC the class cannot fill, naming the class and what is short."""
        if have < need:
            raise ValueError(f"class {self.class_name!r} has {have} {what} but IPC needs {need}; "
                             "lower the IPC or add images to the class")


@dataclass(frozen=True)
class MethodPlugin:
    """One distillation method: its config, its kind and its one pure entry point."""

    name: str
    config: type                      # a frozen dataclass built with :func:`param` fields
    kind: Kind
    description: str
    # select methods: the asset whose per-class partitions hold the candidates
    # ("manifest", "teacher_features", "rded_scores", ...); its loader lives in the Dagster layer
    candidates: str = "manifest"
    select: Callable[[Any, ClassCandidates, int, int], pd.DataFrame | pl.DataFrame] | None = None
    tiles: Callable[[Any, int, int], int] = lambda cfg, ipc, size: 1
    # refine(cfg, images, labels, teacher, mean, std, device, on_step) -> images, when refines(cfg)
    refine: Callable[..., np.ndarray] | None = None
    refines: Callable[[Any], bool] = lambda cfg: False
    # parameters that change only labels/students (an entry differing only in these reuses images)
    label_keys: tuple[str, ...] = ()
    # evaluation protocols beyond the shared ruler this method's paper uses ("dft": FocusDC's
    # dynamic fine-tuning); every such protocol also evaluates the random baseline
    protocols: tuple[str, ...] = ()
    # bump when the method's code changes its outputs ("1" leaves existing versions as they were)
    version: str = "1"
    # parameters added after outputs existed -> the value that reproduces them (left out of hashes)
    compat: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind == "select" and self.select is None:
            raise TypeError(f"method {self.name!r}: a select plugin needs select()")
        if not dataclasses.is_dataclass(self.config):
            raise TypeError(f"method {self.name!r}: config must be a dataclass")

    @property
    def defaults(self) -> dict[str, Any]:
        """The paper defaults, field by field (a fresh copy)."""
        out = {}
        for f in dataclasses.fields(self.config):
            out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return out

    def field_meta(self, key: str) -> Mapping[str, Any]:
        return next(f.metadata for f in dataclasses.fields(self.config) if f.name == key)

    def with_defaults(self, drop: tuple[str, ...] = (), **changes: Any) -> MethodPlugin:
        """This plugin with other defaults (``changes``) or without some parameters (``drop``)."""
        specs = []
        for f in dataclasses.fields(self.config):
            if f.name in drop:
                continue
            default = changes[f.name] if f.name in changes else self.defaults[f.name]
            specs.append((f.name, f.type, param(default, **{k: f.metadata.get(k) for k in ("min", "choices")},
                                                doc=f.metadata.get("doc", ""))))
        return dataclasses.replace(self, config=dataclasses.make_dataclass(self.config.__name__, specs, frozen=True))

    def make_config(self, params: Mapping[str, Any]) -> Any:
        """The config for resolved parameters (defaults overlaid with an entry's block)."""
        return self.config(**{k: v for k, v in params.items() if k != "method"})


def rows(image_index: np.ndarray, tile: np.ndarray, source_id: np.ndarray, boxes: np.ndarray,
         score: np.ndarray) -> pd.DataFrame:
    """A class's selection rows in the common schema and dtypes.

    pandas: what ``select`` has always returned (plugin code outside this package, e.g.
    ``benchmarks/gpu_table.py``, edits it with pandas); :func:`selection_frame` makes Polars of it."""
    boxes = np.asarray(boxes)
    return pd.DataFrame({
        "image_index": np.asarray(image_index, np.int64), "tile": np.asarray(tile, np.int64),
        "source_id": np.asarray(source_id, np.int64),
        "x0": boxes[:, 0].astype(np.int32), "y0": boxes[:, 1].astype(np.int32),
        "x1": boxes[:, 2].astype(np.int32), "y1": boxes[:, 3].astype(np.int32),
        "score": np.asarray(score, np.float32),
    })[ROW_COLUMNS]


def selection_frame(df: pd.DataFrame | pl.DataFrame, class_index: int) -> pl.DataFrame:
    """One class's ``select`` rows (pandas or Polars) as Polars ``SELECTION_COLUMNS``: ``class_index``
    (int64) in front, the row columns in schema order with the types the plugin gave them."""
    import polars as pl

    out = pl.from_pandas(df.reset_index(drop=True)) if isinstance(df, pd.DataFrame) else df
    missing = [c for c in ROW_COLUMNS if c not in out.columns]
    if missing:
        raise ValueError(f"selection rows of class {class_index} lack columns {missing} (schema: {ROW_COLUMNS})")
    return out.select(pl.lit(int(class_index), dtype=pl.Int64).alias("class_index"), *ROW_COLUMNS)


def interleaved(cands: ClassCandidates, order: np.ndarray, ipc: int) -> pd.DataFrame:
    """Rows of the ranked candidates ``order`` in RDED's ``mix_images`` arrangement: tile ``t``
    of image ``i`` is the ``(t * IPC + i)``-th best crop, so every image gets one crop of each
    score band (one tile per image at one tile per image)."""
    if cands.boxes is None or cands.score is None:
        raise ValueError(f"class {cands.class_name!r}: interleaved rows need candidate boxes and scores")
    order = np.asarray(order, np.int64)
    pos = np.arange(len(order))
    return rows(pos % ipc, pos // ipc, cands.source_id[order], cands.boxes[order], cands.score[order])


def full_boxes(n: int, size: int) -> np.ndarray:
    """``n`` whole-image boxes at working size ``size``."""
    return np.tile(np.array([[0, 0, size, size]], np.int32), (n, 1))
