"""`python3 -m pimaster.lab ARGS` is `pimaster lab ARGS`."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
