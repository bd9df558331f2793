"""Issue 24.9: a model folder without tokenizer files says so (and which), before loading."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fnattr import cli


def test_a_folder_without_tokenizer_files_names_them(tmp_path, capsys):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2)
                    ).save_pretrained(tmp_path / "m")
    code = cli.main(["attribute", "The capital of France is", "--model", str(tmp_path / "m"),
                     "--no-save"])
    err = capsys.readouterr().err
    assert code != 0
    assert "has no tokenizer files" in err and "tokenizer.json" in err and "save_pretrained" in err, err
    assert "gives no tokens" not in err
