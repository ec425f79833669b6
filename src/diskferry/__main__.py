"""``python -m diskferry`` runs the command line."""

import sys

from diskferry.cli.main import main

sys.exit(main())
