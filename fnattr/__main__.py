"""`python -m fnattr`: the command line, as the `fnattr` command runs it (`python -m fnattr --help`)."""

import sys

from fnattr.cli import main

if __name__ == "__main__":
    sys.exit(main())
