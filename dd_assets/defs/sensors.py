"""Sensors the Dagster daemon (``dagster dev`` runs one) evaluates.

``orphaned_runs_sensor``: every minute, runs the instance believes in flight whose process is
gone (``kill -9``, out of memory) are marked failed -- freeing their slot in the run queue --
and their MLflow runs KILLED (:func:`dd_assets.run_guard.reap_orphans`).  Dagster's run
monitoring cannot do this for the default run launcher (no worker health check).
"""

from __future__ import annotations

import dagster as dg

from dd_assets.config import Params


def build(params: Params) -> list[dg.SensorDefinition]:
    data_root = params.data_root

    @dg.sensor(name="orphaned_runs_sensor", minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Marks runs whose process died (kill -9, OOM) failed and their MLflow runs KILLED.")
    def orphaned_runs_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        from dd_assets.run_guard import reap_orphans
        from dd_assets.storage import DataRoot
        from dd_assets.tracking import tracking_uri

        try:
            uri = tracking_uri(DataRoot(data_root))
        except RuntimeError:
            uri = None
        reaped = reap_orphans(context.instance, uri)
        return dg.SkipReason(f"marked {len(reaped)} orphaned run(s) failed: {', '.join(reaped)}" if reaped
                             else "no orphaned runs")

    return [orphaned_runs_sensor]
