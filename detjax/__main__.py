import sys

from detjax.cli import main

sys.exit(main())
