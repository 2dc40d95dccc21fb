"""`python -m search`: the search's command line (search.cli)."""
from search.cli import main

raise SystemExit(main())
