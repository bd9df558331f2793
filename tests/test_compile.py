"""Methods on a `torch.compile`d model, checked in a fresh interpreter (see compile_check.py).

vmap cannot run a compiled graph's backward, so the engine falls back to one backward per step
(with a warning); the hooked output-layer input is not in a compiled graph either."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.compile_check", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_compiled_model_gives_the_eager_scores():
    run = _check()
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


@pytest.mark.xfail(strict=True, reason="open: with a left-padded row, the compiled GPT2 forward "
                   "through embedding_hooks gives step scores ~5e-4 off eager; unpadded rows match")
def test_compiled_model_with_left_padding():
    run = _check("padded")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
