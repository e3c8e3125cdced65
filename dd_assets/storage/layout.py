"""Where each artifact lives below the data root (one place, used by assets, CLI and tests).

Partitioned artifacts get one file or Zarr group per partition, named by class index
(not class name, so non-ASCII or odd names never reach a path) or by IPC.
"""

from __future__ import annotations


def cls(class_index: int) -> str:
    return f"class={int(class_index):04d}"


def manifest(class_index: int) -> str:
    return f"manifest/{cls(class_index)}.parquet"


MANIFEST_GLOB = "manifest/*.parquet"


def model_checkpoint(name: str) -> str:
    return f"models/{name}/checkpoint.pt"


def model_metrics(name: str) -> str:
    return f"models/{name}/metrics.json"


TEACHER_CHECKPOINT = model_checkpoint("teacher")
TEACHER_METRICS = model_metrics("teacher")


def features(class_index: int) -> str:
    return f"features/teacher/{cls(class_index)}.zarr"


def attention(class_index: int) -> str:
    return f"scores/focusdc_attention/{cls(class_index)}.zarr"


def cams(class_index: int) -> str:
    return f"scores/cam_maps/{cls(class_index)}.zarr"


# Pictures for people live in reports/<kind>/<owner>/, the owner being the asset (or, for a
# distilled grid, the methods entry) that writes them: every folder has exactly one writer, so
# each DVC stage owns whole folders (dd_assets/dvc_pipeline.py).
def overlay(asset: str, class_index: int) -> str:
    return f"reports/overlays/{asset}/{cls(class_index)}.png"


def ipc_part(ipc: int) -> str:
    return f"ipc={int(ipc)}"


def histogram(asset: str, part: str) -> str:
    """Score histogram of one partition (``cls(i)`` or ``ipc_part(n)``) of an asset."""
    return f"reports/histograms/{asset}/{part}.png"


def scores(method: str, class_index: int) -> str:
    return f"scores/{method}/{cls(class_index)}.parquet"


def owned_scores(asset: str, plain: str, method: str, class_index: int) -> str:
    """A scores table variants share (RDED crop scores, CIDD scores): the method's first entry's
    asset ``plain`` at ``scores/<method>/``; another owner's ``<owner>_<plain>`` at ``scores/<asset>/``."""
    return scores(method if asset == plain else asset, class_index)


# DDPS (asset names differ only for variants whose scoring parameters differ, e.g.
# ``ddps_flip_dift_features``); the default names are the first DDPS entry's.
def ddps_scores(class_index: int, asset: str = "ddps_scores") -> str:
    """R of every candidate window of every pooled image (Parquet)."""
    return f"scores/{asset}/{cls(class_index)}.parquet"


def dift(class_index: int, asset: str = "dift_features") -> str:
    """DIFT features of each image's kept window(s) (Zarr)."""
    return f"features/{asset}/{cls(class_index)}.zarr"


def ddps_clusters(class_index: int, asset: str = "ddps_clusters") -> str:
    """The ranked cluster table that DDPS selections read (Parquet)."""
    return f"scores/{asset}/{cls(class_index)}.parquet"


def cluster_grid(asset: str, class_index: int) -> str:
    return f"reports/clusters/{asset}/{cls(class_index)}.png"


# EDF: the expert trajectories (ExpertTrajectories' own format: <name>.npy + <name>.json) and
# Comp-DD's per-image complexity.
EXPERTS_DIR = "models/expert_trajectories"


def expert_trajectories() -> str:
    """``ExpertTrajectories.load`` path (``.npy`` params, ``.json`` metadata) in :data:`EXPERTS_DIR`."""
    return f"{EXPERTS_DIR}/trajectories.npy"


def comp_dd(class_index: int) -> str:
    """Comp-DD complexity of every train image of a class (Parquet)."""
    return f"scores/comp_dd/{cls(class_index)}.parquet"


COMP_DD_GLOB = "scores/comp_dd/*.parquet"
EASY_HARD = "reports/comp_dd_easy_hard.yaml"


def curve(owner: str, name: str) -> str:
    """A training or optimization curve of ``owner`` (an asset, or a methods entry's distillation)."""
    return f"reports/curves/{owner}/{name}.png"


def selection(method: str, ipc: int) -> str:
    return f"selections/{method}/ipc={int(ipc)}.parquet"


def distilled(method: str, ipc: int) -> str:
    return f"distilled/{method}/ipc={int(ipc)}.zarr"


def lineage(method: str, ipc: int) -> str:
    return f"lineage/{method}/ipc={int(ipc)}.parquet"


def soft_labels(method: str, ipc: int) -> str:
    return f"labels/{method}/ipc={int(ipc)}.zarr"


def students(method: str, ipc: int) -> str:
    return f"students/{method}/ipc={int(ipc)}.parquet"


def student_checkpoint(method: str, ipc: int, seed: int) -> str:
    return f"students/{method}/ipc={int(ipc)}/seed={int(seed)}.pt"


def students_done_dir(method: str, ipc: int) -> str:
    """Rows of the students already finished in an unfinished partition (defs/student_resume.py)."""
    return f"students/{method}/ipc={int(ipc)}/done"


def student_done(method: str, ipc: int, seed: int, epochs: int, mode: str) -> str:
    return f"{students_done_dir(method, ipc)}/seed={int(seed)}_e{int(epochs)}_{mode}.json"


def timing(asset: str, partition: str | None) -> str:
    return f"timings/{asset}/{partition or 'all'}.json"


def grid(method: str, ipc: int) -> str:
    return f"reports/grids/{method}/{ipc_part(ipc)}.png"


def utilization(ipc: int) -> str:
    """mUE (UDD App. E) of every distilled set at one IPC under the teacher (Parquet)."""
    return f"utilization/ipc={int(ipc)}.parquet"


REPORT_TABLE = "reports/results.parquet"
REPORT_MD = "reports/results.md"
REPORT_PLOT = "reports/accuracy_vs_ipc.png"
RESULTS_CSV = "reports/results.csv"          # the DD-Ranking record (docs/results/<dataset>.csv schema)
BUDGET_CURVE = "reports/accuracy_vs_epochs.png"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlruns"

CATALOG_VIEWS = {
    "manifest": MANIFEST_GLOB,
    "rded_scores": "scores/rded/*.parquet",
    "ddps_scores": "scores/*ddps_scores/*.parquet",
    "ddps_clusters": "scores/*ddps_clusters/*.parquet",
    "selections": "selections/*/*.parquet",
    "lineage": "lineage/*/*.parquet",
    "comp_dd": COMP_DD_GLOB,
    "students": "students/*/*.parquet",
    "utilization": "utilization/*.parquet",
    "results": REPORT_TABLE,
}
