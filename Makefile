# The two commands a user needs: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

BENCH_VENV := .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

.PHONY: demo test lint install clean bench system-deps bench-env

install: $(STAMP)

# OpenVINO's telemetry is on unless declined: each ov.convert_model then forks the whole (torch-laden) process
# once per event to reach Google Analytics: 0.16 s a conversion against 0.02 s. The last step declines it unless
# this user already chose (the consent file exists); benchmarks/RESULTS.md, "OpenVINO telemetry".
# --no-deps: the lock is complete, and nothing may pull another torch build than the pinned CPU wheel.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	test -e "$$HOME/intel/openvino_telemetry" || $(VENV)/bin/opt_in_out --opt_out
	touch $(STAMP)

# The benchmark worker's environment (as on a device host): Airflow's Celery worker, OpenVINO, ONNX Runtime and
# pruneflow, without torch. tests/test_bench_env.py runs the benchmark stage in it.
bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): requirements-bench.lock pyproject.toml
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-bench.lock
	$(BENCH_PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BENCH_PY) -m pip check
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(PY) -m pruneflow.demo --out $(OUT)/demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

system-deps:
	bash scripts/system-deps.sh

test: $(STAMP) $(BENCH_STAMP) system-deps lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/trial_stages.py
	$(PY) benchmarks/macs_vs_latency.py
	$(PY) benchmarks/airflow_overhead.py
	$(PY) benchmarks/search_efficiency.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache

# The embedded Airflow (scheduler, dag-processor, triggerer, api-server) in .airflow/; results stay in out/.
# EXECUTOR=celery: the distributed deployment on this machine (Redis, PostgreSQL, Celery workers for the
# training stages and per device for the benchmark), loopback only; a home keeps the executor of its first init.
EXECUTOR ?= local
# DEVICES=cpu0,cpu1 (celery, first init only): the benchmark devices, one worker and pool each
DEVICES ?=
.PHONY: up down status
up: $(STAMP)
	$(PY) -m pruneflow.cli airflow up --executor $(EXECUTOR) $(if $(DEVICES),--devices $(DEVICES))

down: $(STAMP)
	$(PY) -m pruneflow.cli airflow down

status: $(STAMP)
	$(PY) -m pruneflow.cli airflow status
