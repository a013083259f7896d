import sys

from sensplan.cli import main

sys.exit(main())
