"""Dataset runs: streamed input, one shard per batch, interrupted-and-resumed == uninterrupted."""

import io
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
    with pytest.raises(ValueError, match=r"is not \.jsonl, \.csv, \.parquet"):
        dataset.read_examples(tmp_path / "d.txt", text_field="q")


# ---- input fingerprints, ids, reduction, bad rows, damaged files, show ------------------------

def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read(path, **options):
    return dataset.read_examples(path, text_field="q", **options)


def test_edited_input_is_refused_on_resume(gpt2, tmp_path):
    rows = [{"q": t} for t in TEXTS]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    written = []

    def stop_after_two(path):
        written.append(path)
        if len(written) == 2:
            raise Stop

    with pytest.raises(Stop):
        _run(gpt2, tmp_path / "o", _read(data), on_shard=stop_after_two)
    record = json.loads((tmp_path / "o" / dataset.RUN_FILE).read_text())
    metas = [load(p).meta for p in dataset.shards(tmp_path / "o")]
    assert [s["sha256"] for s in record["shards"]] == [m["dataset_sha256"] for m in metas]
    assert metas[0]["dataset_sha256"] == dataset.fingerprint([dataset.Example(t) for t in TEXTS[:2]])
    # a row inserted at the top would shift every example by one: refused, naming the first shard
    _jsonl(data, [{"q": "A new first row"}, *rows])
    refused = r"input changed since shard-000000\.safetensors .*examples 0-1.*another --out"
    with pytest.raises(ValueError, match=refused):
        _run(gpt2, tmp_path / "o", _read(data))
    # an edit inside the second shard names that one
    _jsonl(data, [*rows[:3], {"q": "Rome is a town"}, *rows[4:]])
    with pytest.raises(ValueError, match=r"shard-000001\.safetensors was written \(its examples 2-3"):
        _run(gpt2, tmp_path / "o", _read(data))
    # a shorter file cannot hold the rows already attributed either
    _jsonl(data, rows[:3])
    with pytest.raises(ValueError, match="shard-000001"):
        _run(gpt2, tmp_path / "o", _read(data))
    assert len(dataset.shards(tmp_path / "o")) == 2  # nothing written by the refused runs
    # the same rows (an edit after the shards written is fine) resume, and rows may be appended
    _jsonl(data, [*rows[:5], {"q": "The quick red fox"}, {"q": "The cat"}])
    assert _run(gpt2, tmp_path / "o", _read(data)) == 7
    record = json.loads((tmp_path / "o" / dataset.RUN_FILE).read_text())
    assert record["examples"] == 7 and [s["end"] for s in record["shards"]] == [2, 4, 6, 7]
    assert not list((tmp_path / "o").glob(".tmp-*"))  # run.json too was written by rename


def test_ids_are_carried_into_the_shards(gpt2, tmp_path):
    keys = ["q-1", 7, "q-3", "q/4", "q-5"]
    data = _jsonl(tmp_path / "d.jsonl", [{"q": t, "id": k} for t, k in zip(TEXTS, keys)])
    _run(gpt2, tmp_path / "o", _read(data, id_field="id"))
    got = [k for out in dataset.load_shards(tmp_path / "o") for k in dataset.ids(out)]
    assert got == keys and dataset.summary(tmp_path / "o").ids == tuple(keys)
    _run(gpt2, tmp_path / "plain", _read(data))
    assert all(dataset.ids(out) is None for out in dataset.load_shards(tmp_path / "plain"))
    assert dataset.summary(tmp_path / "plain").ids is None
    with pytest.raises(ValueError, match=r"--id-field 'key'.*'q', 'id'"):
        _read(data, id_field="key")
    # the same text under another id is another input: resuming a run refuses it
    _jsonl(data, [{"q": t, "id": f"{k}x"} for t, k in zip(TEXTS, keys)])
    with pytest.raises(ValueError, match="shard-000000"):
        _run(gpt2, tmp_path / "o", _read(data, id_field="id"))


