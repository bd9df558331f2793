"""The architecture matrix: every method on tiny models of 26 transformers architectures.

Each cell runs one method on a padded batch of two rows of different lengths (the decoder-only
prompt of row 1 is left padded, row 0's target is right padded; encoder-decoder sources are
right padded). Which cells get which check, and why:

- The gradient path (`engine.run` + `step_gradients`, which saliency, input x gradient, IG,
  gradient SHAP, DIG, SIG and DeepLIFT all go through) is checked exactly against a plain
  per-step autograd reference on every architecture: that is where an architecture's positions,
  masks, padding and embeddings could go wrong. Each method's own arithmetic is checked against
  its reference in `tests/methods/` on the conftest models, which an architecture cannot change.
- `attention` is checked exactly against the model's own `output_attentions=True` on every
  architecture, since it reads each model's attention modules.
- `value_zeroing` is checked against one full forward per (layer, token, step) on the
  architectures outside the attention interface (its hooks there are new); the interface path is
  checked the same way on the conftest models in `tests/methods/test_value_zeroing.py`.
- Every cell: finite scores of the documented shape, padding exactly 0, positive step scores on
  real steps, the model unchanged. One deterministic method per way of running the model
  (`ALONE`) also gives row 1 the same scores alone as in the padded batch, so a padding problem
  in that path shows up there; the other methods share those paths.
"""

import copy
import dataclasses
import pathlib
import re

import pytest
import torch

from fnattr import prepare
from fnattr.hooks.attention import eager_experts, finite_masks
from fnattr.hooks.value_zeroing import layer_attention, layer_stacks
from fnattr.hooks.value_zeroing import value_zeroing as zeroed_values
from fnattr.methods import METHODS, attention, deeplift, occlusion, saliency, value_zeroing
from fnattr.targets import probability
from tests.architectures import (
    APPROXIMATE, CHEAP, LEGACY_ATTENTION, MOE, NAMES, SEQ2SEQ, UNSUPPORTED, build, dtypes,
    supported_table,
)
from tests.methods.test_value_zeroing import _check_against_reference
from tests.reference import step_gradient
from tests.state import assert_unchanged, snapshot

