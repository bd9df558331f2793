"""`fnattr.convergence` lives in `fnattr.render.convergence`; this path stays importable and is the same module."""

import sys

from fnattr.render import convergence as _module

sys.modules[__name__] = _module
