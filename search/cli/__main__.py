"""`python -m search.cli`, the same as the `histosearch` command."""

import sys

from search.cli import main

sys.exit(main())
