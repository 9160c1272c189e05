import sys

from spade.cli import main

sys.exit(main())
