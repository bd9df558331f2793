"""Issue 24.5: a run stopped part way says how many rows are done and how to resume."""

import pytest

from fnattr import cli, dataset
from fnattr.dataset import Example
from fnattr.methods import METHODS
from tests.conftest import _get

ROWS = [Example("The cat sat", " on"), Example("A dog ran", " in"), Example("Rome is", " a")]


class Stop(Exception):
    pass


def test_show_says_how_many_rows_are_done_and_how_to_resume(request, tmp_path, capsys):
    model, tok = _get(request, "gpt2")
    command = f"fnattr attribute-dataset --input d.jsonl --text-field text --out {tmp_path / 'run'}"

    def stop(path):  # Ctrl-C after the first shard
        raise Stop

    with pytest.raises(Stop):
        dataset.run(model, tok, iter(ROWS), METHODS["saliency"], out_dir=tmp_path / "run",
                    batch_size=1, total=len(ROWS), progress=False, on_shard=stop, command=command)
    s = dataset.summary(tmp_path / "run")
    assert (s.examples, s.total, s.incomplete, s.command) == (1, 3, True, command)
    text = dataset.describe(tmp_path / "run")
    assert "1 of 3 rows done" in text and f"resume with: {command}" in text, text
    assert cli.main(["show", str(tmp_path / "run"), "--no-table"]) == 0
    assert "2 of 3 rows not done yet; resume with: " + command in capsys.readouterr().out
    # resumed to the end: complete, no resume line
    dataset.run(model, tok, iter(ROWS), METHODS["saliency"], out_dir=tmp_path / "run",
                batch_size=1, total=len(ROWS), progress=False, command=command)
    text = dataset.describe(tmp_path / "run")
    assert "3 of 3 rows done" in text and "resume" not in text
