"""`python -m imedsam_hf ...` is the `imedsam` command."""

import sys

from .cli import main

sys.exit(main())
