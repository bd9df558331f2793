"""`fnattr.views` lives in `fnattr.render.views`; this path stays importable and is the same module."""

import sys

from fnattr.render import views as _module

sys.modules[__name__] = _module