def test_reduced_shards_equal_the_reduction_of_full_ones(gpt2, tmp_path):
    from fnattr import aggregate

    examples = [dataset.Example(t) for t in TEXTS[:4]]
    _run(gpt2, tmp_path / "full", examples)
    _run(gpt2, tmp_path / "l2", examples, reduce="l2")
    for full, small in zip(_shards(tmp_path / "full"), _shards(tmp_path / "l2")):
        assert full.extra_dims == ("hidden",) and small.extra_dims == () and small.source.ndim == 3
        want = aggregate.reduce(full, "l2")
        torch.testing.assert_close(small.source, want.source, rtol=0, atol=0)
        torch.testing.assert_close(small.target, want.target, rtol=0, atol=0)
        assert json.loads(small.meta["aggregations"]) == [["l2", ["hidden"]]]
    assert json.loads((tmp_path / "l2" / dataset.RUN_FILE).read_text())["config"]["reduce"] == "l2"
    with pytest.raises(ValueError, match="reduce"):  # another reduction is another run
        _run(gpt2, tmp_path / "l2", examples, reduce="sum")
    with pytest.raises(ValueError, match=r"--reduce 'median'.*sum, mean, l2"):
        _run(gpt2, tmp_path / "other", examples, reduce="median")
    assert not (tmp_path / "other").exists()


def test_bad_rows_stop_or_are_skipped_with_their_line(gpt2, tmp_path):
    rows = [{"q": TEXTS[0]}, "", {"q": ""}, {"q": TEXTS[1]}, {"q": 3}, "{not json", {"q": TEXTS[2]},
            "[1, 2]", {"q": TEXTS[3]}]
    data = _jsonl(tmp_path / "d.jsonl", rows)  # line 2 is blank: no row, not a bad one
    with pytest.raises(ValueError, match=r"d\.jsonl:3: field 'q' is empty: .*--on-bad-row skip"):
        list(_read(data))
    other = _jsonl(tmp_path / "e.jsonl", [rows[0], {"q": 3}])
    with pytest.raises(ValueError, match=r"e\.jsonl:2: field 'q' holds no text \(got 3\)"):
        list(_read(other))
    with pytest.raises(ValueError, match=r"e\.jsonl:1: not valid JSON"):  # before the first row too
        _read(_jsonl(other, ["{not json", rows[0]]))
    with pytest.raises(ValueError, match=r"holds no examples \(no line holds a record"):
        _read(_jsonl(other, ["{not json"]), on_bad_row="skip")
    examples = _read(data, on_bad_row="skip")
    got = list(examples)
    assert [e.text for e in got] == TEXTS[:4] and [e.line for e in got] == [1, 4, 7, 9]
    assert [b.line for b in examples.skipped] == [3, 5, 6, 8]
    assert "not valid JSON" in examples.skipped[2].reason and "JSON object" in examples.skipped[3].reason
    assert dataset.count_examples(data, text_field="q", on_bad_row="skip") == 4
    with pytest.raises(ValueError, match=r"d\.jsonl:3"):  # checked before any model work
        dataset.count_examples(data, text_field="q")
    # a run stops at the row (naming its line, not a batch), keeps the shards before it, and
    # resumes past it once told to skip
    with pytest.raises(ValueError, match=r"d\.jsonl:3: field 'q' is empty"):
        _run(gpt2, tmp_path / "o", _read(data))
    assert _run(gpt2, tmp_path / "o", _read(data, on_bad_row="skip")) == 4
    record = json.loads((tmp_path / "o" / dataset.RUN_FILE).read_text())
    assert [b["line"] for b in record["skipped"]] == [3, 5, 6, 8]
    assert dataset.summary(tmp_path / "o").skipped[0] == dataset.BadRow(3, "field 'q' is empty")
    with pytest.raises(ValueError, match="--on-bad-row 'ignore'"):
        _read(data, on_bad_row="ignore")
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('text,id\n"two\nlines",a\n,b\nok,\n')
    rows = dataset.read_examples(csv_file, text_field="text", id_field="id", on_bad_row="skip")
    assert [(e.text, e.id, e.line) for e in rows] == [("two\nlines", "a", 3)]
    assert [(b.line, b.reason.split(" (")[0]) for b in rows.skipped] == [
        (4, "field 'text' is empty"), (5, "field 'id' holds no id")]


