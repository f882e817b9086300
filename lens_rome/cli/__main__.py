"""``python -m lens_rome.cli``: the command line."""

import sys

from lens_rome.cli import main

sys.exit(main())
