"""`python -m service.cli`: how child processes (the supervisor's, the tests', the lab's
launcher) start a command without relying on the `uptake` script being installed."""

import sys

from service.cli import main

sys.exit(main())
