"""Dataset inputs besides .jsonl and .csv: parquet, Arrow files and `datasets` folders, streamed;
cursors that start a read at any example (what a distributed run reads each batch from)."""

import json

import pytest

from fnattr import dataset

pa = pytest.importorskip("pyarrow", reason="parquet and Arrow inputs need pyarrow (the formats extra)")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = [{"q": f"The cat sat {i}", "id": i} for i in range(10)]
ROWS[3] = {"q": "", "id": 3}
ROWS[7] = {"q": None, "id": 7}


def _inputs(tmp_path):
    """The same rows as .jsonl, .csv, .parquet (row groups of 3), a `datasets` folder, .arrow."""
    paths = {"jsonl": tmp_path / "d.jsonl", "csv": tmp_path / "d.csv", "parquet": tmp_path / "d.parquet"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["csv"].write_text("q,id\n" + "".join(f"{r['q'] or ''},{r['id']}\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"], row_group_size=3)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "hf", num_shards=3)  # 3 Arrow files
    paths["datasets"] = tmp_path / "hf"
    paths["arrow"] = min((tmp_path / "hf").glob("*.arrow"))
    return paths


def test_every_format_gives_the_same_examples_and_bad_rows(tmp_path):
    paths = _inputs(tmp_path)
    want = [f"The cat sat {i}" for i in range(10) if i not in (3, 7)]
    for kind, path in paths.items():
        rows = dataset.read_examples(path, text_field="q", id_field="id", on_bad_row="skip")
        got = list(rows)
        if kind == "arrow":  # one file of the folder: its first rows only
            assert [e.text for e in got] == want[:len(got)] and got
            continue
        assert [e.text for e in got] == want, kind
        if kind != "csv":  # a CSV id is text
            assert [e.id for e in got] == [i for i in range(10) if i not in (3, 7)]
        first = 2 if kind == "csv" else 1  # CSV lines count the header
        assert [b.line for b in rows.skipped] == [3 + first, 7 + first], kind
        assert dataset.count_examples(path) == 10
        assert dataset.count_examples(path, text_field="q", on_bad_row="skip") == 8
    with pytest.raises(ValueError, match=r"d\.parquet: row 4: field 'q' is empty: fix that row"):
        list(dataset.read_examples(paths["parquet"], text_field="q"))
    with pytest.raises(ValueError, match=r"hf: row 8: field 'q' holds no text \(got None\)"):
        list(dataset.read_examples(paths["datasets"], text_field="q", on_bad_row="stop",
                                   start=(4, 4)))
    with pytest.raises(ValueError, match=r"--text-field 'text' is not a field .*'q', 'id'"):
        dataset.read_examples(paths["parquet"], text_field="text")


def test_a_read_starts_at_any_examples_cursor(tmp_path):
    paths = _inputs(tmp_path)
    paths["jsonl"].write_text("\n" + "".join(json.dumps(r) + "\n\n" for r in ROWS) + "{oops\n")
    paths["csv"].write_text('q,id\n"two\nlines",a\n' + "".join(f"{r['q'] or ''},{r['id']}\n" for r in ROWS))
    for kind in ("jsonl", "csv", "parquet", "datasets"):
        rows = dataset.read_examples(paths[kind], text_field="q", on_bad_row="skip")
        seen = [(e, rows.cursor) for e in rows]
        for i, (_, cursor) in enumerate(seen):
            again = list(dataset.read_examples(paths[kind], text_field="q", on_bad_row="skip",
                                               start=cursor))
            assert again == [e for e, _ in seen[i:]], (kind, i)
            assert [e.line for e in again] == [e.line for e, _ in seen[i:]], (kind, i)


def test_formats_are_named_when_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"holds several splits \(train\): pass one of them, e\.g\. "
                                         r"'.*dd/train'"):
        dataset.read_examples(tmp_path / "dd", text_field="q")
    assert [e.text for e in dataset.read_examples(tmp_path / "dd" / "train", text_field="q",
                                                  on_bad_row="skip")][:1] == ["The cat sat 0"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="no `datasets` folder"):
        dataset.read_examples(tmp_path / "plain", text_field="q")
    (tmp_path / "d.json").write_text("[]")
    with pytest.raises(ValueError, match=r"is not \.jsonl, \.csv, \.parquet, \.arrow or a `datasets` folder"):
        dataset.read_examples(tmp_path / "d.json", text_field="q")


def test_a_parquet_run_equals_the_jsonl_run(gpt2, tmp_path):
    from fnattr.methods import saliency
    from fnattr.result import load

    paths = _inputs(tmp_path)
    model, tok = gpt2
    for kind in ("jsonl", "parquet"):
        dataset.run(model, tok, dataset.read_examples(paths[kind], text_field="q", id_field="id",
                                                      on_bad_row="skip"),
                    saliency, out_dir=tmp_path / kind, batch_size=3, max_new_tokens=2, progress=False)
    a, b = dataset.shards(tmp_path / "jsonl"), dataset.shards(tmp_path / "parquet")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert load(x).meta == load(y).meta
    assert dataset.summary(tmp_path / "parquet").skipped == dataset.summary(tmp_path / "jsonl").skipped
