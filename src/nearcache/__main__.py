"""``python -m nearcache``: the same as the ``nearcache`` command."""

import sys

from nearcache._cli.main import main

if __name__ == "__main__":
    sys.exit(main())
