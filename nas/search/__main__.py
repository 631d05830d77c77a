"""``python -m nas.search METHOD ...``: see :mod:`nas.cli`."""

import sys

from nas.cli import main

sys.exit(main())
