"""ContextCite (issue 27): the LASSO solver against closed forms (and the context-cite package's
solver where it is installed), and context_cite against a direct implementation on a hand-built
model where one document carries the answer."""

import importlib.util
import itertools
import math
import os

import pytest
import torch

from fnattr.batch import prepare
from fnattr.context import context_cite, lasso, surrogate
from fnattr.context.cite import ablation_masks
from fnattr.context.solver import spearman
from fnattr.targets import logprob
from tests.one_token_model import one_token_gpt2
from tests.state import assert_unchanged, snapshot

DOCS = "The cat sat on the mat.\n\nA dog ran in the park.\n\nParis is a city in France."


def _factorial(p: int) -> torch.Tensor:
    """The 2^p full factorial design in {0, 1}: its centred columns are orthogonal."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=p)), dtype=torch.float64)


def test_lasso_equals_soft_thresholding_on_an_orthogonal_design():
    x = _factorial(4)  # 16 x 4, centred columns orthogonal with variance 1/4
    w_true = torch.tensor([2.0, -1.0, 0.3, 0.0], dtype=torch.float64)
    y = 0.7 + x @ w_true + torch.tensor([0.01 * (-1) ** i for i in range(16)], dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean()
    rho = xc.T @ yc / len(y)
    for alpha in (0.0, 0.05, 0.2, 10.0):
        w, b = lasso(x, y, alpha)
        want = torch.sign(rho) * (rho.abs() - alpha).clamp(min=0) / 0.25
        torch.testing.assert_close(w, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(b, y.mean() - x.mean(0) @ want, rtol=0, atol=1e-10)
    w, _ = lasso(x, y, 0.0)  # no penalty: least squares
    ols = torch.linalg.lstsq(torch.cat([torch.ones(16, 1, dtype=torch.float64), x], 1), y[:, None]).solution
    torch.testing.assert_close(w, ols[1:, 0], rtol=0, atol=1e-10)
    batched, _ = lasso(x.expand(3, -1, -1), torch.stack([y, 2 * y, -y]), 0.05)  # a batch of problems
    for i, scale in enumerate((1, 2, -1)):
        torch.testing.assert_close(batched[i], lasso(x, scale * y, 0.05)[0], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="alpha"):
        lasso(x, y, -1.0)


def test_lasso_meets_its_optimality_conditions_on_random_masks():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(64, 6, generator=gen) < 0.5
    y = masks.double() @ torch.tensor([1.0, 0, 0, -0.5, 0, 0.02], dtype=torch.float64) \
        + 0.05 * torch.randn(64, generator=gen, dtype=torch.float64)
    alpha = 0.03
    w, b = lasso(masks.double(), y, alpha)
    grad = masks.double().T @ (y - b - masks.double() @ w) / 64  # KKT: |grad| <= alpha, = at w != 0
    assert (grad.abs() <= alpha + 1e-9).all()
    torch.testing.assert_close(grad[w != 0], alpha * torch.sign(w[w != 0]), rtol=0, atol=1e-9)
    assert w[1] == 0 and w[0] > 0.5  # sparse, and finds the real effect


def _package_solver():
    """context_cite 0.0.4's `solver.py`, loaded alone (its package imports nltk and spacy)."""
    spec = importlib.util.find_spec("context_cite")
    path = os.environ.get("CONTEXT_CITE_SOLVER") or (
        os.path.join(os.path.dirname(spec.origin), "solver.py") if spec and spec.origin else None)
    if path is None or not os.path.exists(path):
        pytest.skip("context-cite is not installed (a test-only reference)")
    pytest.importorskip("sklearn")
    module_spec = importlib.util.spec_from_file_location("_context_cite_solver", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.LassoRegression


def test_surrogate_equals_the_context_cite_package_on_the_same_masks():
    solver = _package_solver()
    masks = ablation_masks(64, 8, seed=1)
    gen = torch.Generator().manual_seed(1)
    outputs = masks.double() @ torch.linspace(-1, 2, 8, dtype=torch.float64) \
        + 0.1 * torch.randn(64, generator=gen, dtype=torch.float64)
    weight, bias = solver(lasso_alpha=0.01).fit(masks.numpy(), outputs.numpy(), 5)
    w, b = surrogate(masks, outputs, 5, 0.01)
    # the package fits in float32 and scikit-learn stops at its tolerance; ours converges further
    torch.testing.assert_close(w, torch.as_tensor(weight, dtype=torch.float64), rtol=0, atol=2e-4)
    assert abs(float(b) - float(bias)) < 2e-4


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert spearman(a, a ** 3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64)) == pytest.approx(
        0.8944271909999159)
    assert math.isnan(spearman(a, torch.ones(4, dtype=torch.float64)))


