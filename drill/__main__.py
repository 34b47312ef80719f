"""`python -m drill`: run the drill and exit with its verdict (0 ok, 1 an invariant violated, 2 could not run)."""

import sys

from drill.main import main

sys.exit(main())