def test_damaged_files_are_named(gpt2, tmp_path):
    examples = [dataset.Example(t) for t in TEXTS[:4]]
    _run(gpt2, tmp_path / "o", examples)
    run_file = tmp_path / "o" / dataset.RUN_FILE
    good = run_file.read_text()
    run_file.write_text(good[: len(good) // 2])
    for call in (lambda: _run(gpt2, tmp_path / "o", examples), lambda: dataset.summary(tmp_path / "o")):
        with pytest.raises(ValueError, match=r"run\.json' is damaged.*another --out"):
            call()
    run_file.write_text(good)
    shard = dataset.shards(tmp_path / "o")[1]
    shard.write_bytes(shard.read_bytes()[:200])
    for call in (lambda: _run(gpt2, tmp_path / "o", examples), lambda: dataset.summary(tmp_path / "o")):
        with pytest.raises(ValueError, match=r"shard-000001\.safetensors' is damaged.*delete it"):
            call()
    with pytest.raises(ValueError, match=r"shard-000001\.safetensors' is damaged"):
        list(dataset.load_shards(tmp_path / "o"))
    shard.unlink()  # the fix the message gives: delete it and run again
    assert _run(gpt2, tmp_path / "o", examples) == 4 and len(dataset.shards(tmp_path / "o")) == 2


def test_show_summarises_a_run_and_draws_its_examples(gpt2, tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"q": t, "id": f"[b]{i}"} for i, t in enumerate(TEXTS[:5])]
                  + ['{"q": ""}'])
    _run(gpt2, tmp_path / "o", _read(data, id_field="id", on_bad_row="skip"), reduce="l2")
    text = dataset.describe(tmp_path / "o")
    assert "5 examples in 3 shards (batch size 2)" in text and "method saliency" in text
    assert "'[b]0', '[b]1'" in text and "skipped rows: line 6" in text and "reduced by l2" in text
    page = io.StringIO()
    dataset.show(tmp_path / "o", file=page, limit=3)
    shown = page.getvalue()
    assert text.splitlines()[0] in shown
    assert "example 0, id '[b]0' (shard-000000.safetensors, row 0)" in shown
    assert "example 2, id '[b]2' (shard-000001.safetensors, row 0)" in shown
    assert "example 3" not in shown and "2 more examples" in shown
    assert shown.count("cells: L2 norm over hidden") == 3
    with pytest.raises(FileNotFoundError, match="not a folder"):
        dataset.summary(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no dataset run"):
        dataset.summary(tmp_path)


def test_a_run_from_before_fingerprints_resumes(gpt2, tmp_path):
    examples = [dataset.Example(t) for t in TEXTS[:4]]
    _run(gpt2, tmp_path / "o", examples[:2])
    record = json.loads((tmp_path / "o" / dataset.RUN_FILE).read_text())
    (tmp_path / "o" / dataset.RUN_FILE).write_text(json.dumps(record["config"]))  # the old plain config
    path = dataset.shards(tmp_path / "o")[0]
    old = load(path)
    old.replace(meta={k: v for k, v in old.meta.items() if k != "dataset_sha256"}).save(path)
    assert _run(gpt2, tmp_path / "o", examples) == 4
    record = json.loads((tmp_path / "o" / dataset.RUN_FILE).read_text())
    assert record["format"] == dataset.RUN_FORMAT and [s["sha256"] is None for s in record["shards"]] == [
        True, False]
