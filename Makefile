# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv from nothing
# (Python 3.11+ and make are all they assume) and re-install only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test bench bench-learn lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Runtime install: the package and its dependencies (torch + torchvision from PyPI, a matched pair).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) --editable .
	touch $@

# Developer install: the same plus pytest, pytest-xdist, hypothesis and ruff.
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) --editable ".[dev]"
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(VENV)/bin/scrollsam demo --out demo

test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/run.py

# What the model learns against a plain CNN, on the demo's data and budget (~30 min, CPU).
bench-learn: $(VENV)/.installed-dev
	$(PY) benchmarks/learn.py

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache
