"""The Dagster UI in a real (headless) Chromium: `dd-assets ui` serves the repo's workspace on
loopback, the asset graph shows the pipeline's groups and method chains, a materialization
launched from the UI succeeds, and the server stops cleanly by its own PID.

Skipped where no system Chromium or Python playwright is installed; `.ci/run` installs
Debian's chromium so that CI runs it.  Screenshots go to ``test-artifacts/ui/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dd_assets.config import PROJECT_ROOT
from tests.conftest import write_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = PROJECT_ROOT / "test-artifacts" / "ui"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (Debian package 'chromium')"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"dagster dev exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the UI did not answer on {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM to the server's own PID (Dagster handles it like SIGINT: it shuts down its
    webserver and daemon children); the process group is killed only as a last resort."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:  # 120 s: on a 2-core machine with another job running, shutdown once took > 60 s
            return proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError("dagster dev ignored SIGTERM for 120 s and had to be killed") from None
    return proc.returncode


def _dismiss_modal(page) -> None:
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.first.click()


@pytest.fixture
def ui_server(tmp_path):
    raw = tmp_path / "raw"
    params = write_params(tmp_path, "tiny", raw_root=raw)
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = dict(os.environ, DD_ASSETS_PARAMS=str(params), DD_ASSETS_DATA_ROOT=str(tmp_path / "artifacts"),
               DAGSTER_HOME=str(home), OMP_NUM_THREADS="1")
    env.pop("DD_ASSETS_PROFILE", None)
    port = _free_port()
    log = tmp_path / "ui.log"
    cli = Path(sys.executable).with_name("dd-assets")
    with open(log, "w") as out:
        # A session of its own: the server's children never inherit the test's signal state.
        proc = subprocess.Popen([str(cli), "ui", "--port", str(port)], env=env, cwd=PROJECT_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_up(f"http://127.0.0.1:{port}/server_info", proc, log)
        yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "home": home, "log": log, "raw": raw,
               "params": str(params), "root": str(tmp_path / "artifacts")}
    finally:
        rc = _stop(proc)
    assert rc == 0, f"dagster dev exit status {rc}:\n{log.read_text()[-3000:]}"


def _ready_stale(ui_server, instance) -> set:
    """(asset, partition) the CLI's resolver says are stale or missing and can run now."""
    from dd_assets.config import load_params
    from dd_assets.definitions import build_definitions
    from dd_assets.staleness import find_stale, ready

    saved = {k: os.environ.get(k) for k in ("DD_ASSETS_PARAMS", "DD_ASSETS_DATA_ROOT", "DD_ASSETS_PROFILE")}
    os.environ.update(DD_ASSETS_PARAMS=ui_server["params"], DD_ASSETS_DATA_ROOT=ui_server["root"])
    os.environ.pop("DD_ASSETS_PROFILE", None)
    try:
        defs = build_definitions(load_params())
        return {(e.asset, e.partition) for e in ready(defs, find_stale(defs, instance))}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def test_asset_graph_and_materialize_from_the_ui(ui_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (test extra)")
    import dagster as dg

    SHOTS.mkdir(parents=True, exist_ok=True)
    url = ui_server["url"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)

        # 1. the asset graph lists the pipeline's groups (stages), each method's chain in them
        page.goto(f"{url}/asset-groups", wait_until="networkidle")
        _dismiss_modal(page)
        for group in ("data", "models", "scoring", "selection", "composition", "labels", "students", "reports"):
            sync_api.expect(page.get_by_text(group, exact=True).first).to_be_visible()
        page.screenshot(path=str(SHOTS / "asset_graph.png"))
        for method in ("random", "rded", "herding", "kmeans", "focusdc", "nrr"):
            # each method's chain: its selection asset's page names its group and what follows it
            page.goto(f"{url}/assets/{method}_selection", wait_until="networkidle")
            _dismiss_modal(page)
            body = page.inner_text("body")
            assert "selection" in body and f"{method}_distilled" in body, f"{method} chain missing from the UI"

        # 2. materialize raw_images from its asset page
        page.goto(f"{url}/assets/raw_images", wait_until="networkidle")
        _dismiss_modal(page)
        page.locator("button", has_text="Materialize").first.click()
        deadline = time.time() + 240
        instance = dg.DagsterInstance.from_config(str(ui_server["home"]))
        event = None
        while time.time() < deadline and event is None:
            event = instance.get_latest_materialization_event(dg.AssetKey("raw_images"))
            time.sleep(2)
        assert event is not None, f"no materialization of raw_images within 240 s:\n{ui_server['log'].read_text()[-3000:]}"
        run = instance.get_run_by_id(event.run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS or run.status == dg.DagsterRunStatus.STARTED
        # the asset page shows it as materialized, with the run's metadata
        page.goto(f"{url}/assets/raw_images", wait_until="networkidle")
        _dismiss_modal(page)
        sync_api.expect(page.get_by_text("Never materialized")).to_have_count(0)
        page.screenshot(path=str(SHOTS / "raw_images_materialized.png"))

        # 3. what is stale, in the UI: the stale sensor's preview lists exactly the runs the CLI's
        #    resolver says can run now, and applying it launches exactly those (issue 17)
        expected = _ready_stale(ui_server, instance)
        assert expected, "nothing stale after raw_images: the check below would prove nothing"
        page.goto(f"{url}/locations/dd_assets.definitions/sensors/stale_sensor", wait_until="networkidle")
        _dismiss_modal(page)
        page.get_by_text("Preview tick result").first.click()
        page.get_by_role("button", name="Continue").first.click()
        sync_api.expect(page.get_by_text(f"{len(expected)} run requests")).to_be_visible(timeout=180_000)
        page.screenshot(path=str(SHOTS / "stale_sensor_preview.png"))
        page.get_by_role("button", name="Apply requests & commit tick result").click()
        launched: set = set()
        deadline = time.time() + 180
        while time.time() < deadline and len(launched) < len(expected):
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dd_assets/launched_by": "stale_sensor"}))
            launched = {(next(iter(r.asset_selection)).to_user_string(), r.tags.get("dagster/partition")) for r in runs}
            time.sleep(2)
        assert launched == expected
        browser.close()
    assert (SHOTS / "asset_graph.png").stat().st_size > 10_000
    # the run really exported the bundled MNIST sample as an ImageFolder, one folder per class
    classes = sorted(p.name for p in ui_server["raw"].iterdir() if p.is_dir())
    assert classes == [str(d) for d in range(10)]
