"""``python -m fastgen ...`` is the ``fastgen`` command."""

import sys

from fastgen.cli import main

sys.exit(main())
