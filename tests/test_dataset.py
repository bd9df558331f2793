"""Dataset runs: streamed input, one shard per batch, interrupted-and-resumed == uninterrupted."""

import json

import pytest
import torch

from fnattr import dataset
from fnattr.methods import saliency
from fnattr.result import load

TEXTS = ["The capital of France is", "The cat sat", "Rome is a city", "A dog ran in the",
         "Paris is", "The quick brown fox"]


class Stop(Exception):
    pass


def _run(gpt2, out_dir, examples, **kwargs):
    model, tok = gpt2
    return dataset.run(model, tok, examples, saliency, out_dir=out_dir, batch_size=2,
                       max_new_tokens=3, step_scores=("logprob",), progress=False,
                       config={"input": "test"}, **kwargs)


def _shards(out_dir):
    return [load(p) for p in dataset.shards(out_dir)]


def _same(a, b):
    assert a.source_tokens == b.source_tokens and a.target_tokens == b.target_tokens
    assert a.meta["dataset_start"] == b.meta["dataset_start"]
    assert a.meta["dataset_end"] == b.meta["dataset_end"]
    torch.testing.assert_close(a.source, b.source, rtol=0, atol=0)
    torch.testing.assert_close(a.target, b.target, rtol=0, atol=0)
    torch.testing.assert_close(a.step_scores["logprob"], b.step_scores["logprob"], rtol=0, atol=0)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(gpt2, tmp_path):
    examples = [dataset.Example(t) for t in TEXTS]
    assert _run(gpt2, tmp_path / "full", examples) == 6
    full = _shards(tmp_path / "full")
    assert [s.source.shape[0] for s in full] == [2, 2, 2]

    written = []

    def stop_after_two(path):
        written.append(path)
        if len(written) == 2:
            raise Stop  # as if the process died right after the second shard

    with pytest.raises(Stop):
        _run(gpt2, tmp_path / "part", examples, on_shard=stop_after_two)
    assert len(dataset.shards(tmp_path / "part")) == 2
    (tmp_path / "part" / ".tmp-shard-000002.safetensors").write_bytes(b"half written")
    pulled = []

    def counting():
        for e in examples:
            pulled.append(e)
            yield e

    assert _run(gpt2, tmp_path / "part", counting()) == 6
    resumed = _shards(tmp_path / "part")
    assert len(resumed) == len(full)
    for a, b in zip(resumed, full):
        _same(a, b)
    assert [r.source_tokens for r in resumed] == [f.source_tokens for f in full]  # none lost or repeated
    assert not list((tmp_path / "part").glob(".tmp-*"))
    # a second resume has nothing left to do
    assert _run(gpt2, tmp_path / "part", examples) == 6 and len(dataset.shards(tmp_path / "part")) == 3


def test_examples_are_streamed_one_batch_at_a_time(gpt2, tmp_path):
    pulled = []

    def stream():
        for t in TEXTS:
            pulled.append(t)
            yield dataset.Example(t)

    seen = []
    _run(gpt2, tmp_path, stream(), on_shard=lambda p: seen.append((len(pulled), int(load(p).meta["dataset_end"]))))
    assert seen == [(2, 2), (4, 4), (6, 6)]  # never more than one batch read ahead


def test_resume_refuses_other_settings(gpt2, tmp_path):
    examples = [dataset.Example(t) for t in TEXTS[:2]]
    _run(gpt2, tmp_path, examples)
    model, tok = gpt2
    with pytest.raises(ValueError, match="batch_size"):
        dataset.run(model, tok, examples, saliency, out_dir=tmp_path, batch_size=1, max_new_tokens=3,
                    step_scores=("logprob",), progress=False, config={"input": "test"})


def test_read_jsonl_and_csv_with_fields(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"q": t, "a": " x"}) for t in TEXTS[:3]) + "\n\n")
    got = list(dataset.read_examples(jsonl, text_field="q", target_field="a"))
    assert got == [dataset.Example(t, " x") for t in TEXTS[:3]] and dataset.count_examples(jsonl) == 3
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('text,label\n"Hello, world",1\nBye,0\n')
    assert [e.text for e in dataset.read_examples(csv_file, text_field="text")] == ["Hello, world", "Bye"]
    with pytest.raises(ValueError, match=r"--text-field 'txt'.*'text', 'label'"):
        dataset.read_examples(csv_file, text_field="txt")
    with pytest.raises(ValueError, match="--target-field 'b'"):
        dataset.read_examples(jsonl, text_field="q", target_field="b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset.read_examples(tmp_path / "none.jsonl", text_field="q")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="neither .jsonl nor .csv"):
        dataset.read_examples(tmp_path / "d.txt", text_field="q")
