"""``python -m proxy`` is ``credicorp-proxy``."""

import sys

from proxy.cli import main

sys.exit(main())
