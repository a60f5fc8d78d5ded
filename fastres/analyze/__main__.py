import sys

from fastres.analyze import main

sys.exit(main())
