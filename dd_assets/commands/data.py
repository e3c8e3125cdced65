"""``dd-assets init-data``: a params.yaml profile for the user's own ImageFolder."""

from __future__ import annotations

import argparse
import sys


def cmd_init_data(args: argparse.Namespace) -> int:
    """Inspect an ImageFolder, print the report, its warnings and a profile; ``--write`` adds
    the profile to the params file (``--params``, else $DD_ASSETS_PARAMS / the repo's)."""
    from pathlib import Path

    from dd_assets import folder_report, init_data, profile_writer
    from dd_assets.config import PROJECT_ROOT, ParamsError, params_path

    params_file = Path(args.params) if args.params else params_path()
    name = args.name or init_data.default_name(args.path)
    if args.max_per_class is not None and args.max_per_class < 0:
        print("init-data: --max-per-class must be >= 0 (0: decode every image)", file=sys.stderr)
        return 2
    try:
        report = folder_report.inspect_folder(args.path, max_images_per_class=args.max_per_class or None)
        suggestion = init_data.suggest_profile(report, name, PROJECT_ROOT, base=init_data.demo_budget(params_file))
    except (OSError, ValueError) as err:
        print(f"init-data: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"\nwarnings ({len(suggestion.warnings)}):" if suggestion.warnings else "\nwarnings: none")
    for w in suggestion.warnings:
        print(f"  - {w}")
    print(f"\nprofile (under profiles: in {params_file}):")
    print(profile_writer.render_profile(suggestion), end="")
    if not args.write:
        print(f"\nnot written: add --write to add it to {params_file}")
        return 0
    try:
        profile_writer.write_profile(params_file, suggestion, force=args.force)
    except ParamsError:  # the schema refused it: one line from main, exit 2
        raise
    except (OSError, ValueError) as err:  # ProfileExistsError included
        print(f"init-data: {err}", file=sys.stderr)
        return 2
    print(f"\nadded profile {name!r} to {params_file}; run it with DD_ASSETS_PROFILE={name} dd-assets materialize")
    return 0
