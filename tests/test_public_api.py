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


PUBLIC_MODULES = ["fnattr.api", "fnattr.batch", "fnattr.engine", "fnattr.targets", "fnattr.contrast",
                  "fnattr.result", "fnattr.aggregate", "fnattr.loading", "fnattr.progress",
                  "fnattr.attribution", "fnattr.baselines", "fnattr.registry", "fnattr.render.views",
                  "fnattr.render.convergence", "fnattr.render.draw", "fnattr.evaluate.metrics",
                  "fnattr.evaluate.compare", "fnattr.evaluate.sanity", "fnattr.dataset.runs",
                  "fnattr.dataset.readers", "fnattr.compiled"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_functions_say_what_they_do(name):
    """Every public function of the public modules opens its docstring with what it does."""
    import inspect

    module = importlib.import_module(name)
    names = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
    missing = [n for n in names if inspect.isfunction(fn := getattr(module, n, None))
               and fn.__module__ == name and not (inspect.getdoc(fn) or "").strip()]
    assert not missing, f"{name}: {missing} have no docstring"


def test_moved_modules_keep_their_paths():
    """The modules moved into subpackages import at their old paths as the same objects."""
    pairs = {"fnattr.views": "fnattr.render.views", "fnattr.convergence": "fnattr.render.convergence",
             "fnattr.compare": "fnattr.evaluate.compare", "fnattr.sanity": "fnattr.evaluate.sanity",
             "fnattr.distributed": "fnattr.dataset.distributed"}
    for old, new in pairs.items():
        if old == "fnattr.distributed":
            pytest.importorskip("ray")
        assert importlib.import_module(old) is importlib.import_module(new), old
