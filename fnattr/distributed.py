"""`fnattr.distributed` lives in `fnattr.dataset.distributed`; this path stays importable and is the same module."""

import sys

from fnattr.dataset import distributed as _module

sys.modules[__name__] = _module
