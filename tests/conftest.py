"""Tiny deterministic models built from configs, and tokenizers trained here: no downloads."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, LlamaConfig,
    LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration,
)

CORPUS = [
    "The capital of France is Paris.", "The capital of Italy is Rome.",
    "Paris is a city in France.", "The cat sat on the mat.", "A dog ran in the park.",
    "Rome is a city in Italy.", "The quick brown fox jumps over the lazy dog.",
    "Language models predict the next token.", "Attribution explains what a model depends on.",
] * 4
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2, 3
VOCAB = 400
SEED = 0


def _tokenizer(template: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def decoder_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer("<s> $A")


@pytest.fixture(scope="session")
def seq2seq_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer("$A </s>")


def _vocab(tok: PreTrainedTokenizerFast) -> int:
    return len(tok)


def _build(name: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(SEED)
    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                           n_head=4, **ids))
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=64, **ids))
    elif name == "bart":
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=2,
            forced_bos_token_id=None, scale_embedding=True, **ids))
    elif name == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            decoder_start_token_id=0, **ids))
    else:
        raise KeyError(name)
    return model.to(torch.float64).eval()


DECODERS = ("gpt2", "llama")
SEQ2SEQ = ("bart", "t5")


@pytest.fixture(scope="session")
def models_cache() -> dict:
    return {}


def _get(request, name: str):
    cache = request.getfixturevalue("models_cache")
    tok = request.getfixturevalue("seq2seq_tokenizer" if name in SEQ2SEQ else "decoder_tokenizer")
    if name not in cache:
        cache[name] = _build(name, _vocab(tok))
    return cache[name], tok


@pytest.fixture(params=DECODERS + SEQ2SEQ)
def any_model(request):
    """(model, tokenizer) for each tiny architecture, float64, eval mode."""
    return _get(request, request.param)


@pytest.fixture(params=DECODERS)
def decoder_model(request):
    return _get(request, request.param)


@pytest.fixture(params=SEQ2SEQ)
def seq2seq_model(request):
    return _get(request, request.param)


@pytest.fixture
def gpt2(request):
    return _get(request, "gpt2")
