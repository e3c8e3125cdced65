"""Thin Dagster assets over ``dd_assets.methods``; ``dd_assets.definitions`` builds Definitions."""
