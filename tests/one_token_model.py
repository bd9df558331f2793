"""A 1-layer GPT2 with hand-set weights whose output at every step depends on ONE token id.

Every token embedding lives in dims 0..13 and sums to zero, except that token `key_id` also
carries +1 in dim 15 and -1 in dim 14. The layer norms have a huge epsilon and a matching gain,
so they only centre their input (which is already centred). Queries and keys are zero, so the
attention is uniform over the visible positions; values read dim 15 only, so only `key_id` has a
value (u, in dims 16..31, summing to zero); the MLP is zero; the untied output layer reads dims
16..31 only. So at a step that sees n positions (the query's included), one of them `key_id`,
every logit is |u|^2 / n = 16 / n, and 0 when `key_id` is absent or replaced by another token:
`targets.logit` depends on that one source token and on nothing else (to about 1e-10).
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

EPS = 1e10


def one_token_gpt2(vocab: int, key_id: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=1,
                        layer_norm_epsilon=EPS, tie_word_embeddings=False, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    model = GPT2LMHeadModel(config).to(torch.float64).eval()
    u = torch.tensor([1.0, -1.0] * 8, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        wte = torch.randn(vocab, 14, dtype=torch.float64)
        model.transformer.wte.weight[:, :14] = wte - wte.mean(1, keepdim=True)
        model.transformer.wte.weight[key_id, 14:16] = torch.tensor([-1.0, 1.0])
        for ln in (model.transformer.h[0].ln_1, model.transformer.h[0].ln_2, model.transformer.ln_f):
            ln.weight.fill_(EPS ** 0.5)
        attn = model.transformer.h[0].attn
        attn.c_attn.weight[15, 2 * 32 + 16:] = u  # value = x[15] * u, in dims 16..31
        attn.c_proj.weight.copy_(torch.eye(32, dtype=torch.float64))
        model.lm_head.weight[:, 16:] = u
    return model
