"""``python -m idemrt ...``: the same command line as the ``idemrt`` script."""
import sys

from .cli import main

sys.exit(main())
