"""dd_assets: region-focused dataset distillation as Dagster software-defined assets."""

__version__ = "0.1.0"
