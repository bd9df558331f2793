import importlib

import pytest

MODULES = ["fnattr", "fnattr.methods", "fnattr.hooks", "fnattr.evaluate", "fnattr.sanity",
           "fnattr.groups", "fnattr.context"]


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_imports(name):
    module = importlib.import_module(name)
    assert module.__all__
    for attr in module.__all__:
        assert getattr(module, attr) is not None, f"{name}.{attr}"


def test_methods_table_matches_module():
    import fnattr.methods as m

    for name, fn in m.METHODS.items():
        assert getattr(m, name) is fn
        assert fn.__doc__, name
