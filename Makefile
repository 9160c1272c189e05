# The two newcomer commands: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CODE := spade components pipelines tests benchmarks

.PHONY: install demo test lint format clean tools

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole training pipeline under kfp.local: built-in photos archive -> fetch -> pseudo-label -> train
# -> evaluate -> package -> register (settings from params.yaml).
demo: $(STAMP)
	$(VENV)/bin/spade pipeline demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)

# System tools the suite drives for real: Chromium (the painter page) and Java 17 (TorchServe).
tools:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@command -v java >/dev/null || { echo "TorchServe needs Java 17: apt-get install openjdk-17-jre-headless"; exit 1; }

test: lint tools
	$(PY) -m pytest

format: $(STAMP)
	$(VENV)/bin/ruff format $(CODE)
	$(VENV)/bin/ruff check --fix $(CODE)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info data/builtin data/demo runs mlruns.db mlartifacts
