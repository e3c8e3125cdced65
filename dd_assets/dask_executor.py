"""Steps of a Dagster run on a dask.distributed cluster (``DD_ASSETS_EXECUTOR=dask``).

Why dask (issue 20): the per-class fan-out is thousands of independent, seconds-to-minutes
steps; a dask scheduler places each on any worker of a lab's machines (``dask worker`` per
GPU, ``--resources GPU=1`` for placement), re-runs the tasks of a worker that dies, needs no
broker service (dagster-celery needs redis/RabbitMQ), and is what HPC labs already run under
SLURM/PBS (dask-jobqueue). dagster-dask provides the worker side (``query_on_dask_worker``:
load the job from its code pointer, execute one step against the shared instance).

Why not ``dagster_dask.dask_executor`` itself: it names each dask task ``<job>.<step>``. Every
run of a partitioned asset is a run of the same asset job with the same step key, and dask
treats equal keys as the *same* task, so two concurrent runs (two class partitions of one
backfill, ``run_queue.max_concurrent_runs`` > 1) would share one computation and one of the
partitions would silently get the other's events. Here the task key carries the run id.

Configuration (environment, read when the definitions load; the workers need the same
``DD_ASSETS_PROFILE``/``DD_ASSETS_DATA_ROOT``/``DAGSTER_HOME`` as the launcher):

* ``DD_ASSETS_DASK_SCHEDULER``: the scheduler, ``tcp://host:port`` or a scheduler file
  (``dask scheduler --scheduler-file``); required.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import dagster as dg

DASK_SCHEDULER_ENV = "DD_ASSETS_DASK_SCHEDULER"
RESOURCES_TAG = "dagster-dask/resource_requirements"   # dagster-dask's tag: dask resources a step needs


def scheduler_address() -> str:
    addr = os.environ.get(DASK_SCHEDULER_ENV, "").strip()
    if not addr:
        raise ValueError(f"DD_ASSETS_EXECUTOR=dask needs {DASK_SCHEDULER_ENV}: the dask scheduler's address "
                         "(tcp://host:8786) or its scheduler file (dask scheduler --scheduler-file PATH)")
    return addr


def task_key(run_id: str, step_key: str) -> str:
    """The dask task key of one step of one run (unique per run, see the module doc)."""
    return f"{run_id}.{step_key}"


def run_id_of(task: str) -> str:
    return task.split(".", 1)[0]


def run_step_on_worker(dependencies, recon_job, run_json: str, run_config, step_keys, instance_ref_json: str,
                       known_state_json: str | None) -> str:
    """The dask task: dagster-dask's worker side (load the job, execute the step against the
    instance) with the run, instance ref, known state and the returned events passed as
    Dagster's own serialized JSON: cloudpickle cannot carry Dagster 1.13's ``@record``
    objects (``Iteration is not allowed on @record RunOpConcurrency``)."""
    from dagster._serdes import deserialize_value, serialize_value
    from dagster_dask.executor import query_on_dask_worker

    events = query_on_dask_worker(
        dependencies, recon_job, deserialize_value(run_json), run_config, step_keys,
        deserialize_value(instance_ref_json), deserialize_value(known_state_json) if known_state_json else None)
    return serialize_value(list(events))


def _client(address: str):
    from dask.distributed import Client

    if os.path.exists(address):   # a scheduler file
        return Client(scheduler_file=address)   # the run's default client (as_completed needs one)
    return Client(address)


class RunScopedDaskExecutor(dg.Executor):
    """Submits every step of the run's plan to the dask scheduler as one task, dependencies as
    dask dependencies, and yields the events each worker returns. Dask re-runs a task whose
    worker died (``distributed.scheduler.allowed-failures``, default 3) on another worker; the
    step then runs again from its start (dd_assets' writes are atomic, so a half-written
    partition never stays)."""

    def __init__(self, address: str):
        self.address = address

    @property
    def retries(self):
        from dagster._core.execution.retries import RetryMode

        return RetryMode.DISABLED

    def execute(self, plan_context, execution_plan) -> Iterator[dg.DagsterEvent]:
        import json

        import dask.distributed
        from dagster._core.errors import raise_execution_interrupts
        from dagster._serdes import deserialize_value, serialize_value
        from dagster._utils import iterate_with_context

        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError("the dask executor needs a persistent instance (DAGSTER_HOME)")
        run = plan_context.dagster_run
        run_json, ref_json = serialize_value(run), serialize_value(plan_context.instance.get_ref())
        known = execution_plan.known_state
        known_json = serialize_value(known) if known is not None else None
        with _client(self.address) as client:
            futures: dict[str, object] = {}
            for level in execution_plan.get_steps_to_execute_by_level():
                for step in level:
                    deps = [futures[k] for inp in step.step_inputs for k in inp.dependency_keys]
                    futures[step.key] = client.submit(
                        run_step_on_worker, deps, plan_context.reconstructable_job, run_json,
                        dict(plan_context.run_config), [step.key], ref_json, known_json,
                        key=task_key(run.run_id, step.key), pure=False,
                        resources=json.loads(step.tags[RESOURCES_TAG]) if RESOURCES_TAG in step.tags else None,
                    )
            done = dask.distributed.as_completed(list(futures.values()), with_results=True)
            for _future, events_json in iterate_with_context(raise_execution_interrupts, done):
                yield from deserialize_value(events_json)


@dg.executor(name="dask", requirements=dg.multiple_process_executor_requirements())
def dask_executor(init_context) -> RunScopedDaskExecutor:
    return RunScopedDaskExecutor(scheduler_address())
