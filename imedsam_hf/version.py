"""The package version (read by setup.cfg, `imedsam --version` and `imedsam_hf.__version__`)."""

__version__ = "0.2.0"
