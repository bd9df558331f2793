import json

import pytest
import torch
from jaxtyping import TypeCheckError
from safetensors.torch import save_file

import fnattr
from fnattr import AttributionTensors, prepare
from fnattr.methods import integrated_gradients, saliency


def _assert_same(a: AttributionTensors, b: AttributionTensors) -> None:
    for name in ("source", "target", "steps", "source_ids", "target_ids", "source_mask",
                 "target_mask", "delta"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name  # bit-exact
    assert a.step_scores.keys() == b.step_scores.keys()
    for k in a.step_scores:
        assert torch.equal(a.step_scores[k], b.step_scores[k])
    assert (a.source_tokens, a.target_tokens, a.extra_dims, a.meta) == (
        b.source_tokens, b.target_tokens, b.extra_dims, b.meta)


def test_round_trip_bit_exact(any_model, tmp_path):
    model, tok = any_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris.", " ran"])
    out = integrated_gradients(model, batch, n_steps=4, step_scores=["logprob"])
    out.save(tmp_path / "ig.safetensors")
    _assert_same(out, fnattr.load(tmp_path / "ig.safetensors"))
    # a result without target side and delta, in float32
    small = saliency(model.float(), batch, attribute_target=False)
    model.double()
    fnattr.save(small, tmp_path / "s.safetensors")
    back = fnattr.load(tmp_path / "s.safetensors")
    _assert_same(small, back)
    assert back.target is None and back.source.dtype == torch.float32


def test_metadata_records_method_model_and_versions(gpt2, tmp_path):
    model, tok = gpt2
    out = integrated_gradients(model, prepare(model, tok, ["A dog"], [" ran"]), n_steps=3)
    assert out.meta["method"] == "integrated_gradients" and out.meta["target_fn"] == "probability"
    assert json.loads(out.meta["args"])["n_steps"] == 3
    assert {"torch", "transformers", "fnattr"} <= json.loads(out.meta["versions"]).keys()
    assert out.meta["model_class"] == "GPT2LMHeadModel"


def test_load_rejects_foreign_files(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an fnattr result"):
        fnattr.load(tmp_path / "other.safetensors")


def test_shapes_are_checked_at_run_time(gpt2):
    model, tok = gpt2
    out = saliency(model, prepare(model, tok, ["A dog"], [" ran"]))
    with pytest.raises(TypeCheckError):
        out.replace(source=out.source[:, :, :-1])  # src dim disagrees with source_ids
    with pytest.raises(TypeCheckError):
        out.replace(step_scores={"p": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="extra_dims"):
        out.replace(extra_dims=())


def test_frozen(gpt2):
    model, tok = gpt2
    out = saliency(model, prepare(model, tok, ["A dog"], [" ran"]))
    with pytest.raises(AttributeError):
        out.source = None  # type: ignore[misc]


def test_damaged_files_are_named(gpt2, tmp_path):
    model, tok = gpt2
    out = saliency(model, prepare(model, tok, ["A dog"], [" ran"]))
    out.save(tmp_path / "r.safetensors")
    assert fnattr.result.load_meta(tmp_path / "r.safetensors") == out.meta
    data = (tmp_path / "r.safetensors").read_bytes()
    for name, damaged in (("cut.safetensors", data[: len(data) - 16]), ("junk.safetensors", b"junk"),
                          ("empty.safetensors", b"")):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"{name}' is damaged or not an fnattr result"):
            fnattr.load(tmp_path / name)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.safetensors' is damaged"):
        fnattr.result.load_meta(tmp_path / "junk.safetensors")
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    header["__metadata__"]["meta"] = "{not json"
    raw = json.dumps(header).encode()
    (tmp_path / "meta.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw
                                                + data[8 + int.from_bytes(data[:8], "little"):])
    with pytest.raises(ValueError, match=r"meta\.safetensors' is damaged"):
        fnattr.load(tmp_path / "meta.safetensors")


def test_repr_and_notebook_html_of_a_real_result(gpt2):
    model, tok = gpt2
    out = saliency(model, prepare(model, tok, ["The cat <b>", "A dog"], [" sat", " ran"]))
    text = repr(out)
    assert text.startswith("AttributionTensors(method='saliency'") and "2x" in text
    assert "The cat <b>" in text and "-> ' sat'" in text and "-> ' ran'" in text
    page = out._repr_html_()
    assert "&lt;" in page and "<b>" not in page and page.count('class="fa"') == 2
