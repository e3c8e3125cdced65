"""Partition definitions: classes (per-image work) and IPC (everything IPC-dependent)."""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from dd_assets.config import Params
from dd_assets.data.sources import discover_classes


@dataclass(frozen=True)
class Partitions:
    classes: list[str]
    class_def: dg.StaticPartitionsDefinition
    ipc_def: dg.StaticPartitionsDefinition

    def class_index(self, key: str) -> int:
        return self.classes.index(key)


def build_partitions(params: Params) -> Partitions:
    classes = discover_classes(params.block("data"))
    return Partitions(
        classes=classes,
        class_def=dg.StaticPartitionsDefinition(classes),
        ipc_def=dg.StaticPartitionsDefinition([str(i) for i in params.ipcs]),
    )
