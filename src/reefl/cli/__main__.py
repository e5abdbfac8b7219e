"""``python -m reefl.cli``: the ``reefl`` command."""

import sys

from reefl.cli import main

sys.exit(main())
