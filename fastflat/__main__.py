"""`python -m fastflat` is the `fastflat` command."""

import sys

from fastflat.cli import main

sys.exit(main())
