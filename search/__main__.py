"""`python -m search`: the search's command line (search.cli)."""
import sys

from search.cli import main

sys.exit(main())
