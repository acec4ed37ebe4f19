# The README's two commands: `make repro` (set up, then run the pipeline on the embedded sample
# corpus) and `make test` (set up, then lint and the test suite). Setup runs again only when
# pyproject.toml or constraints.txt change.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup repro test lint typecheck browser clean
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and alone, pinned: a resolver left to itself fetches the newest CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
	@# nvidia-ml-py (pure-Python NVML bindings that dvclive needs) is not a CUDA package: allowed.
	@if $(BIN)/pip list 2>/dev/null | grep -i '^nvidia-' | grep -qvi '^nvidia-ml-py '; then \
		echo "error: CUDA packages (nvidia-*) were installed on a CPU setup; see README"; exit 1; fi
	touch $@

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The type check alone: mypy over the core, models, training and inference layers (pyproject.toml [tool.mypy]).
typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest workers (pytest-xdist): the suite on the 2-core CI machine, 14:34 vs 22:29 in one process
# (docs/BENCHMARKS.md, "Test suite").
test: lint browser
	$(BIN)/python -m pytest -q -n 2

# The browser test (tests/test_serve_browser.py) drives Debian's chromium through Playwright (no browser
# download). Installed here when missing and we are root with apt-get, as CI runs; quiet and never fatal:
# where it cannot be installed, that test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } || \
		echo "note: chromium could not be installed; the browser test will skip"; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
