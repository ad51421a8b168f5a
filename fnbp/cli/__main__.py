"""``python -m fnbp.cli``: the ``fnbp`` console script."""

import sys

from fnbp.cli import main

sys.exit(main())
