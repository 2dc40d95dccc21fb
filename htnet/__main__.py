import sys

from htnet.cli import main

sys.exit(main())
