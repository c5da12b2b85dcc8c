PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt

.PHONY: venv install install-test install-bench install-docs demo test lint bench docs docs-browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(PY)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e .

install-test: $(PY)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test]"

install-bench: $(PY)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[test,bench]"

demo: install
	$(VENV)/bin/viax fit examples/eight_schools.py --data examples/data/eight_schools.json \
		--family fullrank --out runs/eight_schools

test: install-test
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(PY) -m pytest -n auto -q

lint: install-test
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

bench: install-bench
	$(PY) benchmarks/run_all.py

install-docs: $(PY)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[docs]"

# The site, into site/ (git-ignored): strict, so a broken link, a missing reference or a
# docstring that fails to render is an error; the tutorials run as part of the build.
docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The built site in headless Chromium (Debian's package, installed here when missing and
# running as root): home page, a tutorial, an API page; screenshots in site/_screenshots/.
docs-browser: docs install-test
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -q chromium >/dev/null; } || true
	$(PY) -m pytest -q -n 0 tests/test_browser.py

clean:
	rm -rf $(VENV) runs build site src/*.egg-info
