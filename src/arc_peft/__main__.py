"""``python -m arc_peft`` runs the ``arc-peft`` command line."""

import sys

from .cli import main

sys.exit(main())
