"""Pure torch/numpy implementations of the distillation stages (no Dagster imports)."""
