"""The implementations of the ``dd-assets`` subcommands, grouped by concern; ``dd_assets.cli``
builds the parser and dispatches to them.

* :mod:`~dd_assets.commands.running`: ``materialize``, ``stale``;
* :mod:`~dd_assets.commands.inspection`: ``methods``, ``report``, ``results``, ``audit``,
  ``easy-hard``;
* :mod:`~dd_assets.commands.data`: ``init-data``;
* :mod:`~dd_assets.commands.tools`: ``ui``, ``mlflow-ui``, ``doctor``, ``dvc-yaml``;
* :mod:`~dd_assets.commands.common`: what they share (loading the profile's params).

Every module imports only the standard library at import time; the rest is imported inside
the command that needs it, so ``dd-assets --help`` stays fast.
"""
