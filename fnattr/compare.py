"""`fnattr.compare` lives in `fnattr.evaluate.compare`; this path stays importable and is the same module."""

import sys

from fnattr.evaluate import compare as _module

sys.modules[__name__] = _module
