"""`embedding_hooks`: read and replace a model's input embeddings, restored on exit."""

import collections
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from fnattr.types import Model


def embedding_modules(model: Model) -> dict[str, nn.Module]:
    """The modules that embed source and target ids ("source" and "target" keys).

    Decoder-only models embed both sides with one module. Encoder-decoder models may use one
    shared module for encoder and decoder or two; the encoder always runs before the decoder.
    """
    if not model.config.is_encoder_decoder:
        layer = model.get_input_embeddings()
        if layer is None:
            raise ValueError(f"{type(model).__name__} has no input embeddings (get_input_embeddings).")
        return {"source": layer, "target": layer}
    sides = {"source": model.get_encoder(), "target": model.get_decoder()}
    found = {}
    for side, stack in sides.items():
        layer = getattr(stack, "embed_tokens", None)
        layer = stack.get_input_embeddings() if layer is None else layer
        if layer is None:
            raise ValueError(f"{type(model).__name__}'s {side} side has no input embeddings.")
        found[side] = layer
    return found


@dataclasses.dataclass
class EmbeddingHandle:
    """Reads embeddings (`embed`) and queues replacements for the next forward (`replace`).

    A queued tensor replaces the output of the embedding module on its next call, in order;
    a forward that leaves a replacement unused raises when the handle is checked (`check_used`).
    """

    modules: dict[str, nn.Module]
    _queues: dict[int, collections.deque] = dataclasses.field(default_factory=dict)
    _bypass: bool = False

    def embed(self, ids: Tensor, side: str = "source") -> Tensor:
        """Embeddings of `ids` as the model computes them, without replacement."""
        self._bypass = True
        try:
            return self.modules[side](ids)
        finally:
            self._bypass = False

    def replace(self, **sides: Tensor) -> None:
        """Queue `source=` / `target=` tensors to stand in for the next embedding outputs."""
        for side in ("source", "target"):
            if side in sides:
                self._queues[id(self.modules[side])].append(sides[side])

    def check_used(self) -> None:
        if any(self._queues.values()):
            for queue in self._queues.values():
                queue.clear()
            raise RuntimeError("queued embeddings were not used by the forward pass.")

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        queue = self._queues.get(id(module))
        if self._bypass or not queue:
            return None
        new = queue.popleft()
        if new.shape != output.shape:
            queue.clear()
            raise ValueError(f"replacement embeddings have shape {tuple(new.shape)}, "
                             f"the model embedded {tuple(output.shape)}.")
        return new.to(output.dtype)


@contextmanager
def embedding_hooks(model: Model) -> Iterator[EmbeddingHandle]:
    """Hook the input embeddings of `model`; the hooks are removed on exit, also on error.

    >>> with embedding_hooks(model) as emb:
    ...     x = emb.embed(ids)
    ...     emb.replace(source=x * 0.5)
    ...     logits = model(input_ids=ids).logits   # computed from x * 0.5
    """
    modules = embedding_modules(model)  # validate before touching the model
    handle = EmbeddingHandle(modules)
    handles = []
    try:
        for module in {id(m): m for m in modules.values()}.values():
            handle._queues[id(module)] = collections.deque()
            handles.append(module.register_forward_hook(handle._hook))
        yield handle
    finally:
        for h in reversed(handles):
            h.remove()
