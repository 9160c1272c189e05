# The two newcomer commands: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
CODE := spade components pipelines tests benchmarks

.PHONY: install demo test lint format clean tools image

$(PY):
	python3 -m venv $(VENV)

# The demo needs the package, kfp and TorchServe (with Java 17, from apt when missing: it serves the model it
# trains); the suite installs the DVC and test tools beside them.
$(DEMO_STAMP): pyproject.toml Makefile scripts/provision-java.sh | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e '.[pipeline,serve]'
	bash scripts/provision-java.sh
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e '.[dev]'
	bash scripts/provision-java.sh
	touch $(STAMP) $(DEMO_STAMP)

install: $(STAMP)

# The whole training pipeline under kfp.local: built-in photos archive -> fetch -> pseudo-label -> train
# -> evaluate -> package -> register -> deploy to a TorchServe on 127.0.0.1, which answers one label map
# (settings from params.yaml).
demo: $(DEMO_STAMP)
	$(VENV)/bin/spade pipeline demo

# The project image spade:dev from the Dockerfile: the Docker engine installed and started when none runs,
# and a local stand-in base image when the Dockerfile's cannot be pulled (scripts/build-image.sh).
IMAGE ?= spade:dev
image:
	bash scripts/build-image.sh $(IMAGE)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)

# System tools the suite drives for real: Chromium (the painter page), Java 17 (TorchServe), kubectl with
# kustomize >= 5 (the manifests); installed when missing (scripts/provision-tools.sh).
tools: $(STAMP)
	VENV=$(VENV) bash scripts/provision-tools.sh

# The whole suite (what CI runs); $(VENV)/bin first on PATH for the tools installed there.
test: lint tools
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest

format: $(STAMP)
	$(VENV)/bin/ruff format $(CODE)
	$(VENV)/bin/ruff check --fix $(CODE)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info data/builtin data/demo runs mlruns.db mlartifacts
