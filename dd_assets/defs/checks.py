"""Dagster asset checks (the UI's *Checks* tab): each reads what its asset stored (never
recomputes it) and passes or fails with a one-line description naming the artifact.

| check | asset | fails when |
| --- | --- | --- |
| ``teacher_class_map_matches_manifest`` | ``teacher`` | the checkpoint's class names (in order) differ from the manifest's (class index -> name): the most common RDED reproduction failure |
| ``teacher_val_above_floor`` | ``teacher`` | stored val accuracy < ``TEACHER_VAL_FLOOR_X_CHANCE`` x chance (1.5 / classes); severity WARN |
| ``selection_row_count`` | ``<entry>_selection`` | rows != IPC x classes x tiles per image (per class: IPC x tiles) |
| ``soft_labels_finite`` | ``<entry>_soft_labels`` | any stored floating array holds NaN or inf |
| ``distilled_images_valid`` | ``<entry>_distilled`` | images not uint8 ``[IPC x classes, 3, S, S]``, or labels not exactly IPC per class |
| ``students_above_chance`` | ``<entry>_students`` | mean test accuracy of the main students <= 1 / classes |

IPC-partitioned assets: a check run inside a partitioned run (materializing ``rded_selection[10]``
in the UI) checks that partition; a check run on its own (the Checks tab's "Execute") checks
every IPC partition stored under the data root and names the ones that fail.

The pure ``check_*`` functions take a :class:`DataRoot` and plain values, so tests call them
on constructed artifacts; a missing artifact is a failed check naming the file, never an
exception that fails the run.
"""

# no ``from __future__ import annotations``: Dagster reads the resource annotation (``dd: DDResource``)
from collections.abc import Callable, Sequence

import dagster as dg
import numpy as np

from dd_assets.config import Params
from dd_assets.defs.partitions import build_partitions
from dd_assets.defs.resources import DDResource
from dd_assets.storage import DataRoot, layout

TEACHER_VAL_FLOOR_X_CHANCE = 1.5  # teacher val accuracy must reach 1.5 x chance (1.5 / classes)

Result = dg.AssetCheckResult


def _fail(description: str, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR, **metadata) -> Result:
    return Result(passed=False, severity=severity, description=description, metadata=metadata)


def _pass(description: str, **metadata) -> Result:
    return Result(passed=True, description=description, metadata=metadata)


# -- teacher ---------------------------------------------------------------------------------

