"""Adding a ``dd-assets init-data`` profile to a params file: :func:`render_profile` prints it
(with comment lines saying where it came from), :func:`write_profile` adds it under
``profiles:`` atomically, keeping every other line (comments included) as it was."""

from __future__ import annotations

import copy
import os
import re
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from dd_assets.init_data import ProfileSuggestion

MARKER = "written by `dd-assets init-data"


class ProfileExistsError(ValueError):
    """The profile name is already in the params file (and ``force`` was not given)."""


def header_comments(s: ProfileSuggestion) -> list[str]:
    """The comment lines written above the profile: where it came from, how to run it, where
    its outputs go (the behaviour of ``Params.data_root`` and ``orchestrate.ensure_dagster_home``)."""
    lines = [
        f"{s.name}: {MARKER} {s.source}`.",
        f"Run it with DD_ASSETS_PROFILE={s.name} (e.g. `DD_ASSETS_PROFILE={s.name} dd-assets materialize`); "
        f"its artifacts go to <repo>/data/{s.name}/ and its Dagster instance to <repo>/.dagster_home/{s.name}/, "
        "apart from the demo's, unless DD_ASSETS_DATA_ROOT / DAGSTER_HOME are set (they apply to every profile).",
        "Blocks not listed here come from the top of this file.",
    ]
    lines += [f"note: {n}" for n in s.notes]
    lines += [f"warning: {w}" for w in s.warnings]
    return [" ".join(ln.split()) for ln in lines]  # one physical line each, whatever a file name holds


def render_profile(s: ProfileSuggestion, indent: str = "  ", comments: bool = True) -> str:
    """The YAML of ``profiles.<name>`` (comment lines first), every line prefixed by ``indent``."""
    body = yaml.safe_dump({s.name: s.profile}, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)
    notes = [part for c in header_comments(s) for part in textwrap.wrap(c, 108, subsequent_indent="  ")] if comments else []
    lines = [f"{indent}# {c}" for c in notes] + [indent + ln for ln in body.splitlines()]
    return "\n".join(lines) + "\n"


_TOP_KEY = re.compile(r"^[^\s#]")


def _profiles_span(lines: list[str]) -> tuple[int, int, str] | None:
    """``(index of 'profiles:', end of its block, indentation of its entries)``, or None."""
    start = next((i for i, ln in enumerate(lines) if re.match(r"^profiles:\s*(#.*)?$", ln.rstrip("\n"))), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(lines))
                if _TOP_KEY.match(lines[j]) and not lines[j].startswith(("---", "..."))), len(lines))
    if end < len(lines):  # blank lines and column-0 comments just above the next top-level key are its own
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
            end -= 1
    else:
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
    indent = "  "
    for ln in lines[start + 1:end]:
        if ln.strip() and not ln.lstrip().startswith("#"):
            indent = ln[: len(ln) - len(ln.lstrip())] or indent
            break
    return start, end, indent


def insert_profile_text(text: str, s: ProfileSuggestion, replace: bool = False) -> str:
    """``text`` (a params.yaml) with the profile's lines added at the end of ``profiles:`` (or
    put in place of the existing entry of that name when ``replace``); every other line is
    kept as it was.  Raises ``ValueError`` when the file's layout does not allow it."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    span = _profiles_span(lines)
    if span is None:
        if re.search(r"(?m)^profiles\s*:", text):
            raise ValueError("'profiles:' is not a block mapping in this file; add the profile by hand")
        block = render_profile(s, "  ")
        return "".join(lines) + ("\n" if lines and lines[-1].strip() else "") + "profiles:\n" + block
    start, end, indent = span
    block = render_profile(s, indent).splitlines(keepends=True)
    if replace:
        key = re.compile(rf"^{re.escape(indent)}['\"]?{re.escape(s.name)}['\"]?\s*:")
        at = next((i for i in range(start + 1, end) if key.match(lines[i])), None)
        if at is None:
            raise ValueError(f"cannot find the line of profile {s.name!r} under profiles:; edit it by hand")
        stop = at + 1
        while stop < end and (not lines[stop].strip() or len(lines[stop]) - len(lines[stop].lstrip()) > len(indent)):
            stop += 1
        while stop > at + 1 and not lines[stop - 1].strip():
            stop -= 1
        first = at  # our own comment block above it goes too
        while first > start + 1 and lines[first - 1].startswith(indent + "#"):
            first -= 1
        if not any(MARKER in ln for ln in lines[first:at]):
            first = at
        return "".join(lines[:first] + block + lines[stop:])
    sep = ["\n"] if lines[end - 1].strip() and end - 1 != start else []
    return "".join(lines[:end] + sep + block + lines[end:])


def write_profile(params_file: str | Path, s: ProfileSuggestion, force: bool = False) -> Path:
    """Add the profile to ``params_file`` atomically (temp file + ``os.replace``).

    Refuses (:class:`ProfileExistsError`) an existing name unless ``force``.  Before the file is
    replaced, the new text must parse to the old document plus exactly this profile, and
    ``dd_assets.config.load_params(..., profile=name)`` (the schema) must accept it.
    """
    from dd_assets.config import ParamsError, load_params

    path = Path(params_file)
    text = path.read_text(encoding="utf-8")
    doc = yaml.safe_load(text) or {}
    profiles = doc.get("profiles") or {}
    exists = s.name in profiles
    if exists and not force:
        raise ProfileExistsError(f"{path}: profile {s.name!r} exists; choose another --name, or --force to replace it")
    new_text = insert_profile_text(text, s, replace=exists)
    try:
        new_doc = yaml.safe_load(new_text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: inserting the profile would not parse ({err}); add it by hand") from None
    want = copy.deepcopy(doc)
    want.setdefault("profiles", {})
    if want["profiles"] is None:
        want["profiles"] = {}
    want["profiles"][s.name] = s.profile
    if new_doc != want:
        raise ValueError(f"{path}: inserting the profile would change other entries; add it by hand")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        try:
            load_params(tmp, profile=s.name)
        except ParamsError as err:
            raise ParamsError(str(err).replace(tmp, str(path))) from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
