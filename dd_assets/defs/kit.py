"""The asset kit: what every dd_assets asset does around its own work, in one place.

``@dd_asset(params, name=..., family=..., blocks=[...], ...)`` builds a Dagster asset whose
body is ``fn(run) -> (data_version, metadata)``. The kit

* sets the code version from the params blocks the asset hashes (or a ``version`` function),
* refuses to run when params.yaml changed since the definitions were loaded,
* times the body and stores the wall time for the report,
* gives the body its current params, data root, device, partition and helpers for upstream
  data versions and provenance,
* turns a ``ValueError`` of the maths (bad input, an IPC a class cannot fill) into a one-line
  ``dg.Failure`` naming the asset and partition,
* returns the ``MaterializeResult`` with the data version and ``wall_seconds``.
"""


from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from dd_assets.config import Params, load_params
from dd_assets.defs.common import code_version, partition_of, provenance, result, timed, upstream_versions
from dd_assets.defs.resources import DDResource
from dd_assets.storage import DataRoot


@dataclass
class Run:
    """What an asset body gets: the run's context, resource, current params and root."""

    context: dg.AssetExecutionContext
    dd: DDResource
    params: Params
    root: DataRoot
    ups: dict[str, str] = field(default_factory=dict)

    @property
    def partition(self) -> str | None:
        return partition_of(self.context)

    @property
    def ipc(self) -> int:
        return int(self.context.partition_key)

    @property
    def log(self):
        return self.context.log

    def upstream(self, keys: list[tuple[str, str | None]]) -> dict[str, str]:
        """Record (and return) the data versions of the (asset, partition) pairs read."""
        self.ups.update(upstream_versions(self.context, keys))
        return self.ups

    def provenance(self, **extra: Any) -> dict[str, Any]:
        """What every artifact records about how it was made (+ ``extra``)."""
        return provenance(self.context, self.params, self.ups) | extra


def dd_asset(params: Params, *, name: str, family: str, blocks: list[str] | tuple[str, ...] = (),
             version: Callable[[Params], str] | None = None, **asset_kwargs: Any):
    """Decorator: ``fn(run) -> (data_version, metadata)`` as a Dagster asset (see module doc).

    ``family``: the ``MODULE_VERSIONS`` entry; ``blocks``: the params blocks hashed into the code
    version; ``version``: a function of the params computing the code version instead."""
    blocks = list(blocks)
    version_of = version or (lambda p: code_version(p, family, blocks))

    def deco(fn: Callable[[Run], tuple[str, dict[str, Any]]]) -> dg.AssetsDefinition:
        def _asset(context: dg.AssetExecutionContext, dd: DDResource) -> dg.MaterializeResult:
            current = load_params()
            expected = context.assets_def.code_versions_by_key.get(context.asset_key)
            try:
                now = version_of(current)
            except (KeyError, ValueError) as err:
                now = f"unavailable ({err})"
            if expected is not None and expected != now:
                raise dg.Failure(
                    f"params.yaml changed since the Dagster definitions were loaded ({name}: "
                    f"{', '.join(blocks) or 'its parameters'}); reload the code location "
                    "(UI: Deployment > Reload, or restart `dagster dev`)")
            root = dd.root()
            run = Run(context, dd, current, root)
            with timed(root, context) as tm:
                try:
                    digest, metadata = fn(run)
                except ValueError as err:
                    part = partition_of(context)
                    raise dg.Failure(f"{name}{f'[{part}]' if part else ''}: {err}") from err
            return result(digest, metadata, tm.get("seconds"))

        # the body's module and name, so tools that map an asset to its code (dvc_pipeline) find the body
        _asset.__doc__, _asset.__module__, _asset.__qualname__ = fn.__doc__, fn.__module__, fn.__qualname__
        return dg.asset(name=name, code_version=version_of(params), **asset_kwargs)(_asset)

    return deco
