"""The report's summary on constructed tables: mean ± population std over seeds, the random
row as the reference of ``vs random``, and the chain wall of an entry counting only its own
per-IPC assets (not those of entries that extend its name, e.g. ``udd`` vs ``udd_dc``)."""

from __future__ import annotations

import pandas as pd
import pytest

from dd_assets.report import chain_assets, summarize


def _students(method: str, ipc: int, accs: list[float], label_mode: str = "fkd") -> list[dict]:
    return [dict(method=method, ipc=ipc, seed=s, student="convnet_d3", epochs=150, label_mode=label_mode,
                 best_epoch=149, val_acc=a, test_acc=a, n_images=10 * ipc, label_bytes=6000 * ipc)
            for s, a in enumerate(accs)]


def test_summary_chain_wall_counts_only_the_entrys_own_assets():
    students = pd.DataFrame(_students("random", 10, [0.30, 0.32, 0.34]) + _students("udd", 10, [0.31, 0.33, 0.35])
                            + _students("udd_dc", 10, [0.40, 0.40, 0.40])
                            + _students("focusdc+dft", 10, [0.2, 0.2, 0.2], label_mode="online"))
    t = [("udd_distilled", "10", 100.0), ("udd_soft_labels", "10", 10.0), ("udd_students", "10", 1.0),
         ("udd_dc_distilled", "10", 5000.0), ("udd_dc_students", "10", 7000.0),   # a longer name: not udd's
         ("udd_students", "1", 3000.0),                                            # another IPC
         ("random_selection", "10", 2.0), ("random_students", "10", 4.0), ("random_distilled", "10", 8.0),
         ("focusdc_students", "10", 900.0), ("focusdc_dft_students", "10", 30.0), ("expert_trajectories", "", 1e6)]
    timings = pd.DataFrame([dict(asset=a, partition=p, seconds=s, run_id="r") for a, p, s in t])
    out = summarize(students, 0.8, timings).set_index("method")
    assert out.loc["udd", "chain_seconds"] == pytest.approx(111.0)
    assert out.loc["udd_dc", "chain_seconds"] == pytest.approx(12000.0)
    assert out.loc["random", "chain_seconds"] == pytest.approx(14.0)
    assert out.loc["focusdc+dft", "chain_seconds"] == pytest.approx(30.0)
    assert out.loc["udd", "acc_mean"] == pytest.approx(0.33)
    assert out.loc["udd", "acc_std"] == pytest.approx((2 * 0.02 ** 2 / 3) ** 0.5)  # population std
    assert out.loc["udd", "vs_random"] == pytest.approx(0.01)
    assert out.loc["udd", "recovery"] == pytest.approx(0.33 / 0.8)


def test_chain_assets_names():
    assert chain_assets("nrr_dbr") == {"nrr_dbr_selection", "nrr_dbr_distilled", "nrr_dbr_soft_labels",
                                       "nrr_dbr_students"}
    assert chain_assets("focusdc+dft") == {"focusdc_dft_students"}


def test_accuracy_plot_legend_gets_a_column_per_16_methods():
    """The legend sits right of the axes (it covered the curves with 20 methods): the picture
    widens by one legend column per 16 methods, and every method has its own colour/marker."""
    import io

    from PIL import Image

    from dd_assets.report import plot_png

    def picture(n: int) -> Image.Image:
        rows = [dict(method=f"m{i:02d}", ipc=ipc, acc_mean=0.1 + 0.01 * i, acc_std=0.01) for i in range(n) for ipc in (1, 10)]
        return Image.open(io.BytesIO(plot_png(pd.DataFrame(rows), "constructed")))

    w3, w20, w40 = picture(3).size[0], picture(20).size[0], picture(40).size[0]
    assert w3 < w20 < w40 and w20 - w3 == pytest.approx(180, abs=2) and w40 - w20 == pytest.approx(180, abs=2)


def test_look_first_links_each_methods_largest_grid_then_one_picture_per_mechanism_folder():
    from dd_assets.report import first_pictures, markdown

    paths = ["accuracy_vs_ipc.png", "grids/rded/ipc=1.png", "grids/rded/ipc=10.png", "grids/random/ipc=1.png",
             "grids/nrr/ipc=10.png", "overlays/cam_maps/c0003.png", "overlays/cam_maps/c0001.png",
             "clusters/ddps_clusters/c0000.png", "histograms/rded_scores/c0000.png", "curves/teacher/loss.png"]
    got = first_pictures(paths, ["random", "rded", "nrr", "herding"], [1, 10])
    assert [rel for _, rel in got] == [
        "grids/random/ipc=1.png",          # the largest IPC present (no ipc=10 grid for random)
        "grids/rded/ipc=10.png", "grids/nrr/ipc=10.png",   # methods order; herding has none
        "overlays/cam_maps/c0001.png",     # the first class of the folder, not the first listed
        "clusters/ddps_clusters/c0000.png", "curves/teacher/loss.png"]   # histograms are not mechanism pictures
    assert got[1][0] == "`rded` distilled images, IPC 10"
    summary = pd.DataFrame({"method": ["random"], "ipc": [1], "student": ["convnet_d3"], "epochs": [5],
                            "label_mode": ["fkd"], "acc_mean": [0.5], "acc_std": [0.01], "seeds": [3],
                            "recovery": [0.6], "label_bytes": [10]})
    md = markdown(summary, {"arch": "convnet_d3", "val_acc": 0.9, "test_acc": 0.9}, pd.DataFrame(), "d", None, got)
    assert "## Look first" in md and "- [`rded` distilled images, IPC 10](grids/rded/ipc=10.png)" in md
    assert "## Look first" not in markdown(summary, {"arch": "a", "val_acc": 0.9, "test_acc": 0.9}, pd.DataFrame(), "d")
