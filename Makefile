# pqmail developer targets. `make test` and `make run` are the two README commands.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PQMAIL := $(VENV)/bin/pqmail
DEMO   ?= var/demo

.PHONY: venv test lint run demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests bench

demo: venv
	$(PY) -m pqmail.demo --dir $(DEMO)

run: demo

clean:
	rm -rf $(VENV) var build *.egg-info src/*.egg-info
