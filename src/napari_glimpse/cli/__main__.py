"""``python -m napari_glimpse.cli``: the command line."""

import sys

from . import main

sys.exit(main())
