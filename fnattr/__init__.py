"""fnattr: functional, typed feature attribution for generative language models.

The public names below are imported on first use (PEP 562), so that `import fnattr.cli` (the
`fnattr` command) does not import torch: `fnattr --help` answers at once.
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

# name -> the module that defines it; a name equal to its module's last part is that submodule
_EXPORTS = {
    "aggregate": "fnattr.aggregate", "compare": "fnattr.compare", "contrast": "fnattr.contrast",
    "dataset": "fnattr.dataset", "evaluate": "fnattr.evaluate", "hooks": "fnattr.hooks",
    "methods": "fnattr.methods", "render": "fnattr.render", "sanity": "fnattr.sanity",
    "targets": "fnattr.targets", "groups": "fnattr.groups", "context": "fnattr.context",
    "attribute": "fnattr.api", "compute_step_scores": "fnattr.api", "iter_steps": "fnattr.api",
    "step_slice": "fnattr.api",
    "Batch": "fnattr.batch", "prepare": "fnattr.batch",
    "Comparison": "fnattr.compare", "compare_methods": "fnattr.compare",
    "Faithfulness": "fnattr.evaluate", "faithfulness": "fnattr.evaluate",
    "default_model_path": "fnattr.loading", "load_model": "fnattr.loading",
    "AttributionTensors": "fnattr.result", "load": "fnattr.result", "save": "fnattr.result",
}

__all__ = [
    "AttributionTensors", "Batch", "Comparison", "Faithfulness", "aggregate", "attribute",
    "compare", "compare_methods", "compute_step_scores", "context", "groups",
    "contrast", "dataset", "default_model_path", "evaluate", "faithfulness", "hooks", "iter_steps",
    "load", "load_model", "methods", "prepare", "render", "sanity", "save", "step_slice", "targets",
]


def __getattr__(name: str):
    """`fnattr.NAME` on first use: a public name, or any submodule (`fnattr.api`), as the eager
    imports made them available."""
    where = _EXPORTS.get(name, f"fnattr.{name}")
    if name not in _EXPORTS and (name.startswith("__") or importlib.util.find_spec(where) is None):
        raise AttributeError(f"module 'fnattr' has no attribute {name!r}")
    module = importlib.import_module(where)
    value = module if where == f"fnattr.{name}" else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from fnattr import aggregate as aggregate
    from fnattr import compare as compare
    from fnattr import compiled as compiled
    from fnattr import context as context
    from fnattr import contrast as contrast
    from fnattr import groups as groups
    from fnattr import dataset as dataset
    from fnattr import evaluate as evaluate
    from fnattr import hooks as hooks
    from fnattr import methods as methods
    from fnattr import render as render
    from fnattr import sanity as sanity
    from fnattr import targets as targets
    from fnattr.api import attribute as attribute
    from fnattr.api import iter_steps as iter_steps
    from fnattr.api import step_slice as step_slice
    from fnattr.api import compute_step_scores as compute_step_scores
    from fnattr.batch import Batch as Batch
    from fnattr.batch import prepare as prepare
    from fnattr.compare import Comparison as Comparison
    from fnattr.compare import compare_methods as compare_methods
    from fnattr.evaluate import Faithfulness as Faithfulness
    from fnattr.evaluate import faithfulness as faithfulness
    from fnattr.loading import default_model_path as default_model_path
    from fnattr.loading import load_model as load_model
    from fnattr.result import AttributionTensors as AttributionTensors
    from fnattr.result import load as load
    from fnattr.result import save as save
