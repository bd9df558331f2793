"""Target functions: (logits of every step, target ids) -> one score per step.

Plain functions: pass any callable of the same form (see `fnattr.types.TargetFn`).
"""

from collections.abc import Mapping
from types import MappingProxyType

from fnattr._check import typechecked
from fnattr.types import Logits, StepScores, TargetFn, TargetIds


def _pick(values: Logits, target_ids: TargetIds) -> StepScores:
    return values.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


@typechecked
def logit(logits: Logits, target_ids: TargetIds) -> StepScores:
    """The raw logit of the target token: `z_t[y_t]`."""
    return _pick(logits, target_ids)


@typechecked
def logprob(logits: Logits, target_ids: TargetIds) -> StepScores:
    """Log-probability of the target token: `log softmax(z_t)[y_t]`."""
    return _pick(logits.log_softmax(-1), target_ids)


@typechecked
def probability(logits: Logits, target_ids: TargetIds) -> StepScores:
    """Probability of the target token: `softmax(z_t)[y_t]` (the default target)."""
    return _pick(logits.softmax(-1), target_ids)


# Built-in target functions by name (for `step_scores=["logprob", ...]`, the CLI). A read-only
# table of this module's functions; user functions are passed directly, never registered.
TARGETS: Mapping[str, TargetFn] = MappingProxyType({
    "probability": probability, "logprob": logprob, "logit": logit,
})
