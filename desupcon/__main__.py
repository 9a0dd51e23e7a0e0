import sys

from desupcon.cli import main

sys.exit(main())
