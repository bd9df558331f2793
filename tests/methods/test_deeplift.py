import pytest
import torch
from captum.attr import DeepLift
from torch import nn

from fnattr import prepare
from fnattr.methods.deeplift import deeplift, layer_deeplift
from fnattr.methods._deeplift_rules import deeplift_rules, log_softmax, softmax
from fnattr.targets import logit, logprob, probability
from tests.reference import prefix_inputs
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris is a city", " ran in the park ."]
CUT = {"GPT2LMHeadModel": "transformer.h.0", "LlamaForCausalLM": "model.layers.0",
       "BartForConditionalGeneration": "model.encoder.layers.0",
       "T5ForConditionalGeneration": "encoder.block.0"}
# Llama and T5 compute their norms in float32 inside the float64 model: summation-to-delta then
# holds to float32 rounding (~1e-7 relative); the float64 models (GPT2, Bart) hold it to ~1e-15.
TOL = {"GPT2LMHeadModel": 1e-12, "BartForConditionalGeneration": 1e-12,
       "LlamaForCausalLM": 1e-5, "T5ForConditionalGeneration": 1e-5}


def _tol(model, expected):
    return TOL[type(model).__name__] * (1 + expected.abs())


def _unk(batch, tok, side):
    ids, special = getattr(batch, f"{side}_ids"), getattr(batch, f"{side}_special")
    return torch.where(special, ids, tok.unk_token_id)


def _per_step(model, tok, batch, row, t, target_fn, attribute_target):
    """DeepLIFT of step t alone: one unpadded example and its UNK reference, stacked, no engine."""
    keep_s, keep_t = batch.source_mask[row], batch.target_mask[row]
    src, tgt = batch.source_ids[row][keep_s], batch.target_ids[row][keep_t]
    usrc, utgt = _unk(batch, tok, "source")[row][keep_s], _unk(batch, tok, "target")[row][keep_t]
    if not attribute_target:
        utgt = tgt
    x = prefix_inputs(model, src, tgt, t, batch.decoder_start_id)
    r = prefix_inputs(model, usrc, utgt, t, batch.decoder_start_id)
    s = torch.stack([x[0], r[0]]).requires_grad_()
    p = torch.stack([x[1], r[1]]).requires_grad_()
    with deeplift_rules(model):
        if model.config.is_encoder_decoder:
            logits = model(inputs_embeds=s, decoder_inputs_embeds=p).logits
        else:
            logits = model(inputs_embeds=torch.cat([s, p], 1)).logits
        score = target_fn(logits[:, -1:], torch.tensor([[int(tgt[t])]] * 2))[0, 0]
    gs, gp = torch.autograd.grad(score, (s, p))
    if model.config.is_encoder_decoder:
        gp, p = gp[:, 1:], p[:, 1:]  # drop the decoder start token
    return gs[0] * (s[0] - s[1]).detach(), gp[0] * (p[0] - p[1]).detach()


