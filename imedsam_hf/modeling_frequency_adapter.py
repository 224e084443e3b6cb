"""Deprecated alias of `imedsam_hf.frequency_adapter_layers` (the layers' module before the layout of 0.2).

Checkpoints published before then carry their own copy of this file; the package keeps the name importable.
"""

from .configuration_imedsam import TINYVIT_TARGETS, VIT_TARGETS  # noqa: F401
from .frequency_adapter_layers import *  # noqa: F401,F403
from .frequency_adapter_layers import __all__ as _layers_all

__all__ = [*_layers_all, "TINYVIT_TARGETS", "VIT_TARGETS"]
