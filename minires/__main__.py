"""`python -m minires ...`: the same command line as the `minires` console script."""
import sys

from minires.cli import main

sys.exit(main())
