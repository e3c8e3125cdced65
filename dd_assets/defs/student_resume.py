"""Finished students survive an interrupted ``<method>_students`` partition.

A partition trains seeds x budgets students one after the other (an IPC-10 CIFAR student is ~10
minutes of a CPU core); the table is written once, at the end. Each finished student's row is
therefore kept at once under ``students/<method>/ipc=N/done/``, keyed by everything that
determines it (the asset's code version, the upstream data versions, seed, budget, label mode).
A re-run of the partition -- after Ctrl-C, a killed process, a lost machine -- reuses the rows
whose key still matches and trains only the rest; a changed parameter or upstream changes the
key, so nothing stale is reused. Training is deterministic per seed, so a reused row is the row a
re-run would compute. The records are removed once the table is written.
"""

from __future__ import annotations

import json
from typing import Any

from dd_assets.config import block_hash
from dd_assets.storage import DataRoot, layout


class FinishedStudents:
    def __init__(self, root: DataRoot, method: str, ipc: int, code_version: str, upstream: dict[str, str]) -> None:
        self.root, self.method, self.ipc = root, method, int(ipc)
        self.base = block_hash(code_version, upstream)

    def _key(self, seed: int, epochs: int, mode: str) -> str:
        return block_hash(self.base, int(seed), int(epochs), mode)

    def get(self, seed: int, epochs: int, mode: str, checkpoint: bool) -> dict[str, Any] | None:
        """The stored row of this student when its key matches (and, for the main student, its
        checkpoint is there); else None."""
        rel = layout.student_done(self.method, self.ipc, seed, epochs, mode)
        if not self.root.exists(rel):
            return None
        try:
            rec = json.loads(self.root.read_bytes(rel))
        except (ValueError, OSError):
            return None   # a torn or foreign file: train again
        if rec.get("key") != self._key(seed, epochs, mode):
            return None
        if checkpoint and not self.root.exists(layout.student_checkpoint(self.method, self.ipc, seed)):
            return None
        return rec["row"]

    def put(self, seed: int, epochs: int, mode: str, row: dict[str, Any]) -> None:
        rec = {"key": self._key(seed, epochs, mode), "row": row}
        self.root.write_bytes(layout.student_done(self.method, self.ipc, seed, epochs, mode),
                              json.dumps(rec, sort_keys=True).encode())

    def clear(self) -> None:
        rel = layout.students_done_dir(self.method, self.ipc)
        if self.root.exists(rel):
            self.root.fs.rm(self.root.path(rel), recursive=True)
