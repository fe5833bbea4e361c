"""``python -m sample_runs.recipes [lm] [digits] [--cache DIR]``: build what is missing, print the folders."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
