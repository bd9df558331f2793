"""Issue 24.2: several methods' faithfulness in shared forwards equals each method's alone."""

import dataclasses

import pytest
import torch

from fnattr import prepare
from fnattr.evaluate.shared import faithfulness_many
from fnattr.evaluate import faithfulness
from fnattr.methods import METHODS
from tests.conftest import _get

SOURCES, TARGETS = ["The cat sat", "A dog ran in the"], [" on the", " park."]
OPTS = {"integrated_gradients": {"n_steps": 4}}
FAITH = {"fractions": (0.2, 0.5), "curve_levels": 4, "n_random": 3, "seed": 2}


@pytest.fixture(scope="module")
def setup(request):
    model, tok = _get(request, "gpt2")
    batch = prepare(model, tok, SOURCES, TARGETS)
    outs = {m: METHODS[m](model, batch, **OPTS.get(m, {}))
            for m in ("saliency", "integrated_gradients", "occlusion", "attention")}
    # a result without target scores ranks fewer tokens: it is scored in a forward set of its own
    outs["source_only"] = METHODS["input_x_gradient"](model, batch, attribute_target=False)
    return model, batch, outs


@pytest.mark.parametrize("removal", ["mask", "auto"])
def test_shared_scoring_equals_each_method_alone(setup, removal):
    """Equal to float64 rounding: a copy's forward depends on its chunk-mates in the last bit
    (decoder-only copies run from the clean prefix's cache, in chunks that start at the chunk's
    earliest change, `fnattr.methods._prefix`; 4e-19 on a value of 1e-3 here)."""
    model, batch, outs = setup
    shared = faithfulness_many(model, batch, outs, removal=removal, **FAITH)
    assert list(shared) == list(outs)
    rows_alone = 0
    for name, out in outs.items():
        alone = faithfulness(model, batch, out, removal=removal, **FAITH)
        rows_alone += int(alone.meta["forward_rows"])
        for field in dataclasses.fields(alone):
            a, b = getattr(alone, field.name), getattr(shared[name], field.name)
            if not isinstance(a, torch.Tensor):
                continue
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15, msg=f"{name} {field.name}")
        assert {k: v for k, v in shared[name].meta.items() if k not in ("forward_rows", "forwards", "shared_with")} \
            == {k: v for k, v in alone.meta.items() if k not in ("forward_rows", "forwards")}
    # the four methods with target scores share one set of forwards (their random copies once)
    groups = {f.meta["shared_with"] for f in shared.values()}
    assert groups == {"saliency,integrated_gradients,occlusion,attention", "source_only"}
    rows_shared = sum(int(shared[n].meta["forward_rows"]) for n in ("saliency", "source_only"))
    assert rows_shared < rows_alone
    # chance: the same random copies for every method of a group, so one chance row
    for k in ("comprehensiveness", "insertion"):
        chance = [shared[n].per_example(k, random=True) for n in ("saliency", "occlusion", "attention")]
        assert all(torch.equal(c, chance[0]) for c in chance)


def test_compare_shows_one_chance_row(setup):
    from fnattr.evaluate.compare_views import _chance_rows
    from fnattr.compare import compare_methods, table

    model, batch, _ = setup
    comp = compare_methods(model, None, batch, ["saliency", "occlusion", "attention"], n_boot=20,
                           **{k: v for k, v in FAITH.items() if k != "seed"})
    assert _chance_rows(comp, comp.metrics) == ["saliency"]
    assert comp.results["saliency"].meta["shared_with"] == "saliency,occlusion,attention"
    from rich.console import Console
    console = Console(width=200, record=True)
    console.print(table(comp))
    text = console.export_text()
    rows = [line for line in text.splitlines() if "│ chance" in line]
    assert len(rows) == 1 and "chance (" not in text, text
