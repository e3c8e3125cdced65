"""What the ``dd-assets`` subcommands share."""

from __future__ import annotations

import os


def _load(profile: str | None):
    if profile:
        os.environ["DD_ASSETS_PROFILE"] = profile
    from dd_assets.config import load_params

    return load_params()