SOURCES, TARGETS = ["The capital of France is", "A dog"], [" Paris.", " ran in the park"]
README = pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md"
# Row 1 alone = row 1 in the padded batch, for one deterministic method of each way to run the
# model: the embedding engine with one backward (saliency) and with path chunks (IG), layer hooks
# (layer_gradient_x_activation; the layer IG / DeepLIFT variants run the same hooks), DeepLIFT's
# side-by-side forward, attention capture, value-zeroing replays, and perturbed copies (occlusion).
ALONE = ("saliency", "integrated_gradients", "layer_gradient_x_activation", "deeplift", "attention",
         "value_zeroing", "occlusion")


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    model: torch.nn.Module
    tok: object
    batch: object


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is many times faster on a busy machine (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def archs(decoder_tokenizer, seq2seq_tokenizer) -> dict:
    """Models and batches built on first use, shared by the whole module."""
    return {"tokenizers": {False: decoder_tokenizer, True: seq2seq_tokenizer}}


def _arch(archs: dict, name: str, dtype: torch.dtype | None = None) -> Arch:
    dtype = dtype or dtypes(name)[0]
    if (name, dtype) not in archs:
        tok = archs["tokenizers"][name in SEQ2SEQ]
        model = build(name, len(tok), dtype)
        archs[(name, dtype)] = Arch(name, model, tok, prepare(model, tok, SOURCES, TARGETS))
    return archs[(name, dtype)]


# float64 weights, but attention scores taken in float32 on every path the gradients take (GPT-J;
# Bloom's and Gemma 2's eager attention take a float32 softmax)
FLOAT32_INSIDE = ("gptj", "bloom", "gemma2")


def _tol(model) -> dict:
    if next(model.parameters()).dtype != torch.float64:
        return {"rtol": 1e-4, "atol": 1e-6}
    if type(model).__name__.lower().startswith(FLOAT32_INSIDE):
        return {"rtol": 1e-6, "atol": 1e-9}
    return {"rtol": 1e-9, "atol": 1e-12}


def _weights_tol(model) -> dict:
    """For attention weights: transformers' eager attention takes its softmax in float32 in most
    models, whose rounding differs by a unit in the last place between a padded batch and one
    row on some CPUs (their vector code depends on the row's length): 2^-26 at weights <= 1."""
    if next(model.parameters()).dtype != torch.float64:
        return _tol(model)
    return {"rtol": 1e-6, "atol": 1e-7}


def test_batch_is_padded_both_ways(archs):
    """The matrix's premise: the batch has padding on the source and on the target side."""
    for name in ("gpt2", "bart"):
        batch = _arch(archs, name).batch
        assert not batch.source_mask.all() and not batch.target_mask.all()
        assert batch.source_mask[0].sum() != batch.source_mask[1].sum()


@pytest.mark.parametrize("name", NAMES)
def test_gradient_path_equals_per_step_reference(archs, name):
    """Signed gradients of every step in one pass = one plain autograd run per row and step."""
    a = _arch(archs, name)
    out = saliency(a.model, a.batch, abs=False, attribute_target=True)
    enc_dec = a.model.config.is_encoder_decoder
    for b in range(len(a.batch)):
        src = a.batch.source_ids[b][a.batch.source_mask[b]]
        tgt = a.batch.target_ids[b][a.batch.target_mask[b]]
        for k in range(len(tgt)):
            with eager_experts(a.model):  # float64 MoE: grouped_mm has no float64 kernel
                _, _, gs, gp = step_gradient(a.model, src, tgt, k, a.batch.decoder_start_id, probability)
            torch.testing.assert_close(out.source[b, k][a.batch.source_mask[b]], gs, **_tol(a.model))
            torch.testing.assert_close(out.target[b, k, :k], gp[1:] if enc_dec else gp, **_tol(a.model))
            assert torch.all(out.target[b, k, k:] == 0)
        assert torch.all(out.source[b, len(tgt):] == 0)
    assert out.source.abs().amax() > 0


def _attention_reference(name, model, src, tgt, start_id):
    """`output_attentions=True` of an eager copy of the model, one unpadded row, no fnattr."""
    ref = copy.deepcopy(model)
    if name in LEGACY_ATTENTION:  # no set_attn_implementation; Falcon reads its config at each call
        ref.config._attn_implementation_internal = "eager"
    else:
        ref.set_attn_implementation("eager")
    with torch.no_grad(), eager_experts(ref):
        if model.config.is_encoder_decoder:
            dec = torch.cat([torch.tensor([start_id]), tgt[:-1]])
            return ref(input_ids=src[None], decoder_input_ids=dec[None], output_attentions=True)
        return ref(input_ids=torch.cat([src, tgt[:-1]])[None], output_attentions=True)


@pytest.mark.parametrize("name", NAMES)
def test_attention_equals_output_attentions(archs, name):
    a = _arch(archs, name)
    before = snapshot(a.model)
    out = attention(a.model, a.batch, attribute_target=True)
    assert_unchanged(a.model, before)
    enc_dec = a.model.config.is_encoder_decoder
    for b in range(len(a.batch)):
        cols = a.batch.source_mask[b]
        src, tgt = a.batch.source_ids[b][cols], a.batch.target_ids[b][a.batch.target_mask[b]]
        ref = _attention_reference(name, a.model, src, tgt, a.batch.decoder_start_id)
        layers = ref.cross_attentions if enc_dec else ref.attentions
        assert len(layers) == out.source.shape[3] == 2
        for k in range(len(tgt)):
            for layer in range(2):
                if enc_dec:
                    want_src = ref.cross_attentions[layer][0, :, k, :]
                    want_tgt = ref.decoder_attentions[layer][0, :, k, 1:k + 1]
                else:
                    row = ref.attentions[layer][0, :, len(src) - 1 + k]
                    want_src, want_tgt = row[:, :len(src)], row[:, len(src):len(src) + k]
                torch.testing.assert_close(out.source[b, k, cols, layer], want_src.T.to(out.source.dtype),
                                           **_weights_tol(a.model))
                torch.testing.assert_close(out.target[b, k, :k, layer], want_tgt.T.to(out.source.dtype),
                                           **_weights_tol(a.model))
    assert torch.isfinite(out.source).all() and out.source.amax() > 0


def _check_cell(a: Arch, method: str, out) -> None:
    batch = a.batch
    n, n_tgt, n_src = len(batch), batch.target_ids.shape[1], batch.source_ids.shape[1]
    assert out.source.shape[:3] == (n, n_tgt, n_src), out.source.shape
    assert len(out.extra_dims) == out.source.ndim - 3
    for field in (out.source, out.target, out.delta, *out.step_scores.values()):
        assert field is None or torch.isfinite(field).all()
    pad_src = ~batch.source_mask
    assert torch.all(out.source.transpose(1, 2)[pad_src] == 0)  # padding scores exactly 0
    assert torch.all(out.source[~batch.target_mask] == 0)  # and so do padding steps
    assert out.source.abs().amax() > 0
    prob = out.step_scores["probability"]
    assert torch.all((prob > 0)[batch.target_mask]) and torch.all(prob[~batch.target_mask] == 0)


def _alone(a: Arch, method: str, out, kwargs: dict) -> None:
    """Row 1 run alone (no padding) gives the scores it has in the padded batch."""
    one = METHODS[method](a.model, a.batch.select([1]), **kwargs)
    n_tgt = one.target_ids.shape[1]
    cols = a.batch.source_mask[1]
    tol = {"rtol": 1e-7, "atol": 1e-10} if _tol(a.model)["rtol"] < 1e-6 else {"rtol": 2e-3, "atol": 1e-5}
    if method == "attention":
        tol = _weights_tol(a.model) if _tol(a.model)["rtol"] < 1e-6 else tol
    got = out.source[1, :n_tgt][:, cols]
    if method == "value_zeroing" and out.extra_dims == ("layer", "query"):
        got = got[..., cols]
    torch.testing.assert_close(got, one.source[0], **tol)


CELLS = [(name, method) for name in NAMES for method in METHODS]


@pytest.mark.parametrize("name,method", CELLS, ids=[f"{n}-{m}" for n, m in CELLS])
def test_every_method_on_every_architecture(archs, name, method):
    a = _arch(archs, name)
    kwargs = CHEAP.get(method, {})
    before = snapshot(a.model)
    if (name, method) in UNSUPPORTED:
        with pytest.raises((ValueError, TypeError), match=UNSUPPORTED[name, method]):
            METHODS[method](a.model, a.batch, **kwargs)
        assert_unchanged(a.model, before)
        return
    out = METHODS[method](a.model, a.batch, **kwargs)
    assert_unchanged(a.model, before)
    _check_cell(a, method, out)
    if method in ALONE and (name, method) not in APPROXIMATE:
        _alone(a, method, out, kwargs)


MOE_CELLS = [(n, d, m) for n in MOE for d in dtypes(n)[1:] for m in METHODS if (n, m) not in UNSUPPORTED]


@pytest.mark.parametrize("name,dtype,method", MOE_CELLS, ids=[f"{n}-{str(d)[6:]}-{m}" for n, d, m in MOE_CELLS])
def test_mixture_of_experts_in_lower_precision(archs, name, dtype, method):
    """MoE models run float64 above (experts run eagerly); float32 and bfloat16 (grouped_mm) too."""
    a = _arch(archs, name, dtype)
    before = snapshot(a.model)
    out = METHODS[method](a.model, a.batch, **CHEAP.get(method, {}))
    assert_unchanged(a.model, before)
    _check_cell(a, method, out)


@pytest.mark.parametrize("name", LEGACY_ATTENTION)
def test_value_zeroing_outside_the_attention_interface_equals_full_forwards(archs, name):
    """GPT-J, Bloom and Falcon: the one-pass replay equals one full forward per (layer, token,
    step) with the token's value zeroed."""
    a = _arch(archs, name)
    out = value_zeroing(a.model, a.batch, attribute_target=True)
    assert out.source.abs().amax() > 0 and out.target.abs().amax() > 0
    _check_against_reference(a.model, a.batch, out, "cosine")


def _value_slices(name: str, attn) -> tuple[str, callable]:
    """Independent of fnattr: the projection and the value slice of (token j, head h) in its output,
    written from each model's `_split_heads` / `_reshape`."""
    hd = attn.head_dim
    if name == "gptj":
        return "v_proj", lambda out, j, h: out.view(*out.shape[:2], -1, hd)[:, j, h]
    if name == "bloom" or not (attn.multi_query or attn.new_decoder_architecture):
        return "query_key_value", lambda out, j, h: out.view(*out.shape[:2], attn.num_heads, 3, hd)[:, j, h, 2]
    if attn.new_decoder_architecture:  # Falcon 40B: per key-value group, its queries, a key, a value
        per = attn.num_heads // attn.num_kv_heads + 2
        return "query_key_value", lambda out, j, h: out.view(*out.shape[:2], -1, per, hd)[:, j, h, -1]
    return "query_key_value", lambda out, j, h: out.view(*out.shape[:2], attn.num_heads + 2, hd)[:, j, -1]


FALCON_LAYOUTS = {"falcon-mha": {"multi_query": False},
                  "falcon-40b": {"new_decoder_architecture": True, "num_kv_heads": 2}}


@pytest.mark.parametrize("name", [*LEGACY_ATTENTION, *FALCON_LAYOUTS])
def test_value_zeroing_hook_zeroes_exactly_the_value_slice(archs, name):
    """fnattr's hook on the value projection = a test-local hook that writes 0 into the value slice
    of token j and head h (Falcon's default multi-query layout has one value head; its other two
    layouts are built here)."""
    if name in FALCON_LAYOUTS:
        model = build("falcon", 400, overrides=FALCON_LAYOUTS[name])
    else:
        model = _arch(archs, name).model
    attn = layer_attention(model)["decoder"][1][0]
    one_value_head = getattr(attn, "multi_query", False) and not attn.new_decoder_architecture
    layer, j, head = 1, 2, 0 if one_value_head else 1
    proj_name, slice_of = _value_slices(name, attn)
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    block = layer_stacks(model)["decoder"][layer]

    def state(**hooks):
        seen = []
        h1 = block.register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
        h2 = getattr(attn, proj_name).register_forward_hook(hooks["proj"]) if hooks else None
        try:
            with torch.no_grad():
                model(input_ids=ids)
        finally:
            h1.remove()
            if h2 is not None:
                h2.remove()
        return seen[0]

    def by_hand(module, args, output):
        output = output.clone()
        slice_of(output, j, head).zero_()
        return output

    clean, want = state(), state(proj=by_hand)
    with zeroed_values(model, [layer], [head]) as vz:
        vz.zero(torch.nn.functional.one_hot(torch.tensor([j]), 5).bool())
        got = state()
    assert vz.calls[layer] == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, clean)
    torch.testing.assert_close(got[:, :j], clean[:, :j], rtol=0, atol=0)  # causal: earlier positions


