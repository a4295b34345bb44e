"""``python -m vidsparse`` runs the command line (also what ``accelerate launch -m vidsparse`` needs)."""

import sys

from .cli import main

sys.exit(main())
