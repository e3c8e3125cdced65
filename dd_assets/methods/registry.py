"""The one registry of methods: name -> :class:`~dd_assets.methods.plugin.MethodPlugin`.

Adding a method is one line here (its package ``dd_assets/methods/<name>/`` holds the maths and
a ``plugin.py`` with ``PLUGIN``); a ``params.yaml`` entry then uses it. Modules are imported on
first use, so listing methods costs no torch import of the ones not used.
"""

from __future__ import annotations

import importlib

from dd_assets.methods.plugin import MethodPlugin

#: method name -> the module holding its ``PLUGIN``
PLUGINS: dict[str, str] = {
    "random": "dd_assets.methods.random.plugin",
    "rded": "dd_assets.methods.rded.plugin",
    "herding": "dd_assets.methods.herding.plugin",
    "kmeans": "dd_assets.methods.kmeans.plugin",
    "focusdc": "dd_assets.methods.focusdc.plugin",
    "nrr": "dd_assets.methods.nrr.plugin",
    "ddps": "dd_assets.methods.ddps.plugin",
    "edf": "dd_assets.methods.edf.plugin",
    "udd": "dd_assets.methods.udd.plugin",
}

#: the method every result is compared with (the report's reference row; EDF and UDD start from its images)
BASELINE = "random"


def names() -> list[str]:
    return list(PLUGINS)


def get(name: str) -> MethodPlugin:
    """The plugin called ``name``; the error lists the registered ones."""
    if name not in PLUGINS:
        raise KeyError(f"no method named {name!r}; registered: {', '.join(PLUGINS)}")
    plugin = importlib.import_module(PLUGINS[name]).PLUGIN
    if plugin.name != name:
        raise RuntimeError(f"{PLUGINS[name]}.PLUGIN is named {plugin.name!r}, registered as {name!r}")
    return plugin


def plugins() -> dict[str, MethodPlugin]:
    return {n: get(n) for n in PLUGINS}
