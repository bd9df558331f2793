import pytest
import torch

from fnattr import engine, prepare
from fnattr.hooks import embedding_hooks, frozen
from fnattr.targets import logprob


def _grads(model, batch, via: bool):
    with frozen(model), embedding_hooks(model) as handle:
        emb = engine.embed(handle, batch)
        src = emb.source.clone().requires_grad_()
        tgt = emb.target.clone().requires_grad_()
        out = engine.run(model, batch, handle, src, tgt, emb.start)
        steps = torch.arange(batch.target_ids.shape[1])
        scores = engine.score_steps(logprob, out.logits, batch, steps)
        assert out.hidden is not None and out.hidden.shape[1] - out.offset == out.logits.shape[1]
        return engine.step_gradients(scores, [src, tgt], out.at(steps) if via else None)


@pytest.mark.parametrize("copies", [1, 3, 1000])
def test_starting_at_the_output_layer_and_grouping_steps_change_nothing(any_model, monkeypatch, copies):
    model, tok = any_model
    batch = prepare(model, tok, ["The capital of France is", "A dog"], [" Paris is a city", " ran"])
    plain = _grads(model, batch, via=False)
    monkeypatch.setattr(engine, "CPU_COPIES_PER_BACKWARD", copies)
    fast = _grads(model, batch, via=True)
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)
    assert plain[0].abs().sum() > 0


def test_loop_fallback_when_batched_backward_fails(gpt2, monkeypatch):
    model, tok = gpt2
    batch = prepare(model, tok, ["A dog"], [" ran in the park"])
    want = _grads(model, batch, via=True)
    real_grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("vmap: not supported here")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    with pytest.warns(UserWarning, match="one backward per step"):
        got = _grads(model, batch, via=True)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
