"""`python -m proxy.simulator --port N`."""

import sys

from proxy.simulator.server import main

sys.exit(main())
