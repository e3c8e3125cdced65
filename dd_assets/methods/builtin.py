"""Import every built-in method module so its ``@register`` decorators run."""

from dd_assets.methods.random import select  # noqa: F401
from dd_assets.methods.herding import select  # noqa: F401
from dd_assets.methods.kmeans import select  # noqa: F401
from dd_assets.methods.rded import crops  # noqa: F401
from dd_assets.core import compose  # noqa: F401
from dd_assets.core import soft_labels  # noqa: F401
from dd_assets.methods.focusdc import selection  # noqa: F401
from dd_assets.methods.nrr import cidd  # noqa: F401
from dd_assets.core import dbr  # noqa: F401
from dd_assets.methods.ddps import select  # noqa: F401
