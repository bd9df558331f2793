"""Shape-annotated tensor aliases and the target-function protocol."""

from typing import Protocol, runtime_checkable

from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

# A Hugging Face model (PreTrainedModel), or a wrapper that forwards to one, such as the module
# `torch.compile` returns: methods read `config`, the embeddings and the output layer through it.
Model = nn.Module

TokenIds = Int[Tensor, "batch seq"]
Mask = Bool[Tensor, "batch seq"]
Embeds = Float[Tensor, "batch seq d_model"]
Logits = Float[Tensor, "batch step vocab"]
TargetIds = Int[Tensor, "batch step"]
StepScores = Float[Tensor, "batch step"]


@runtime_checkable
class TargetFn(Protocol):
    """Maps the logits of every generated step and the target ids to one score per step.

    `logits[b, t]` are the model's logits when it predicts `target_ids[b, t]`. A target function
    must treat steps independently (score t may read only `logits[:, t]` and `target_ids[:, t]`),
    which is what lets one forward pass serve every step. Any callable of this form works
    wherever a built-in one does; there is nothing to register. A function that holds per-row
    data may also expose `at_rows(rows)`, returning the function for perturbed copies whose row i
    belongs to batch row `rows[i]` (see `fnattr.engine.for_rows`).
    """

    def __call__(self, logits: Logits, target_ids: TargetIds, /) -> StepScores: ...
