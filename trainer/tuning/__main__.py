"""``python -m trainer.tuning ...`` = ``augserve tune ...``."""

import sys

from .cli import main

sys.exit(main())
