"""Step functions against references computed by hand from logits."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from fnattr import targets
from fnattr.contrast import Contrast

B, T, V = 2, 5, 11


def _logits(seed: int = 0, rows: int = B) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, T, V, generator=g, dtype=torch.float64) * 3


def _ids(seed: int = 1, rows: int = B) -> torch.Tensor:
    return torch.randint(0, V, (rows, T), generator=torch.Generator().manual_seed(seed))


def _contrast(rows: int = B) -> Contrast:
    return Contrast(logits=_logits(7, rows), ids=_ids(8, rows), target_ids=_ids(1, rows),
                    alignments=tuple(tuple((t, t) for t in range(T)) for _ in range(rows)))


def _loop(fn):
    """Reference: apply `fn(logit_vector, target_id)` to every (row, step) with Python loops."""
    def ref(logits, ids):
        return torch.tensor([[fn(logits[b, t], int(ids[b, t])) for t in range(T)]
                             for b in range(logits.shape[0])], dtype=torch.float64)
    return ref


def _top_p_size(z, y, top_p=0.9):
    probs = sorted(torch.softmax(z, -1).tolist(), reverse=True)
    total = 0.0
    for n, p in enumerate(probs, 1):
        total += p
        if total >= top_p:
            return n
    return len(probs)


REFERENCES = {
    "probability": _loop(lambda z, y: math.exp(z[y]) / sum(math.exp(v) for v in z.tolist())),
    "logprob": _loop(lambda z, y: float(z[y] - torch.logsumexp(z, 0))),
    "logit": _loop(lambda z, y: float(z[y])),
    "entropy": lambda z, y: torch.distributions.Categorical(logits=z).entropy(),
    "crossentropy": lambda z, y: F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none")
    .view(y.shape),
    "perplexity": _loop(lambda z, y: 1 / torch.softmax(z, -1)[y].item()),
    "top_p_size": _loop(_top_p_size),
}


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_builtin_equals_hand_reference(name):
    logits, ids = _logits(), _ids()
    torch.testing.assert_close(targets.TARGETS[name](logits, ids), REFERENCES[name](logits, ids))


def test_sequence_perplexity_is_exp_of_mean_nll():
    logits, ids = _logits(), _ids()
    nll = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(B, T)
    per_step = targets.perplexity(logits, ids)
    torch.testing.assert_close(per_step.log().mean(1).exp(), nll.mean(1).exp())


def test_top_p_size_options_and_extremes():
    logits, ids = _logits(), _ids()
    assert torch.all(targets.top_p_size(logits, ids, top_p=1.0) <= V)
    assert torch.all(targets.top_p_size(logits, ids, top_p=1e-9) == 1)
    half = functools.partial(targets.top_p_size, top_p=0.5)
    torch.testing.assert_close(half(logits, ids), _loop(lambda z, y: _top_p_size(z, y, 0.5))(logits, ids))
    with pytest.raises(ValueError, match="top_p"):
        targets.top_p_size(logits, ids, top_p=0.0)


def _all_functions():
    c = _contrast()
    return {**targets.TARGETS, **{n: f(c) for n, f in targets.CONTRAST_TARGETS.items()},
            "kl_top_k": targets.kl_divergence(c, top_k=3),
            "kl_top_p": targets.kl_divergence(c, top_p=0.8)}


@pytest.mark.parametrize("name", sorted(_all_functions()))
def test_step_t_reads_only_step_t(name):
    """The engine's contract: changing step s's logits changes step s's score only."""
    fn, logits, ids = _all_functions()[name], _logits(), _ids()
    base = fn(logits, ids)
    assert base.shape == (B, T)
    for s in range(T):
        moved = logits.clone()
        moved[:, s] = moved[:, s].flip(-1) * 2
        changed = (fn(moved, ids) != base).any(0)
        assert not changed[torch.arange(T) != s].any()


def _softmax(z):
    return torch.softmax(z, -1)


def test_contrast_functions_equal_hand_reference():
    c, logits, ids = _contrast(), _logits(), _ids()
    p = _softmax(logits).gather(-1, ids[..., None])[..., 0]
    p_c = _softmax(c.logits).gather(-1, c.ids[..., None])[..., 0]
    z = logits.gather(-1, ids[..., None])[..., 0]
    z_c = c.logits.gather(-1, c.ids[..., None])[..., 0]
    expected = {"contrast_prob_diff": p - p_c, "contrast_logits_diff": z - z_c,
                "contrast_prob": p_c, "contrast_logits": z_c,
                "pcxmi": torch.log2(p) - torch.log2(p_c), "in_context_pvi": torch.log2(p / p_c),
                "kl_divergence": F.kl_div(c.logits.log_softmax(-1), logits.log_softmax(-1),
                                          log_target=True, reduction="none").sum(-1)}
    for name, factory in targets.CONTRAST_TARGETS.items():
        fn = factory(c)
        assert fn.__name__ == name
        torch.testing.assert_close(fn(logits, ids), expected[name], msg=name)


def _kept(z, top_k, top_p, min_keep):
    """inseq's `filter_logits` by hand on the logits `z` it filters by: top-p first (remove the
    tokens whose ascending cumulative probability is <= 1 - top_p, keep the `min_keep` most
    likely), then top-k among the kept logits (keep those >= the max(top_k, min_keep)-th)."""
    keep = set(range(V))
    if top_p < 1.0:
        p = _softmax(z).tolist()
        ascending = sorted(range(V), key=lambda v: p[v])
        cum, removed = 0.0, set()
        for i, v in enumerate(ascending):
            cum += p[v]
            if cum <= 1 - top_p and i < V - min_keep:
                removed.add(v)
        keep -= removed
    if top_k > 0:
        kept = sorted((float(z[v]) for v in keep), reverse=True)
        kth = kept[min(max(top_k, min_keep), len(kept)) - 1]
        keep = {v for v in keep if float(z[v]) >= kth}
    return keep


