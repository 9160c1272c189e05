# The two newcomer commands: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint format clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spade demo

lint: $(STAMP)
	$(VENV)/bin/ruff check spade tests
	$(VENV)/bin/ruff format --check spade tests

test: lint
	$(PY) -m pytest

format: $(STAMP)
	$(VENV)/bin/ruff format spade tests
	$(VENV)/bin/ruff check --fix spade tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info data/builtin runs mlruns.db mlartifacts
