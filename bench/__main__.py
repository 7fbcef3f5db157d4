"""`python -m bench`: see bench/run.py."""

import sys

from bench import run

sys.exit(run.main())
