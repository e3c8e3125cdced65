"""Run-failure summaries carry the original cause (the user-code exception's first line, the
asset and the partition), not Dagster's "Error occurred while executing op" wrapper."""

from __future__ import annotations

from types import SimpleNamespace

import dagster as dg
import pytest

from dd_assets import local_backfill
from dd_assets.orchestrate import RunFailures, failure_summary


def _defs():
    parts = dg.StaticPartitionsDefinition(["a", "b"])

    @dg.asset
    def upstream():
        return 1

    @dg.asset(deps=[upstream], partitions_def=parts)
    def per_class(context):
        if context.partition_key == "b":
            try:
                raise KeyError("pixel 3")
            except KeyError as err:
                raise ValueError("image b/003.png is unreadable\nsecond line of detail") from err
        return 1

    @dg.asset(deps=[upstream])
    def refuses():
        raise dg.Failure(description="data.root /nope does not exist: put an ImageFolder there\nmore")

    @dg.asset(deps=[refuses])
    def after_refusal():
        return 1

    return dg.Definitions(assets=[upstream, per_class, refuses, after_refusal], executor=dg.in_process_executor)


def test_cli_failure_summary_names_asset_partition_and_cause(tmp_path):
    defs = _defs()
    keys = [dg.AssetKey(n) for n in ("upstream", "per_class", "refuses", "after_refusal")]
    with pytest.raises(RunFailures) as info:
        local_backfill.materialize(defs, keys, tmp_path / "home")
    text = str(info.value)
    assert "Error occurred while executing op" not in text, text
    assert "per_class[b]: ValueError: image b/003.png is unreadable <- KeyError: 'pixel 3'" in text, text
    assert "second line" not in text
    assert "refuses[-]: data.root /nope does not exist: put an ImageFolder there" in text, text
    assert "per_class[a]" not in text  # the partition that worked is not reported
    assert "skipped downstream of a failure: after_refusal[-]" in text


def _err(message, cls, cause=None):
    return SimpleNamespace(message=message, cls_name=cls, cause=cause)


def test_failure_summary_of_constructed_events():
    wrapped = _err('dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while executing op "teacher":\n',
                   "DagsterExecutionStepExecutionError", _err("RuntimeError: CUDA out of memory\nTried to allocate", "RuntimeError"))
    step = SimpleNamespace(is_step_failure=True, is_run_failure=False, step_key="teacher",
                           step_failure_data=SimpleNamespace(error=wrapped, user_failure_data=None))
    failure = SimpleNamespace(is_step_failure=True, is_run_failure=False, step_key="manifest",
                              step_failure_data=SimpleNamespace(
                                  error=_err("dagster._core.definitions.events.Failure: x\n", "Failure"),
                                  user_failure_data=SimpleNamespace(description="class 'cat' has no readable images")))
    other = SimpleNamespace(is_step_failure=False, is_run_failure=False)
    assert failure_summary([other, step]) == ["RuntimeError: CUDA out of memory"]
    assert failure_summary([step, failure], ["teacher", "manifest"]) == [
        "teacher: RuntimeError: CUDA out of memory", "manifest: class 'cat' has no readable images"]
    # a run that failed outside any step (resource init, config): the run failure's own error
    run = SimpleNamespace(is_step_failure=False, is_run_failure=True, message="run failed",
                          event_specific_data=SimpleNamespace(error=_err(
                              "dagster._core.errors.DagsterResourceFunctionError: Error executing resource_fn\n",
                              "DagsterResourceFunctionError", _err("PermissionError: data root /x is not writable\n", "PermissionError"))))
    assert failure_summary([run]) == ["PermissionError: data root /x is not writable"]
    assert failure_summary([]) == ["run failed (see the Dagster UI)"]


def test_backfill_run_failure_keeps_its_cause():
    """A backfill run whose process could not load the code: no step failed, the run failure
    only says "marked as failed"; the engine event's error is the cause reported."""
    from dd_assets.backfill import failure_cause

    engine = SimpleNamespace(is_step_failure=False, is_run_failure=False, event_type_value="ENGINE_EVENT",
                             event_specific_data=SimpleNamespace(error=_err(
                                 "dagster._core.errors.DagsterImportError: Encountered ImportError while importing\n",
                                 "DagsterImportError", _err("ImportError: cannot import name 'to_csv'\n", "ImportError"))))
    marked = SimpleNamespace(is_step_failure=False, is_run_failure=True, event_type_value="PIPELINE_FAILURE",
                             message="This run has been marked as failed from outside the execution context.",
                             event_specific_data=SimpleNamespace(error=None))
    cause = failure_cause([engine, marked])
    assert "ImportError: cannot import name 'to_csv'" in cause
    assert failure_cause([marked]) == "This run has been marked as failed from outside the execution context."
