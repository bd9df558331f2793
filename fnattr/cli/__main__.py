"""`python -m fnattr.cli`: the `fnattr` command (as `python -m fnattr`)."""

import sys

from fnattr.cli import main

if __name__ == "__main__":
    sys.exit(main())
