"""``python -m napari_glimpse`` runs the command line (also under ``torchrun``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
