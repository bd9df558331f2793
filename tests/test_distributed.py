"""Dataset runs on Ray: equal to the single-process run, a killed worker, resume, failures.

One local Ray (2 CPUs) serves every test here; the model is a tiny float64 GPT2 saved to a folder
that each worker loads through `distributed.ModelSpec`."""

import json
import os
import signal
import socket
import time

import pytest
import torch

from fnattr import dataset
from fnattr.methods import saliency
from fnattr.result import load
from tests.conftest import _build

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install 'fnattr[ray]'")
distributed = pytest.importorskip("fnattr.distributed")

WORDS = ["The capital of France is", "The cat sat", "Rome is a city", "A dog ran in the",
         "Paris is", "The quick brown fox", "Language models predict", "The dog"]
TEXTS = [f"{WORDS[i % len(WORDS)]}{' the' * (i // len(WORDS))}" for i in range(20)]
SETTINGS = {"batch_size": 2, "max_new_tokens": 3, "step_scores": ("logprob",),
            "config": {"input": "test"}, "progress": False}


class Stop(Exception):
    pass


@pytest.fixture(scope="session")
def cluster():
    """One local Ray for the whole session (its start-up takes seconds)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, decoder_tokenizer):
    """(run root: the tiny GPT2 + tokenizer and the single-process run, input file, ModelSpec)."""
    model, tok = _build("gpt2", len(decoder_tokenizer)), decoder_tokenizer
    root = tmp_path_factory.mktemp("ray")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"q": t, "id": f"r{i}"}) + "\n" for i, t in enumerate(TEXTS)))
    spec = distributed.ModelSpec(str(root / "model"), dtype="float64")
    reference, tokenizer = spec()
    dataset.run(reference, tokenizer, dataset.read_examples(data, text_field="q", id_field="id"),
                saliency, out_dir=root / "single", **SETTINGS)
    return root, data, spec


def _ray_run(saved, out_dir, **kwargs):
    _, data, spec = saved
    return distributed.run(data, spec, saliency, out_dir=out_dir, text_field="q", id_field="id",
                           **{**SETTINGS, "workers": 2, **kwargs})


def _same_run(a, b):
    """Two run folders hold the same shards and the same run.json: tokens, ids and metadata bit
    for bit, scores to float64 rounding (Ray's workers run one thread each, the single process
    two; on some CPUs the matrix products round differently with the thread count)."""
    # the command line and the input's row count are recorded by one-process runs only (a Ray
    # run's command differs anyway: --workers)
    ra, rb = (json.loads((d / dataset.RUN_FILE).read_text()) for d in (a, b))
    assert {k: v for k, v in ra.items() if k not in ("command", "total")} == \
        {k: v for k, v in rb.items() if k not in ("command", "total")}
    sa, sb = dataset.shards(a), dataset.shards(b)
    assert [p.name for p in sa] == [p.name for p in sb]
    for pa, pb in zip(sa, sb):
        x, y = load(pa), load(pb)
        assert x.meta == y.meta and x.source_tokens == y.source_tokens
        assert x.target_tokens == y.target_tokens
        for name in ("source_ids", "target_ids"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (pa.name, name)
        for name in ("source", "target"):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-12, atol=1e-15,
                                       msg=f"{pa.name} {name}")
            assert torch.equal(getattr(x, name) == 0, getattr(y, name) == 0)  # padding exactly 0
        torch.testing.assert_close(x.step_scores["logprob"], y.step_scores["logprob"], rtol=1e-12, atol=0)


def test_two_workers_equal_the_single_process_run(cluster, saved, tmp_path):
    root = saved[0]
    pids = set()
    assert _ray_run(saved, tmp_path / "o", on_shard=lambda path, pid: pids.add(pid)) == 20
    _same_run(tmp_path / "o", root / "single")
    assert pids  # (on a busy machine the first worker may take every batch before the second loads)
    assert dataset.summary(tmp_path / "o").ids == tuple(f"r{i}" for i in range(20))
    assert _ray_run(saved, tmp_path / "o") == 20  # resumed: nothing left to do


def test_a_killed_worker_is_replaced_and_every_row_lands_once(cluster, saved, tmp_path):
    killed = []

    def kill_once(path, pid):
        if not killed:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)  # mid-run: the other batches are still to come

    assert _ray_run(saved, tmp_path / "o", on_shard=kill_once) == 20
    _same_run(tmp_path / "o", saved[0] / "single")


def test_an_interrupted_run_resumes_on_ray_or_in_one_process(cluster, saved, tmp_path):
    root, data, spec = saved
    written = []

    def stop_after(n):
        def stop(path, pid):
            written.append(path)
            if len(written) == n:
                raise Stop
        return stop

    with pytest.raises(Stop):  # one worker: fewer processes to start on a 2-core machine
        _ray_run(saved, tmp_path / "o", on_shard=stop_after(2), workers=1)
    assert [p.name for p in dataset.shards(tmp_path / "o")] == [p.name for p in written]
    assert dataset.summary(tmp_path / "o").examples == 4
    with pytest.raises(Stop):  # Ray resumes after the shards written: shards 2, 3, 4 now
        _ray_run(saved, tmp_path / "o", on_shard=stop_after(5), workers=1)
    assert [p.name for p in written[2:]] == [dataset.SHARD.format(i) for i in (2, 3, 4)]
    model, tok = spec()  # and a single-process run finishes what Ray began
    assert dataset.run(model, tok, dataset.read_examples(data, text_field="q", id_field="id"),
                       saliency, out_dir=tmp_path / "o", **SETTINGS) == 20
    _same_run(tmp_path / "o", root / "single")


def test_a_row_that_fails_is_named_and_the_shards_before_it_are_kept(cluster, saved, tmp_path):
    spec = saved[2]
    long = " ".join(["the"] * 80)  # longer than the tiny model's 64 positions
    rows = [{"q": t, "id": f"r{i}"} for i, t in enumerate(TEXTS[:8])]
    rows[5]["q"] = long
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(distributed.WorkerError, match=r"bad\.jsonl: the batch of line 5 to line 6 "
                       r"\(examples 4-5, shard shard-000002\.safetensors\) failed on worker .* pid \d+"
                       r".*; line 6 fails alone \(example 5, id 'r5'\) \(shard-000001\.safetensors and "
                       r"the shards before it are written"):
        distributed.run(bad, spec, saliency, out_dir=tmp_path / "o", text_field="q", id_field="id",
                        workers=1, **SETTINGS)
    assert [p.name for p in dataset.shards(tmp_path / "o")] == ["shard-000000.safetensors",
                                                               "shard-000001.safetensors"]
    assert dataset.summary(tmp_path / "o").examples == 4


def test_a_worker_that_cannot_load_the_model_is_named(cluster, saved, tmp_path):
    data = saved[1]
    spec = distributed.ModelSpec(str(tmp_path / "no-model"))
    with pytest.raises(distributed.WorkerError, match=r"worker .* pid \d+ could not load the model "
                       r"with ModelSpec\(name_or_path='.*no-model'.*FileNotFoundError"):
        distributed.run(data, spec, saliency, out_dir=tmp_path / "o", text_field="q", workers=1,
                        **SETTINGS)
    assert dataset.shards(tmp_path / "o") == []


def test_bad_input_and_addresses_fail_before_ray_works(saved, tmp_path):
    _, data, spec = saved
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=rf"--ray-address '127\.0\.0\.1:{port}': nothing answers"):
        distributed.run(data, spec, saliency, out_dir=tmp_path / "o", text_field="q",
                        address=f"127.0.0.1:{port}", **SETTINGS)
    assert time.perf_counter() - start < 10 and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="is not host:port"):
        distributed.check_address("nowhere")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "The cat"}\n{"q": ""}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'q' is empty"):
        distributed.run(bad, spec, saliency, out_dir=tmp_path / "o", text_field="q", **SETTINGS)
    with pytest.raises(ValueError, match="--workers 0"):
        distributed.run(data, spec, saliency, out_dir=tmp_path / "o", text_field="q", workers=0,
                        **SETTINGS)


def test_the_command_line_runs_on_ray_as_in_one_process(cluster, saved, tmp_path, monkeypatch):
    from fnattr import cli

    root, data, _ = saved
    monkeypatch.chdir(tmp_path)
    args = ["attribute-dataset", "--input", str(data), "--text-field", "q", "--id-field", "id",
            "--model", str(root / "model"), "--dtype", "float64", "--method", "saliency",
            "--batch-size", "5", "--max-new-tokens", "2", "--step-scores", "logprob", "--quiet"]
    assert cli.main([*args, "--out", "one"]) == 0
    assert cli.main([*args, "--out", "ray", "--workers", "2"]) == 0
    _same_run(tmp_path / "one", tmp_path / "ray")
