import sys

from adrec.cli import main

sys.exit(main())
