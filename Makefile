# mavsr: set-up, tests and the demo. `make test` and `make demo` create .venv first when missing.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU machines: the CPU build of torch (pip finds it locally here, or on PyPI as this version).
# With a GPU, override: make install TORCH="torch"
TORCH  ?= torch==2.13.0
# test workers (pytest-xdist): one per core, at most 4; each test file runs whole in one worker
JOBS   ?= auto

.PHONY: install test demo lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,lint,plots,faces,serve]"
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(JOBS) --maxprocesses 4 --dist loadfile tests

demo: install
	cd recipes/synth && PATH="$(CURDIR)/$(BIN):$$PATH" bash run.sh

lint: install
	$(BIN)/ruff check mavsr_cli tests benchmarks

clean:
	rm -rf $(VENV) recipes/synth/corpus recipes/synth/data recipes/synth/dump recipes/synth/exp recipes/synth/models
