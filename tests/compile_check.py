"""Run by tests/test_compile.py in a fresh interpreter: torch.compile (dynamo) cannot trace
through jaxtyping's import-hook instrumentation that the test session turns on, and users
compiling a model do not run under it. Exits non-zero when the compiled scores differ."""

import sys
import warnings

import torch

from fnattr import prepare
from fnattr.compiled import compile as compile_for_attribution
from fnattr.methods import _triangular, integrated_gradients, occlusion, saliency
from tests.conftest import _build, _tokenizer
from tests.state import assert_unchanged, snapshot


def compare(sources: list[str], targets: list[str]) -> float:
    """The largest relative difference of compiled saliency and IG from eager: on a CPU with
    the engine's one backward per step (its warning expected), then with the replicated rows
    that accelerators use (`_triangular.REPLICATE_ON_CPU`: no fallback, so no warning)."""
    tok = _tokenizer("<s> $A")
    model = _build("gpt2", len(tok))
    batch = prepare(model, tok, sources, targets)
    eager = [saliency(model, batch), integrated_gradients(model, batch, n_steps=3)]
    before = snapshot(model)
    compiled, errors = torch.compile(model), []
    for replicate in (False, True):
        _triangular.REPLICATE_ON_CPU = replicate
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = [saliency(compiled, batch), integrated_gradients(compiled, batch, n_steps=3)]
        fallback = any("one backward per step" in str(w.message) for w in seen)
        assert fallback != replicate, (replicate, [str(w.message) for w in seen])
        errors += [float((b.source - a.source).abs().max() / a.source.abs().max())
                   for a, b in zip(eager, got)]
    _triangular.REPLICATE_ON_CPU = False
    assert_unchanged(model, before)
    return max(errors)


# dynamo's count of graphs it traced: a recompile adds one
def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def reuse(kind: str, compiler) -> tuple[list[int], float]:
    """Graphs traced by each call of a method sequence on one compiled model (a 1-row batch,
    then a 2-row batch of another length), and the largest relative difference from eager."""
    tok = _tokenizer("<s> $A")
    model = _build(kind, len(tok))
    one = prepare(model, tok, ["The capital of France is"], [" Paris is a city"])
    two = prepare(model, tok, ["The cat sat on the mat", "A dog ran in the park"], [" It ran", " in the"])
    calls = [(saliency, one, {}), (integrated_gradients, one, {"n_steps": 3}), (occlusion, one, {}),
             (saliency, two, {}), (integrated_gradients, two, {"n_steps": 3}), (occlusion, two, {})]
    eager = [fn(model, batch, **kw) for fn, batch, kw in calls]
    torch._dynamo.reset()  # models of one class share dynamo's cache and its recompile limit
    compiled, traced, got = compiler(model), [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-step backward fallback
        for fn, batch, kw in calls:
            before = _graphs()
            got.append(fn(compiled, batch, **kw))
            traced.append(_graphs() - before)
    err = max(float((b.source - a.source).abs().max() / a.source.abs().max()) for a, b in zip(eager, got))
    return traced, err


if __name__ == "__main__":
    if sys.argv[1:2] == ["reuse"]:
        backend = sys.argv[3] if len(sys.argv) > 3 else "eager"
        helper, plain = (reuse(sys.argv[2], lambda m, c=c: c(m, backend=backend))
                         for c in (compile_for_attribution, torch.compile))
        print(f"graphs per call, fnattr.compiled.compile: {helper[0]} (max rel diff {helper[1]:.1e}); "
              f"torch.compile: {plain[0]} (max rel diff {plain[1]:.1e})")
        sys.exit(0 if helper[1] < 1e-9 and sum(helper[0]) <= 4 and not any(helper[0][3:]) else 1)
    padded = sys.argv[1:] == ["padded"]
    if padded:
        err = compare(["The capital of France is", "A dog"], [" Paris is", " ran in"])
    else:
        err = compare(["The capital of France is"], [" Paris is a city"])
    print(f"max rel diff compiled vs eager: {err:.1e}")
    sys.exit(0 if err < 1e-9 else 1)
