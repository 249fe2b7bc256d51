import sys

from dsv32.cli import main

sys.exit(main())
