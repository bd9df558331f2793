"""fnattr: functional, typed feature attribution for generative language models."""

from fnattr import aggregate as aggregate
from fnattr import compare as compare
from fnattr import contrast as contrast
from fnattr import dataset as dataset
from fnattr import evaluate as evaluate
from fnattr import hooks as hooks
from fnattr import methods as methods
from fnattr import render as render
from fnattr import sanity as sanity
from fnattr import targets as targets
from fnattr.api import attribute as attribute
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

__all__ = [
    "AttributionTensors", "Batch", "Comparison", "Faithfulness", "aggregate", "attribute",
    "compare", "compare_methods", "compute_step_scores",
    "contrast", "dataset", "default_model_path", "evaluate", "faithfulness", "hooks", "load",
    "load_model", "methods", "prepare", "render", "sanity", "save", "targets",
]