@pytest.fixture(scope="module")
def answer_model():
    """The one-token GPT-2 whose only non-zero output logit is the answer's, and that only when
    "Paris" (in the third document) is in the prompt: log p(answer) depends on that document."""
    from tests.conftest import _tokenizer

    tok = _tokenizer("<s> $A")
    answer = tok(" city", add_special_tokens=False)["input_ids"]
    model = one_token_gpt2(len(tok), tok.convert_tokens_to_ids("Paris"))
    with torch.no_grad():
        keep = model.lm_head.weight[answer[0]].clone()
        model.lm_head.weight.zero_()
        model.lm_head.weight[answer[0]] = keep
    return model, tok


def _direct(model, batch, masks):
    """ContextCite by hand: for every mask, the prompt with the removed documents' tokens deleted,
    one plain forward with the target, log p(target) -> logit."""
    src = batch.source_ids[0, batch.source_mask[0]].tolist()
    groups = batch.source_groups[0, batch.source_mask[0]].tolist()
    tgt = batch.target_ids[0, batch.target_mask[0]].tolist()
    outs = []
    for keep in masks.tolist():
        ids = [t for t, g in zip(src, groups) if g < 0 or keep[g]] + tgt
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -len(tgt) - 1:-1]
        lp = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(tgt)[:, None]).sum()
        outs.append(lp - torch.log(-torch.expm1(lp)))
    return torch.stack(outs)


def test_context_cite_equals_a_direct_implementation_and_finds_the_document(answer_model):
    model, tok = answer_model
    batch = prepare(model, tok, [DOCS], [" city"], groups="documents")
    assert len(batch.source_group_texts[0]) == 3
    before = snapshot(model)
    out = context_cite(model, batch, n_ablations=32, n_heldout=16, seed=0, spans="all")
    assert_unchanged(model, before)
    masks = ablation_masks(48, 3, seed=0)
    direct = _direct(model, batch, masks)
    w, b = surrogate(masks[:32], direct[:32], 1, 0.01)
    torch.testing.assert_close(out.source[0, 0], w, rtol=0, atol=1e-8)
    assert out.source_tokens[0] == ("The cat sat on the mat.", "A dog ran in the park.",
                                    "Paris is a city in France.")
    assert out.target_tokens == ((" city",),) and out.steps.tolist() == [0]
    assert int(out.source[0, 0].abs().argmax()) == 2 and out.source[0, 0, 2] > 0.3
    # the others are negative: without them the key is one of fewer positions (logit 16 / n)
    assert out.source[0, 0, 2] > 3 * out.source[0, 0, :2].abs().max()
    lds = eval(out.meta["lds"])  # noqa: S307 - JSON of numbers
    assert lds[0][0] > 0.8  # the surrogate predicts held-out ablations
    assert out.citations(k=1)[0].sources[0][1] == "Paris is a city in France."


def test_context_cite_batch_equals_rows_alone_and_spans(answer_model):
    model, tok = answer_model
    texts = [DOCS, "Rome is a city.\n\nParis is a city in France."]
    batch = prepare(model, tok, texts, [" city. A city", " city"], groups="documents")
    both = context_cite(model, batch, n_ablations=16, n_heldout=4, seed=3)
    assert both.target_tokens[0] == (" city.", "A city") and both.target_mask[1].tolist() == [True, False]
    for r in range(2):
        alone = context_cite(model, batch.select([r]), n_ablations=16, n_heldout=4, seed=3)
        n = int(alone.source_mask[0].sum())
        m = int(alone.target_mask[0].sum())
        torch.testing.assert_close(both.source[r, :m, :n], alone.source[0, :m, :n], rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="groups="):
        context_cite(model, prepare(model, tok, [DOCS], [" city"]))
    with pytest.raises(ValueError, match="n_ablations"):
        context_cite(model, batch, n_ablations=1)


def test_context_cite_with_baseline_ablation_and_identity_link(answer_model):
    model, tok = answer_model
    batch = prepare(model, tok, [DOCS], [" city"], groups="documents")
    out = context_cite(model, batch, logprob, n_ablations=16, n_heldout=0, ablation="baseline",
                       link="identity", spans="all")
    assert out.meta["baseline"] and out.meta["lds"] == "[[]]"
    assert int(out.source[0, 0].abs().argmax()) == 2