@pytest.mark.parametrize("name", ["bloom", "gemma2"])
def test_padded_rows_stay_finite_in_float64(archs, name):
    """The model's own padded forward gives NaN on the left-padded row in float64 (a float32
    softmax of a float64 mask); under `finite_masks` the row equals its unpadded forward."""
    a = _arch(archs, name)
    batch, model = a.batch, a.model
    ids = torch.cat([batch.source_ids, batch.target_ids], 1)
    mask = torch.cat([batch.source_mask, batch.target_mask], 1).long()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.isfinite(plain[1]).all()  # the premise: the model's own result
        with finite_masks(model):
            fixed = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, mask[1].bool()]).logits
    # their float32 softmax rounds differently at another row length on some CPUs
    torch.testing.assert_close(fixed[1, mask[1].bool()], alone[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fixed[0], plain[0], rtol=0, atol=0)  # the unpadded row: untouched


_OPEN = pytest.mark.xfail(strict=True, reason="open: DeepLIFT's rules pair input and reference rows, "
                          "which an expert layer regroups by expert (APPROXIMATE in tests/architectures.py)")


@pytest.mark.parametrize("name", ["llama", *(pytest.param(n, marks=_OPEN) for n in MOE)])
def test_deeplift_is_complete_on_mixture_of_experts(archs, name):
    """Completeness (sum of scores = f(x) - f(ref)) holds on Llama, and not yet inside experts."""
    a = _arch(archs, name)
    out = deeplift(a.model, a.batch)
    assert out.delta.abs().max() < 1e-6 * out.source.abs().max()


@pytest.mark.parametrize("name", MOE)
def test_float64_experts_run_eagerly_inside_a_method_only(archs, name):
    """grouped_mm has no float64 kernel: the model alone fails; a method runs its experts eagerly
    and gives the setting back."""
    a = _arch(archs, name)
    assert a.model.config._experts_implementation == "grouped_mm"
    with pytest.raises(RuntimeError, match="Double"), torch.no_grad():
        a.model(input_ids=a.batch.source_ids)
    assert torch.isfinite(saliency(a.model, a.batch).source).all()
    assert a.model.config._experts_implementation == "grouped_mm"
    hooks = [dict(m._forward_pre_hooks) for m in a.model.modules()]

    def boom(logits, target_ids):
        assert a.model.config._experts_implementation == "eager"  # inside the float64 contexts
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        saliency(a.model, a.batch, boom)
    assert a.model.config._experts_implementation == "grouped_mm"
    assert [dict(m._forward_pre_hooks) for m in a.model.modules()] == hooks  # finite_masks' hooks gone


@pytest.mark.parametrize("name", MOE)
def test_float64_experts_run_eagerly_outside_methods_too(archs, name):
    """The forwards fnattr runs outside a method (a contrast, a continued target prefix) also
    run float64 experts eagerly, and give the setting back."""
    from fnattr import targets
    from fnattr.contrast import prepare_contrast

    a = _arch(archs, name)
    before = snapshot(a.model)
    contrast = prepare_contrast(a.model, a.tok, a.batch, contrast_targets=[" Rome.", " sat in a park"],
                                contrast_targets_alignments="auto",
                                contrast_context="own")
    assert torch.isfinite(contrast.logits).all()
    out = saliency(a.model, a.batch, targets.contrast_prob_diff(contrast))
    assert torch.isfinite(out.source).all()
    cont = prepare(a.model, a.tok, SOURCES[:1], [" Paris"], max_new_tokens=2,
                   generate_from_target_prefix=True)
    assert cont.target_ids.shape[1] >= 1
    assert a.model.config._experts_implementation == "grouped_mm"
    assert_unchanged(a.model, before)


def test_experts_are_found_by_the_config_they_read(archs):
    """Generic detection: experts whose `config` is an object of their own (not the model's nor
    a sub-config) are switched too, and restored."""
    from fnattr.hooks.attention import eager_experts

    a = _arch(archs, "olmoe")
    model = copy.deepcopy(a.model)
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert experts
    for m in experts:
        m.config = copy.copy(m.config)  # its own object, unreachable from model.config
    with pytest.raises(RuntimeError, match="Double"), torch.no_grad():
        model(input_ids=a.batch.source_ids)
    with eager_experts(model), torch.no_grad():
        assert all(m.config._experts_implementation == "eager" for m in experts)
        assert torch.isfinite(model(input_ids=a.batch.source_ids).logits).all()
    assert all(m.config._experts_implementation == "grouped_mm" for m in experts)


@pytest.mark.parametrize("name", ["bloom", "gemma2"])
def test_generation_of_a_padded_row_equals_it_alone(archs, name):
    a = _arch(archs, name)
    both = prepare(a.model, a.tok, SOURCES, max_new_tokens=4)
    alone = prepare(a.model, a.tok, SOURCES[1], max_new_tokens=4)
    assert both.target_ids[1].tolist() == alone.target_ids[0].tolist()
    assert torch.isfinite(saliency(a.model, both).source).all()


@pytest.mark.parametrize("method", [saliency, occlusion, METHODS["lime"]], ids=["saliency", "occlusion", "lime"])
def test_a_nan_weight_raises_with_rows_and_steps(archs, method):
    """No silent NaN: a NaN in the input embedding of a token only row 1 reads makes the call
    raise, naming row 1 and its steps, and the model comes back unchanged. (Llama: its output
    layer is not tied to the input embeddings, so row 0's logits stay finite.) LIME says so
    before its solver (which died with "false INTERNAL ASSERT FAILED" on NaN scores)."""
    a = _arch(archs, "llama")
    model = copy.deepcopy(a.model)
    token = int(a.batch.source_ids[1][a.batch.source_mask[1]][-1])
    assert token not in a.batch.source_ids[0].tolist() + a.batch.target_ids[0].tolist()
    assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    before = snapshot(model)
    steps = list(range(int(a.batch.target_mask[1].sum())))
    with pytest.raises(FloatingPointError, match=re.escape(f"row 1 at steps {steps}") + ".*own output") as err:
        method(model, a.batch)
    assert "row 0" not in str(err.value)
    after = snapshot(model)  # NaN != NaN: parameters compared with equal_nan
    for key in before["params"]:
        torch.testing.assert_close(after["params"][key], before["params"][key], rtol=0, atol=0, equal_nan=True)
    assert {k: v for k, v in after.items() if k not in ("params", "grads")} == {
        k: v for k, v in before.items() if k not in ("params", "grads")}


def test_decoder_start_from_the_generation_config(archs):
    """A config without `decoder_start_token_id` falls back to the generation config's."""
    a = _arch(archs, "bart")
    model = copy.deepcopy(a.model)
    model.generation_config.decoder_start_token_id = model.config.decoder_start_token_id
    model.config.decoder_start_token_id = None
    batch = prepare(model, a.tok, SOURCES, TARGETS)
    assert batch.decoder_start_id == a.batch.decoder_start_id == 2
    torch.testing.assert_close(saliency(model, batch).source, saliency(a.model, a.batch).source,
                               rtol=0, atol=0)
    model.generation_config.decoder_start_token_id = None
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        prepare(model, a.tok, SOURCES, TARGETS)


def test_readme_supported_models_table_matches_the_matrix():
    table = supported_table(tuple(METHODS))
    assert len(NAMES) >= 20 and set(MOE) <= set(NAMES)
    assert table in README.read_text(), "docs/models.md's Supported models table is stale; it should be:\n" + table