def _filtered_kl(z, z_c, top_k, top_p, min_keep=1, strategy="merged"):
    """KL of p, p' restricted to one kept set (chosen by z + z', z or z') and renormalised."""
    by = {"merged": z + z_c, "original": z, "contrast": z_c}[strategy]
    keep = _kept(by, top_k, top_p, min_keep)
    p, q = _softmax(z).tolist(), _softmax(z_c).tolist()
    sp, sq = sum(p[v] for v in keep), sum(q[v] for v in keep)
    return sum(p[v] / sp * math.log((p[v] / sp) / (q[v] / sq)) for v in keep)


@pytest.mark.parametrize("strategy", ["merged", "original", "contrast"])
@pytest.mark.parametrize(("top_k", "top_p", "min_keep"),
                         [(3, 1.0, 1), (0, 0.8, 1), (4, 0.5, 1), (1, 1.0, 1), (0, 0.05, 3),
                          (2, 0.3, 4)])
def test_kl_divergence_filtering_equals_hand_reference(top_k, top_p, min_keep, strategy):
    c, logits, ids = _contrast(), _logits(), _ids()
    fn = targets.kl_divergence(c, top_k=top_k, top_p=top_p, min_tokens_to_keep=min_keep,
                               filter_strategy=strategy)
    got = fn(logits, ids)
    want = torch.tensor([[_filtered_kl(logits[b, t], c.logits[b, t], top_k, top_p, min_keep, strategy)
                          for t in range(T)] for b in range(B)], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    assert torch.isfinite(got).all() and (got >= -1e-12).all()
    if (top_k, top_p, min_keep) == (1, 1.0, 1):  # one token for both sides: both renormalise to 1
        assert torch.all(got == 0)
    elif strategy == "merged":  # the default; one kept set differs from filtering by p alone
        assert torch.equal(got, targets.kl_divergence(c, top_k=top_k, top_p=top_p,
                                                      min_tokens_to_keep=min_keep)(logits, ids))
        alone = targets.kl_divergence(c, top_k=top_k, top_p=top_p, min_tokens_to_keep=min_keep,
                                      filter_strategy="original")(logits, ids)
        assert (got - alone).abs().max() > 1e-3


def test_kl_divergence_rejects_unknown_filter_strategy():
    with pytest.raises(ValueError, match="filter_strategy"):
        targets.kl_divergence(_contrast(), top_k=2, filter_strategy="union")


def test_kl_divergence_gradient_is_finite_with_filtering():
    logits = _logits().requires_grad_()
    targets.kl_divergence(_contrast(), top_k=2)(logits, _ids()).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_constant_contrast_scores_have_zero_gradient():
    logits = _logits().requires_grad_()
    targets.contrast_prob(_contrast())(logits, _ids()).sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_at_rows_selects_the_contrast_of_each_copy():
    c, logits = _contrast(), _logits(3, rows=5)
    rows = torch.tensor([1, 0, 1, 1, 0])
    fn = targets.contrast_prob_diff(c)
    got = fn.at_rows(rows)(logits, c.target_ids[rows])
    for i, r in enumerate(rows.tolist()):
        one = targets.contrast_prob_diff(Contrast(c.logits[r:r + 1], c.ids[r:r + 1],
                                                  c.target_ids[r:r + 1], c.alignments[r:r + 1]))
        torch.testing.assert_close(got[i:i + 1], one(logits[i:i + 1], c.target_ids[r:r + 1]))


def test_copies_without_rows_are_a_clear_error_and_one_row_broadcasts():
    c = _contrast()
    fn = targets.contrast_prob_diff(c)
    with pytest.raises(ValueError, match=r"at_rows\(rows\)"):
        fn(_logits(rows=4), c.target_ids.repeat(2, 1))
    with pytest.raises(ValueError, match="not those rows"):
        fn(_logits(), c.target_ids.flip(0))
    one = targets.contrast_prob_diff(Contrast(c.logits[:1], c.ids[:1], c.target_ids[:1],
                                              c.alignments[:1]))
    logits = _logits(rows=3)
    got = one(logits, c.target_ids[:1].expand(3, -1))
    torch.testing.assert_close(got, torch.cat([one(logits[i:i + 1], c.target_ids[:1])
                                               for i in range(3)]))


def test_tables_are_read_only_and_validate_options():
    with pytest.raises(TypeError):
        targets.TARGETS["mine"] = targets.logit
    with pytest.raises(ValueError, match="top_k"):
        targets.kl_divergence(_contrast(), top_k=-1)
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        targets.kl_divergence(_contrast(), min_tokens_to_keep=0)
    with pytest.raises(TypeError, match="logprob"):
        targets.contrast_prob_diff(_contrast(), logprob="yes")


@pytest.mark.parametrize("scale", [0.1, 2.0, 8.0], ids=["flat", "mid", "peaked"])
def test_top_p_size_on_a_large_vocabulary(scale):
    """Large vocabularies take the widening top-k path: same nucleus as a full sort."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5000, generator=g, dtype=torch.float64) * scale
    ids = torch.zeros(2, 3, dtype=torch.long)
    for top_p in (0.5, 0.95):
        got = targets.top_p_size(logits, ids, top_p=top_p)
        cum = torch.softmax(logits, -1).sort(-1, descending=True).values.cumsum(-1)
        want = (cum < top_p).sum(-1) + 1  # tokens before the mass reaches top_p, plus that one
        torch.testing.assert_close(got, want.to(got.dtype))
