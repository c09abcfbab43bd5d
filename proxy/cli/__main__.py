"""`python -m proxy.cli ...`: the same as the `together-meter` console script."""

import sys

from proxy.cli.main import main

sys.exit(main())
