"""Resources: operational knobs only (device, batch sizes, workers, progress).

Everything that changes an output is in ``params.yaml``; assets re-read it at run time and
refuse to run when it no longer matches the code_version the graph was loaded with.
"""

from __future__ import annotations

import dagster as dg
import torch

from dd_assets.config import Params, load_params
from dd_assets.storage import DataRoot


_CHECKED_ROOTS: set[str] = set()

# Dagster concurrency pool of every asset that computes on ``DDResource.torch_device()``: the
# instance's limit for it caps how many such steps run at once (one per GPU; docs/scale.md).
GPU_POOL = "gpu"


class DDResource(dg.ConfigurableResource):
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    inference_batch_size: int = 256
    num_workers: int = 0
    progress: bool = False
    threads: int = 0  # torch intra-op threads; 0 = torch default
    # students of one row (seeds of one budget and label mode) trained at once by
    # core.bulk_students (vmapped); 1 = one at a time. Equal up to float rounding; ~6x the
    # students per minute on a GPU, slower on a CPU (benchmarks/README.md)
    student_batch: int = 1

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Tag the run with this process (pid, host, start time) so a run whose process is
        killed can be recognized as an orphan (:mod:`dd_assets.run_guard`)."""
        from dd_assets.run_guard import tag_run

        tag_run(context.instance, context.run_id)

    def params(self) -> Params:
        return load_params()

    def root(self) -> DataRoot:
        root = DataRoot(self.params().data_root)
        if root.uri not in _CHECKED_ROOTS:
            root.check_writable()  # fail before any work, naming the root
            _CHECKED_ROOTS.add(root.uri)
        return root

    def batches(self, rows, data: dict, desc: str):
        """``iter_batches`` over manifest rows at the inference batch size, with a progress
        bar when ``progress`` is on."""
        from tqdm import tqdm

        from dd_assets.data.loading import iter_batches

        total = -(-len(rows) // self.inference_batch_size)
        return tqdm(iter_batches(rows, data, self.inference_batch_size, num_workers=self.num_workers),
                    desc=desc, total=total, disable=not self.progress, leave=False)

    def torch_device(self) -> torch.device:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"resource dd.device={self.device!r} but CUDA is not available; use 'cpu' or 'auto'")
        return dev
