# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   -> virtualenv, install, run the real program against the local Knack and ESB simulators
#   make test   -> virtualenv, install, the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint venv bench docker-smoke airflow-check stress-timing clean

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

# The tests marked timing, 20 times in a row with every CPU kept busy (CONVENTIONS: "Timing in tests").
stress-timing: venv
	$(PY) tests/stress_timing.py 20

bench: venv
	$(PY) bench/backlog.py

docker-smoke: venv
	$(PY) -m simulators.docker_smoke

# Loads deploy/airflow_dag.py into a real Airflow, in a virtualenv of its own (not part of make test), then runs
# a DAG with `airflow dags test` against the simulators and an image built here (skipped without a Docker engine).
AIRFLOW_VENV ?= .venv-airflow

airflow-check: venv $(AIRFLOW_VENV)/.installed
	AIRFLOW_HOME=$(CURDIR)/.airflow-home AIRFLOW__CORE__LOAD_EXAMPLES=False \
	  $(AIRFLOW_VENV)/bin/python deploy/airflow_check.py
	AIRFLOW_HOME=$(CURDIR)/.airflow-home AIRFLOW_VENV=$(abspath $(AIRFLOW_VENV)) $(PY) -m simulators.airflow_smoke

$(AIRFLOW_VENV)/.installed: deploy/requirements-airflow.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r deploy/requirements-airflow.txt
	touch $@

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) .airflow-home .pytest_cache .hypothesis
