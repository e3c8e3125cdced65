"""Maths several methods share (no Dagster): imaging, composition, soft labels, DBR, training, CAMs,
augmentation, metrics."""
