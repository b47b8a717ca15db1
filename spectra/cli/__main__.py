"""`python -m spectra.cli ...` (torchrun, tests)."""

import sys

from spectra.cli import main

sys.exit(main())
