"""``dask worker --preload`` of tests/test_dask_executor.py: RDED's per-class scoring sleeps
first (``DD_TEST_STEP_DELAY`` seconds), so the test can kill a worker while one of its steps
is surely running. Only the workers of that test load it."""

import os
import time


def dask_setup(worker) -> None:
    import dd_assets.methods.rded.crops as crops

    original = crops.score_class
    delay = float(os.environ.get("DD_TEST_STEP_DELAY", "8"))

    def slow_score_class(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)

    crops.score_class = slow_score_class
