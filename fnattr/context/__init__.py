"""Context attribution: which parts of the prompt (documents, sentences, chat turns) a generation
relies on. `context_cite` (ContextCite), `pecore` (PECoRe), `citations`; `lasso` the solver."""

from fnattr.context.cite import context_cite as context_cite
from fnattr.context.citations import citations as citations
from fnattr.context.lasso import lasso as lasso
from fnattr.context.lasso import surrogate as surrogate

__all__ = ["context_cite", "citations", "lasso", "surrogate"]
