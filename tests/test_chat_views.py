"""Issue 24.4: a chat run's table, HTML and PNG hide the template's tokens unless asked."""

import io
import json

import pytest

import fnattr
from fnattr import render, views
from tests.conftest import _get

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@pytest.fixture
def chat_out(request):
    model, tok = _get(request, "gpt2")
    old = getattr(tok, "chat_template", None)
    tok.chat_template = TEMPLATE
    try:
        yield fnattr.attribute(model, tok, "The cat sat", " on the", method="saliency", chat=True,
                               system="Be brief.")
    finally:
        tok.chat_template = old


def test_template_tokens_hidden_by_default_shown_on_request(chat_out):
    out = chat_out
    template = json.loads(out.meta["template"])[0]
    assert template  # the template wrote tokens: role names, markers, the system turn
    real = out.source_mask[0].nonzero().flatten().tolist()
    user = [i for i in real if i not in template]
    hm = views.heatmap(out)
    assert hm.n_source == len(user) and hm.rows[:hm.n_source] == tuple(
        views.label(out.source_tokens[0][i]) for i in user)
    assert any("chat-template tokens hidden" in n for n in hm.notes)
    full = views.heatmap(out, show_template=True)
    assert full.n_source == len(real) and not any("chat-template" in n for n in full.notes)
    # the hidden rows are exactly the template's, which no method attributes (all 0)
    assert (out.source[0][:, template] == 0).all()

    text = io.StringIO()
    render.console(out, file=text)
    shown = io.StringIO()
    render.console(out, file=shown, show_template=True)
    assert "chat-template tokens hidden" in text.getvalue()
    assert len(shown.getvalue().splitlines()) - len(text.getvalue().splitlines()) == len(template) - 1
    assert render.html(out).count("<tr") < render.html(out, show_template=True).count("<tr")
    fig, fig_all = render.figure(out), render.figure(out, show_template=True)
    assert len(fig.axes[0].get_yticklabels()) < len(fig_all.axes[0].get_yticklabels())


def test_a_run_without_chat_hides_nothing(request):
    model, tok = _get(request, "gpt2")
    out = fnattr.attribute(model, tok, "The cat sat", " on the", method="saliency")
    assert "template" not in out.meta
    assert views.heatmap(out).n_source == int(out.source_mask[0].sum())