def test_equals_per_step_and_sums_to_delta(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    at = True
    out = deeplift(model, batch, logit, attribute_target=at)
    for row in range(len(batch)):
        n_src = int(batch.source_mask[row].sum())
        for t in range(int(batch.target_mask[row].sum())):
            want_s, want_t = _per_step(model, tok, batch, row, t, logit, at)
            got_s = out.source[row, t][batch.source_mask[row]]
            torch.testing.assert_close(got_s, want_s, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(out.target[row, t, :t], want_t, rtol=1e-6, atol=1e-9)
            assert n_src == len(want_s)
    for fn in (logit, logprob, probability):
        for at in (False, True):
            out = deeplift(model, batch, fn, attribute_target=at)
            full = deeplift(model, batch, fn, attribute_target=at)  # deterministic
            assert torch.equal(out.source, full.source)
            expected = out.source.flatten(2).sum(-1) + (0 if out.target is None
                                                       else out.target.flatten(2).sum(-1)) - out.delta
            assert torch.all(out.delta.abs() <= _tol(model, expected)), (fn.__name__, at, out.delta)
            assert out.source.abs().sum() > 0


def test_batched_equals_unbatched_and_multipliers(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    out = deeplift(model, batch, logprob)
    mult = deeplift(model, batch, logprob, multiply_by_inputs=False)
    assert mult.delta is None
    assert not torch.allclose(mult.source, out.source)
    for row in range(len(batch)):
        one = deeplift(model, batch.select([row]), logprob)
        n_tgt = int(batch.target_mask[row].sum())
        keep = batch.source_mask[row]
        torch.testing.assert_close(out.source[row, :n_tgt][:, keep], one.source[0, :n_tgt],
                                   rtol=1e-6, atol=1e-10)


def test_layer_deeplift_on_embeddings_and_on_a_cut(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    at = not model.config.is_encoder_decoder
    ref = deeplift(model, batch, logit, attribute_target=at)
    emb = layer_deeplift(model, batch, logit, attribute_target=at)
    torch.testing.assert_close(emb.source, ref.source, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(emb.delta, ref.delta, rtol=1e-6, atol=1e-10)
    before = snapshot(model)
    out = layer_deeplift(model, batch, logit, layer=CUT[type(model).__name__], attribute_target=at)
    assert_unchanged(model, before)
    # the block output is a cut of the graph: its attributions sum to f(x) - f(ref) too
    expected = out.source.flatten(2).sum(-1) + (0 if out.target is None
                                               else out.target.flatten(2).sum(-1)) - out.delta
    assert torch.all(out.delta.abs() <= _tol(model, expected)), out.delta
    part = layer_deeplift(model, batch, logit, layer=CUT[type(model).__name__], attribute_target=at,
                          attr_pos_start=1, attr_pos_end=3)
    torch.testing.assert_close(part.source, out.source[:, 1:3], rtol=1e-9, atol=1e-12)


def test_unchanged_after_error_and_range(any_model):
    model, tok = any_model
    batch = prepare(model, tok, SOURCES, TARGETS)
    before = snapshot(model)

    def broken(logits, ids):
        raise RuntimeError("broken target")

    with pytest.raises(RuntimeError, match="broken target"):
        deeplift(model, batch, broken)
    assert_unchanged(model, before)
    # the function mode is gone too: a plain forward and backward give plain gradients again
    assert not torch.overrides._get_current_function_mode_stack()
    full = deeplift(model, batch)
    part = deeplift(model, batch, attr_pos_start=-2)
    n = batch.target_ids.shape[1]
    assert part.steps.tolist() == [n - 2, n - 1]
    torch.testing.assert_close(part.source, full.source[:, -2:], rtol=1e-9, atol=1e-12)
    assert_unchanged(model, before)


def test_rules_equal_captum_on_a_relu_tanh_network():
    """On modules captum knows (ReLU, Tanh), the rescale rule gives captum's DeepLift."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, ref = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    want = DeepLift(net).attribute(x, baselines=ref)
    stacked = torch.cat([x, ref]).requires_grad_()
    with deeplift_rules(net):
        out = net(stacked)
    (grad,) = torch.autograd.grad(out[:3].sum(), stacked)
    got = grad[:3] * (x - ref)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.sum(1), (net(x) - net(ref))[:, 0], rtol=1e-9, atol=1e-12)


def test_decomposed_ops_keep_values_and_sum_to_delta():
    torch.manual_seed(0)
    s = torch.randn(4, 3, 7, dtype=torch.float64)
    s[1, 0, 2] = float("-inf")  # a masked entry
    s[3, 0, 2] = float("-inf")
    leaf = s.clone().requires_grad_()
    for fn, plain in ((softmax, torch.softmax), (log_softmax, torch.log_softmax)):
        out = fn(leaf, -1)
        want = plain(s, -1)
        assert torch.equal(torch.isfinite(out), torch.isfinite(want))
        torch.testing.assert_close(out[torch.isfinite(out)], want[torch.isfinite(want)])
        for k in range(7):
            (g,) = torch.autograd.grad(out[:2, :, k].sum(), leaf, retain_graph=True)
            d = torch.where(torch.isfinite(s[:2]), s[:2] - s[2:], 0)
            got = (g[:2] * d).sum()
            diff = (out[:2, :, k] - out[2:, :, k]).sum()
            if not torch.isfinite(diff):  # log_softmax of the masked entry is -inf in both halves
                continue
            torch.testing.assert_close(got, diff, rtol=1e-9, atol=1e-12)
    # layer norm through the torch function mode: value kept, summation exact
    ln = nn.LayerNorm(7).double()
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    with deeplift_rules(ln):
        y = ln(x)
    torch.testing.assert_close(y, nn.functional.layer_norm(x, (7,), ln.weight, ln.bias))
    (g,) = torch.autograd.grad(y[:2, 3].sum(), x)
    torch.testing.assert_close((g[:2] * (x[:2] - x[2:])).sum(), (y[:2, 3] - y[2:, 3]).sum(),
                               rtol=1e-9, atol=1e-12)


def test_softmax_multipliers_stay_bounded_when_one_half_is_far_below():
    """The reference row sits 40 below the input on most entries: a shared shift would make its
    normaliser ~e-40 and the multipliers huge; each row's own max keeps them at most 1."""
    torch.manual_seed(1)
    x = torch.randn(2, 9, dtype=torch.float64)
    ref = x - 40 * (torch.arange(9) > 0)
    leaf = torch.cat([x, ref]).requires_grad_()
    p = softmax(leaf, -1)
    torch.testing.assert_close(p, torch.softmax(leaf, -1))
    for k in range(9):
        (g,) = torch.autograd.grad(p[:2, k].sum(), leaf, retain_graph=True)
        assert g[:2].abs().max() <= 1 + 1e-12
        torch.testing.assert_close((g[:2] * (x - ref)).sum(), (p[:2, k] - p[2:, k]).sum(),
                                   rtol=1e-9, atol=1e-12)


def test_max_rule_is_exact_and_convex():
    from fnattr.methods._deeplift_rules import max_rule
    torch.manual_seed(2)
    s = torch.randn(6, 5, dtype=torch.float64).requires_grad_()
    m = max_rule(s, -1)
    torch.testing.assert_close(m, s.amax(-1, keepdim=True))
    (g,) = torch.autograd.grad(m[:3].sum(), s)
    assert torch.all(g[:3] >= 0) and torch.allclose(g[:3].sum(-1), torch.ones(3, dtype=s.dtype))
    torch.testing.assert_close((g[:3] * (s[:3] - s[3:])).sum(-1), (m[:3] - m[3:])[:, 0])


@pytest.mark.parametrize("method", ["deeplift", "layer_deeplift", "layer_integrated_gradients",
                                    "layer_gradient_x_activation", "gradient_shap",
                                    "sequential_integrated_gradients",
                                    "discretized_integrated_gradients"])
def test_reachable_by_name(gpt2, method):
    import fnattr
    from fnattr.methods import METHODS
    model, tok = gpt2
    out = fnattr.attribute(model, tok, SOURCES[0], TARGETS[0], method=method,
                           **({} if "deeplift" in method or "activation" in method
                              else {"n_samples": 2} if "gradient_shap" in method
                              else {"n_steps": 2, "points_per_segment": 1} if "discretized" in method
                              else {"n_steps": 2}))
    assert out.meta["method"] == method and METHODS[method].__name__ == method
    assert out.source.abs().sum() > 0


def test_rms_norm_and_int_shaped_layer_norm_sum_to_delta():
    torch.manual_seed(3)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64)
    with deeplift_rules(nn.Identity()):
        ys = [nn.functional.rms_norm(x, (7,), w, 1e-6), nn.functional.layer_norm(x, 7)]
    for y, want in zip(ys, [nn.functional.rms_norm(x, (7,), w, 1e-6), nn.functional.layer_norm(x, (7,))]):
        torch.testing.assert_close(y, want)
        (g,) = torch.autograd.grad(y[:2, 1].sum(), x)
        torch.testing.assert_close((g[:2] * (x[:2] - x[2:])).sum(), (y[:2, 1] - y[2:, 1]).sum(),
                                   rtol=1e-9, atol=1e-12)
