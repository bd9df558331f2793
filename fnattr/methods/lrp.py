"""AttnLRP and CP-LRP: Gradient x Input under LRP's backward rules, one forward and one batched
backward for every generated step (like `input_x_gradient`, whose engine they share).

The rules (`fnattr.hooks.lrp`) follow the authors' implementation, lxt 2.1's efficient
Gradient x Input formulation: identity rule on elementwise non-linearities (AttnLRP Eq. 9) and on
normalisers, uniform rule on the gated MLP product and on the attention products (Eq. 7, applied
as lxt does: query and key gradients / 4, value gradients / 2), the softmax's own gradient, which
in Gradient x Input is AttnLRP's softmax rule with its bias term (Proposition 3.1), and the epsilon
rule (epsilon 0) implicit in Gradient x Input on linear layers (Eq. 8). CP-LRP (Ali et al. 2022)
holds the attention weights and the MLP gate constant instead.

Target: LRP explains the logit (AttnLRP explains "the output logit" of the predicted token, which
is what its relevance conserves; probability and log-probability add the softmax over the whole
vocabulary, whose normalisation is not a quantity any input token contributes to additively). So
`target_fn` defaults to `fnattr.targets.logit` here, not to the probability.

Conservation: `meta["conservation"]` (JSON) holds, per row and step, the sum of the relevance of
every attributed input (source and, where attributed, target embeddings; or the layer's output
with `layer=`), the target's value, and the absorbed share `(value - sum) / value`: what biases,
position embeddings, lxt's 1e-10 epsilon and the softmax rule's bias term took. A bias-free
Llama under CP-LRP conserves exactly (only float rounding is absorbed); AttnLRP's softmax rule does
not conserve by design.
"""

import dataclasses
import json

import torch
from torch import Tensor

from fnattr.batch import Batch
from fnattr.hooks.layer import LayerSpec
from fnattr.hooks.lrp import lrp_rules, plan
from fnattr.attribution import StepScoreSpec, attribution_context, call_args, finish, fn_name
from fnattr.methods.gradient import _gradients, _times
from fnattr.methods.layer import layer_gradient_x_activation
from fnattr.progress import report
from fnattr.registry import attribution_method
from fnattr.result import AttributionTensors
from fnattr.targets import logit
from fnattr.types import Model, TargetFn


def conservation(out: AttributionTensors) -> dict:
    """`meta["conservation"]` of `out`: per row and step, the relevance sum, the target's value,
    what was absorbed, `value - sum`, and its share `(value - sum) / value` (None at padded steps;
    the share None where the value is 0)."""
    total = out.source.flatten(2).sum(-1).double()
    if out.target is not None:
        total = total + out.target.flatten(2).sum(-1).double()
    value = out.step_scores[out.meta["target_fn"]].double()
    mask = out.step_mask

    def rows(t: Tensor) -> list:
        return [[float(v) if ok else None for v, ok in zip(r.tolist(), m.tolist())] for r, m in zip(t, mask)]

    share = torch.where(value != 0, (value - total) / value.where(value != 0, 1.0), torch.nan)
    return {"target": out.meta["target_fn"],
            "inputs": "source and target" if out.target is not None else "source",
            "relevance_sum": rows(total), "target_value": rows(value), "absorbed": rows(value - total),
            "absorbed_share": [[None if v is None or v != v else v for v in r] for r in rows(share)]}


def _lrp(rule: str, args: dict, model: Model, batch: Batch, target_fn: TargetFn,
         layer: LayerSpec | None, attribute_target: bool | None, attr_pos_start: int | None, attr_pos_end: int | None,
         step_scores: StepScoreSpec, progress: bool) -> AttributionTensors:
    plan(model, rule)  # refuse an uncovered model before anything else
    if layer is not None:  # relevance of the layer's output: its gradient x activation under the rules
        with lrp_rules(model, rule):
            out = layer_gradient_x_activation(
                model, batch, target_fn, layer=layer, attribute_target=attribute_target,
                attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end, step_scores=step_scores,
                progress=progress)
        meta = {**out.meta, "method": rule, "args": json.dumps({**args, "layer": str(layer)})}
        out = dataclasses.replace(out, meta=meta)
    else:
        with (report(progress, rule, unit="forwards") as bar,
              attribution_context(model, batch, attribute_target=attribute_target,
                                  attr_pos_start=attr_pos_start, attr_pos_end=attr_pos_end) as ctx,
              lrp_rules(model, rule)):
            g_src, g_tgt, scores = _gradients(ctx, target_fn, step_scores, bar)
            out = finish(ctx, method=rule, args=args, target_fn=target_fn,
                         source=_times(g_src, ctx.embedded.source),
                         target=_times(g_tgt, ctx.embedded.target), step_scores=scores)
    if fn_name(target_fn) not in out.step_scores:
        return out
    return dataclasses.replace(out, meta={**out.meta, "conservation": json.dumps(conservation(out))})


@attribution_method(family="lrp", reduction="sum")
def attnlrp(
    model: Model, batch: Batch, target_fn: TargetFn = logit, *,
    layer: LayerSpec | None = None, attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """AttnLRP (Achtibat et al., ICML 2024, arXiv:2402.05602): Gradient x Input under
    attention-aware LRP rules, every step from one forward and one batched backward.

    The rules are those of `fnattr.hooks.lrp_rules(model, "attnlrp")` (identity rule Eq. 9
    on non-linearities and normalisers, uniform rule Eq. 7 on the gated and attention products,
    softmax rule Prop. 3.1, epsilon rule Eq. 8 on linear layers; as in lxt 2.1, the uniform rule
    is applied by dividing the query and key gradients by 4 and the value gradients by 2).

    `target_fn` defaults to the logit (what LRP's relevance conserves; see the module docstring).
    `layer` (a block or any module, as the layer methods take it): the relevance of that module's
    output per position instead of the input embeddings'. One forward and one batched backward
    serve every step.

    Returns `source` [batch step src hidden] (and `target` [batch step tgt hidden]);
    `meta["conservation"]`: relevance sum, target value and absorbed share per step.

    >>> out = attnlrp(model, prepare(model, tok, "The capital of France is"))
    """
    return _lrp("attnlrp", call_args(attnlrp, locals()), model, batch, target_fn, layer,
                attribute_target, attr_pos_start, attr_pos_end, step_scores, progress)


@attribution_method(family="lrp", reduction="sum")
def cp_lrp(
    model: Model, batch: Batch, target_fn: TargetFn = logit, *,
    layer: LayerSpec | None = None, attribute_target: bool | None = None,
    attr_pos_start: int | None = None, attr_pos_end: int | None = None,
    step_scores: StepScoreSpec = (), progress: bool = False,
) -> AttributionTensors:
    """CP-LRP (Ali et al., ICML 2022, "XAI for Transformers: Better Explanations through
    Conservative Propagation", arXiv:2202.07304): Gradient x Input with
    the attention weights held constant, every step from one forward and one batched backward.

    Held constant: the attention weights and (as in lxt 2.1's `cp_gated_mlp_forward`) the gated
    MLP's gate, and the normalisers (their Sec. 3's LN rule); the identity rule on
    non-linearities.

    Same arguments and result as `attnlrp`; a bias-free model conserves the logit exactly.
    """
    return _lrp("cp_lrp", call_args(cp_lrp, locals()), model, batch, target_fn, layer,
                attribute_target, attr_pos_start, attr_pos_end, step_scores, progress)
