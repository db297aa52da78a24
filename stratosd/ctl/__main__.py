"""python -m stratosd.ctl"""

import sys

from stratosd.ctl import main

sys.exit(main())
