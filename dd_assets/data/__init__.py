"""Datasets: sources that provide an ImageFolder, the manifest, and streaming image loaders."""
