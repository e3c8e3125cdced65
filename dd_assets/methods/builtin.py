"""Import every built-in method module so its ``@register`` decorators run."""

from dd_assets.methods import select_random  # noqa: F401
from dd_assets.methods import coresets  # noqa: F401
from dd_assets.methods import rded  # noqa: F401
from dd_assets.core import compose  # noqa: F401
from dd_assets.core import soft_labels  # noqa: F401
from dd_assets.methods import focusdc  # noqa: F401
from dd_assets.methods import nrr  # noqa: F401
from dd_assets.core import dbr  # noqa: F401
from dd_assets.methods import ddps  # noqa: F401
