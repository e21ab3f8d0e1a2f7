# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   -> virtualenv, install, run the real program against the local Knack and ESB simulators
#   make test   -> virtualenv, install, the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint venv bench docker-smoke clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: venv
	$(PY) -m simulators.demo

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(PY) -m pytest

bench: venv
	$(PY) bench/backlog.py

docker-smoke: venv
	$(PY) -m simulators.docker_smoke

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
