"""`fnattr.sanity` lives in `fnattr.evaluate.sanity`; this path stays importable and is the same module."""

import sys

from fnattr.evaluate import sanity as _module

sys.modules[__name__] = _module
