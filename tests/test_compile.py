"""Methods on a `torch.compile`d model, checked in a fresh interpreter (see compile_check.py).

vmap cannot run a compiled graph's backward: off the CPU, saliency and IG run m copies of each
row for m steps and one plain backward (`_triangular._replicated`); on a CPU, where that costs
more, the engine takes one backward per step (with a warning). Both are checked here; the hooked
output-layer input is not in a compiled graph either."""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.compile_check", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_compiled_model_gives_the_eager_scores():
    run = _check()
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


def test_compiled_model_with_left_padding():
    run = _check("padded")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


def test_one_compiled_model_serves_every_method_and_batch_shape():
    """fnattr.compiled.compile traces at most four graphs (grad on/off x 1 row / more rows) for
    saliency, IG and occlusion on a 1-row batch, then none for a 2-row batch of another length;
    dynamo's eager backend traces and guards as inductor does, without its code generation."""
    run = _check("reuse", "gpt2", "eager")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
