import sys

from sensplan.planner._cli import main

sys.exit(main())
