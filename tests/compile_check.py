"""Run by tests/test_compile.py in a fresh interpreter: torch.compile (dynamo) cannot trace
through jaxtyping's import-hook instrumentation that the test session turns on, and users
compiling a model do not run under it. Exits non-zero when the compiled scores differ."""

import sys
import warnings

import torch

from fnattr import prepare
from fnattr.methods import integrated_gradients, saliency
from tests.conftest import _build, _tokenizer
from tests.state import assert_unchanged, snapshot


def compare(sources: list[str], targets: list[str]) -> float:
    tok = _tokenizer("<s> $A")
    model = _build("gpt2", len(tok))
    batch = prepare(model, tok, sources, targets)
    eager = [saliency(model, batch), integrated_gradients(model, batch, n_steps=3)]
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled = torch.compile(model)
        got = [saliency(compiled, batch), integrated_gradients(compiled, batch, n_steps=3)]
    assert any("one backward per step" in str(w.message) for w in seen), "no fallback warning"
    assert_unchanged(model, before)
    return max(float((b.source - a.source).abs().max() / a.source.abs().max()) for a, b in zip(eager, got))


if __name__ == "__main__":
    padded = sys.argv[1:] == ["padded"]
    if padded:
        err = compare(["The capital of France is", "A dog"], [" Paris is", " ran in"])
    else:
        err = compare(["The capital of France is"], [" Paris is a city"])
    print(f"max rel diff compiled vs eager: {err:.1e}")
    sys.exit(0 if err < 1e-9 else 1)
