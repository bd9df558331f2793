"""Plain per-step references: one model run per generated step, straight autograd, no fnattr engine."""

import torch
from torch import Tensor


def _embeddings(model, side: str):
    if not model.config.is_encoder_decoder:
        return model.get_input_embeddings()
    stack = model.get_encoder() if side == "source" else model.get_decoder()
    return stack.embed_tokens


def prefix_inputs(model, src: Tensor, tgt: Tensor, t: int, start_id: int | None):
    """Embeddings of (source, target prefix before step t) for one unpadded example."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            dec = torch.cat([torch.tensor([start_id]), tgt[:t]])
            return _embeddings(model, "source")(src), _embeddings(model, "target")(dec)
        emb = _embeddings(model, "source")(torch.cat([src, tgt[:t]]))
        return emb[: len(src)], emb[len(src):]


def step_score(model, src_emb: Tensor, tgt_emb: Tensor, target_id: int, target_fn) -> Tensor:
    """target_fn of the step whose inputs are `src_emb` and the decoder/target prefix `tgt_emb`."""
    if model.config.is_encoder_decoder:
        logits = model(inputs_embeds=src_emb[None], decoder_inputs_embeds=tgt_emb[None]).logits
    else:
        logits = model(inputs_embeds=torch.cat([src_emb, tgt_emb])[None]).logits
    return target_fn(logits[:, -1:], torch.tensor([[target_id]]))[0, 0]


def step_gradient(model, src: Tensor, tgt: Tensor, t: int, start_id, target_fn):
    """Gradient of step t's score w.r.t. source and target-prefix embeddings, one example."""
    s, p = (e.clone().requires_grad_() for e in prefix_inputs(model, src, tgt, t, start_id))
    score = step_score(model, s, p, int(tgt[t]), target_fn)
    gs, gp = torch.autograd.grad(score, (s, p))
    return s.detach(), p.detach(), gs, gp
