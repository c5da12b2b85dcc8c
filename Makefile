PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt

.PHONY: venv install install-test install-bench demo test lint bench clean

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

clean:
	rm -rf $(VENV) runs build src/*.egg-info