def read_checkpoint_meta(root: DataRoot, name: str = "teacher") -> dict:
    """A model checkpoint's metadata (``class_names``, ``num_classes``, ``extra``, ...) without
    building the model."""
    import io

    import torch

    rel = layout.model_checkpoint(name)
    if not root.exists(rel):
        raise FileNotFoundError(f"{name} checkpoint {root.url(rel)} is missing; materialize the '{name}' asset")
    obj = torch.load(io.BytesIO(root.read_bytes(rel)), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "class_names" not in obj:
        raise ValueError(f"{root.url(rel)} is not a dd_assets checkpoint (no class_names)")
    return {k: v for k, v in obj.items() if k != "state_dict"}


def manifest_class_names(root: DataRoot, n_classes: int) -> list[str]:
    """Class index -> class name as the stored manifest partitions record them."""
    from dd_assets.storage.tables import read_table_pl

    names = []
    for i in range(n_classes):
        df = read_table_pl(root, layout.manifest(i), columns=["class_name", "class_index"])
        found = sorted({str(c) for c in df["class_name"]}) if df.height else []
        idx = sorted({int(c) for c in df["class_index"]}) if df.height else []
        if len(found) != 1 or idx != [i]:
            raise ValueError(f"manifest {root.url(layout.manifest(i))} should hold class index {i} with one name; "
                             f"has indexes {idx} and names {found}")
        names.append(found[0])
    return names


def check_teacher_class_map(root: DataRoot, n_classes: int) -> Result:
    """The teacher checkpoint's class names, in order, equal the manifest's class names."""
    try:
        meta = read_checkpoint_meta(root)
        want = manifest_class_names(root, n_classes)
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    have = [str(c) for c in meta["class_names"]]
    ckpt = root.url(layout.TEACHER_CHECKPOINT)
    if have == want:
        return _pass(f"{ckpt}: {len(have)} classes in manifest order", classes=len(have))
    if sorted(have) == sorted(want):
        diff = [f"{i}: {h!r} vs {w!r}" for i, (h, w) in enumerate(zip(have, want, strict=True)) if h != w]
        return _fail(f"{ckpt}: class order differs from the manifest (index: checkpoint vs manifest) "
                     f"{'; '.join(diff[:5])}; retrain the teacher or fix its class map",
                     checkpoint_classes=str(have), manifest_classes=str(want))
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    return _fail(f"{ckpt}: class map differs from the manifest ({len(have)} vs {len(want)} classes; "
                 f"missing {missing[:5]}, unknown {extra[:5]}); retrain the teacher or fix data.classes",
                 checkpoint_classes=str(have), manifest_classes=str(want))


def check_teacher_val(root: DataRoot, n_classes: int, factor: float = TEACHER_VAL_FLOOR_X_CHANCE) -> Result:
    """Stored teacher val accuracy >= ``factor`` / classes (severity WARN: a weak teacher
    still produces artifacts, but every method built on it measures it, not the method)."""
    import json

    floor = min(1.0, factor / max(n_classes, 1))
    rel = layout.TEACHER_METRICS
    try:
        val = float(json.loads(root.read_bytes(rel))["val_acc"])
    except FileNotFoundError:
        return _fail(f"teacher metrics {root.url(rel)} are missing; materialize the 'teacher' asset")
    except (KeyError, ValueError, TypeError) as err:
        return _fail(f"teacher metrics {root.url(rel)} have no readable val_acc ({err})")
    meta = {"val_acc": val, "floor": floor, "chance": 1.0 / max(n_classes, 1)}
    if np.isfinite(val) and val >= floor:
        return _pass(f"teacher val accuracy {val:.4f} >= floor {floor:.4f} ({factor} x chance)", **meta)
    return _fail(f"teacher val accuracy {val:.4f} is below the floor {floor:.4f} ({factor} x chance, "
                 f"{n_classes} classes) in {root.url(rel)}; raise teacher.epochs or check the data",
                 dg.AssetCheckSeverity.WARN, **meta)


# -- IPC-partitioned chain assets -------------------------------------------------------------

def check_selection(root: DataRoot, entry: str, ipc: int, n_classes: int, tiles_per_image: int) -> Result:
    """``<entry>_selection[ipc]``: IPC x tiles rows per class, IPC x classes x tiles in all."""
    from dd_assets.storage.tables import read_table_pl

    try:
        df = read_table_pl(root, layout.selection(entry, ipc), columns=["class_index"])
    except FileNotFoundError as err:
        return _fail(str(err))
    want_class, want = ipc * tiles_per_image, ipc * n_classes * tiles_per_image
    counts = dict(df["class_index"].value_counts().iter_rows()) if len(df) else {}
    bad = {c: int(counts.get(c, 0)) for c in range(n_classes) if int(counts.get(c, 0)) != want_class}
    stray = sorted(int(c) for c in counts if not 0 <= int(c) < n_classes)
    meta = {"rows": len(df), "expected_rows": want, "tiles_per_image": tiles_per_image}
    if len(df) == want and not bad and not stray:
        return _pass(f"{len(df)} rows = IPC {ipc} x {n_classes} classes x {tiles_per_image} tiles", **meta)
    detail = "; ".join(f"class {c}: {n} rows" for c, n in list(bad.items())[:5])
    return _fail(f"{root.url(layout.selection(entry, ipc))}: {len(df)} rows, expected {want} = IPC {ipc} x "
                 f"{n_classes} classes x {tiles_per_image} tiles ({want_class} per class)"
                 + (f"; {detail}" if detail else "") + (f"; unknown class indexes {stray}" if stray else ""), **meta)


def check_soft_labels(root: DataRoot, entry: str, ipc: int) -> Result:
    """``<entry>_soft_labels[ipc]``: every floating array stored is finite."""
    from dd_assets.storage.arrays import read_group

    rel = layout.soft_labels(entry, ipc)
    try:
        arrays, attrs = read_group(root, rel)
    except FileNotFoundError as err:
        return _fail(str(err))
    bad = {}
    for name, arr in arrays.items():
        if np.issubdtype(arr.dtype, np.floating):
            n = int((~np.isfinite(arr.astype(np.float32))).sum())
            if n:
                bad[name] = n
    if not bad:
        return _pass(f"all label arrays finite (mode {attrs.get('mode', '?')})", arrays=len(arrays))
    return _fail(f"{root.url(rel)}: non-finite values in " + ", ".join(f"{k} ({v})" for k, v in bad.items())
                 + "; re-materialize the labels (a NaN teacher or distilled image?)",
                 non_finite=str(bad))


def check_distilled(root: DataRoot, entry: str, ipc: int, n_classes: int, image_size: int) -> Result:
    """``<entry>_distilled[ipc]``: uint8 ``[IPC x classes, 3, S, S]`` images, labels IPC per class."""
    from dd_assets.storage.arrays import open_group

    rel = layout.distilled(entry, ipc)
    try:
        group = open_group(root, rel)
        images, labels = group["images"], np.asarray(group["labels"][...])
    except (FileNotFoundError, KeyError) as err:
        return _fail(f"{root.url(rel)}: {err}" if isinstance(err, KeyError) else str(err))
    problems = []
    n = ipc * n_classes
    want_shape = (n, 3, image_size, image_size)
    if str(images.dtype) != "uint8":
        problems.append(f"images are {images.dtype}, not uint8")
        arr = np.asarray(images[...])
        if arr.size and (not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255):
            problems.append(f"values outside 0..255 (min {np.nanmin(arr)}, max {np.nanmax(arr)})")
    if tuple(images.shape) != want_shape:
        problems.append(f"images shape {tuple(images.shape)}, expected {want_shape} (IPC {ipc} x {n_classes} classes)")
    if labels.shape != (len(labels),) or len(labels) != images.shape[0]:
        problems.append(f"{len(labels)} labels for {images.shape[0]} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        problems.append(f"labels outside 0..{n_classes - 1}")
    else:
        counts = np.bincount(labels.astype(np.int64), minlength=n_classes) if len(labels) else np.zeros(n_classes, int)
        off = {c: int(k) for c, k in enumerate(counts) if k != ipc}
        if off:
            problems.append("labels not balanced: " + ", ".join(f"class {c} has {k}" for c, k in list(off.items())[:5])
                            + f" (expected {ipc} each)")
    meta = {"images": int(images.shape[0]), "dtype": str(images.dtype), "shape": str(tuple(images.shape))}
    if not problems:
        return _pass(f"{n} uint8 images {want_shape[1:]}, {ipc} per class", **meta)
    return _fail(f"{root.url(rel)}: " + "; ".join(problems), **meta)


def check_students(root: DataRoot, entry: str, ipc: int, n_classes: int, epochs: int | None = None) -> Result:
    """``<entry>_students[ipc]``: mean test accuracy of the main students (soft-label rows at the
    main budget ``epochs``) above chance, 1 / classes."""
    import polars as pl

    from dd_assets.storage.tables import read_table_pl

    rel = layout.students(entry, ipc)
    try:
        df = read_table_pl(root, rel)
    except FileNotFoundError as err:
        return _fail(str(err))
    main = df.filter(pl.col("label_mode").ne_missing("hard")) if "label_mode" in df.columns else df
    if epochs is not None and "epochs" in main.columns and (main["epochs"] == int(epochs)).any():
        main = main.filter(pl.col("epochs") == int(epochs))
    chance = 1.0 / max(n_classes, 1)
    if not len(main):
        return _fail(f"{root.url(rel)}: no student rows")
    mean = main["test_acc"].cast(pl.Float64).fill_nan(None).mean()   # pandas' mean: missing values skipped
    acc = float("nan") if mean is None else float(mean)
    meta = {"test_acc_mean": acc, "chance": chance, "students": len(main)}
    if np.isfinite(acc) and acc > chance:
        return _pass(f"mean test accuracy {acc:.4f} > chance {chance:.4f} ({len(main)} students)", **meta)
    return _fail(f"{root.url(rel)}: mean test accuracy {acc:.4f} of {len(main)} students is not above chance "
                 f"{chance:.4f} ({n_classes} classes); the distilled set or its labels carry no signal", **meta)


# -- per-partition aggregation and the Dagster definitions ---------------------------------

def _partitions(context, stored: Callable[[int], bool], ipcs: Sequence[int]) -> list[int]:
    """The IPC of this run's partition, else every IPC with a stored artifact."""
    if context.has_partition_key:
        return [int(context.partition_key)]
    return [i for i in ipcs if stored(i)]


def combine(results: dict[int, Result], what: str) -> Result:
    """One result over IPC partitions: passes when every partition passes; names those that fail."""
    if not results:
        return _fail(f"no stored {what} partition to check; materialize it first", dg.AssetCheckSeverity.WARN)
    if len(results) == 1:
        ipc, res = next(iter(results.items()))
        return Result(passed=res.passed, severity=res.severity, metadata={"ipc": ipc, **res.metadata},
                      description=f"IPC {ipc}: {res.description}")
    failed = {i: r for i, r in results.items() if not r.passed}
    severity = (dg.AssetCheckSeverity.ERROR if any(r.severity == dg.AssetCheckSeverity.ERROR for r in failed.values())
                else dg.AssetCheckSeverity.WARN)
    lines = [f"IPC {i}: {'ok' if r.passed else 'FAIL'} {r.description}" for i, r in results.items()]
    return Result(passed=not failed, severity=severity, description="\n".join(lines),
                  metadata={"ipcs": str(list(results)), "failed_ipcs": str(list(failed))})


def _guarded(fn: Callable[[], Result], what: str) -> Result:
    """An unexpected error is a failed check with one line, not a failed run."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 -- a check reports, it never takes the run down
        first = (str(err).strip().splitlines() or [""])[0]
        return _fail(f"{what}: {type(err).__name__}: {first}")


def build(params: Params, assets: Sequence[dg.AssetsDefinition]) -> list[dg.AssetChecksDefinition]:
    """The checks of every asset in ``assets`` that has one (the teacher, and each entry's
    selection, distilled images, soft labels and students)."""
    from dd_assets.methods.entries import base_method, method_params, tiles_per_side

    keys = {k.to_user_string() for a in assets for k in a.keys}
    n_classes = len(build_partitions(params).classes)
    ipcs = [int(i) for i in params.ipcs]
    size = int(params.block("data")["image_size"])
    epochs = int(params.block("student")["epochs"])
    methods = params.block("methods")
    checks: list[dg.AssetChecksDefinition] = []

    if "teacher" in keys:
        @dg.asset_check(asset="teacher", name="teacher_class_map_matches_manifest",
                        description="The teacher checkpoint's class names, in order, equal the manifest's "
                                    "(class index -> name); a mismatch silently mislabels every soft label.")
        def teacher_class_map(context: dg.AssetCheckExecutionContext, dd: DDResource) -> Result:
            return _guarded(lambda: check_teacher_class_map(dd.root(), n_classes), "teacher class map")

        @dg.asset_check(asset="teacher", name="teacher_val_above_floor",
                        description=f"Stored teacher val accuracy >= {TEACHER_VAL_FLOOR_X_CHANCE} x chance "
                                    "(WARN below: students then measure the teacher, not the method).")
        def teacher_val(context: dg.AssetCheckExecutionContext, dd: DDResource) -> Result:
            return _guarded(lambda: check_teacher_val(dd.root(), n_classes), "teacher val accuracy")

        checks += [teacher_class_map, teacher_val]

    for entry in methods:
        spec_name = base_method(entry, methods[entry])
        mp = method_params(entry, methods[entry])
        checks += _entry_checks(entry, spec_name, mp, keys, n_classes, ipcs, size, epochs, tiles_per_side)
    return checks


def _per_ipc(what: str, rel: Callable[[int], str], ipcs: list[int],
             one: Callable[[DataRoot, int], Result]) -> Callable:
    def run(context: dg.AssetCheckExecutionContext, dd: DDResource) -> Result:
        def body() -> Result:
            root = dd.root()
            chosen = _partitions(context, lambda i: root.exists(rel(i)), ipcs)
            return combine({i: one(root, i) for i in chosen}, what)

        return _guarded(body, what)

    return run


def _entry_checks(entry, spec_name, mp, keys, n_classes, ipcs, size, epochs, tiles_per_side):
    out = []

    def add(asset: str, name: str, description: str, rel, one) -> None:
        if asset in keys:
            out.append(dg.asset_check(asset=asset, name=name, description=description)(
                _per_ipc(asset, rel, ipcs, one)))

    def tiles(ipc: int) -> int:
        return tiles_per_side(spec_name, mp, ipc, size) ** 2

    add(f"{entry}_selection", "selection_row_count",
        "Rows = IPC x classes x tiles per image (and IPC x tiles for every class).",
        lambda i: layout.selection(entry, i),
        lambda root, i: check_selection(root, entry, i, n_classes, tiles(i)))
    add(f"{entry}_distilled", "distilled_images_valid",
        "uint8 images [IPC x classes, 3, S, S] and exactly IPC labels per class.",
        lambda i: layout.distilled(entry, i),
        lambda root, i: check_distilled(root, entry, i, n_classes, size))
    add(f"{entry}_soft_labels", "soft_labels_finite", "Every stored label array is finite (no NaN / inf).",
        lambda i: layout.soft_labels(entry, i),
        lambda root, i: check_soft_labels(root, entry, i))
    add(f"{entry}_students", "students_above_chance", "Mean test accuracy of the main students > 1 / classes.",
        lambda i: layout.students(entry, i),
        lambda root, i: check_students(root, entry, i, n_classes, epochs))
    return out
