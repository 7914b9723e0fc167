# lorafleet developer entry points. Tools and the virtualenv are cached outside the repo
# (~/.cache/lorafleet, or $LORAFLEET_CACHE), keyed by their versions and requirements.lock.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTEST_ARGS ?=

.PHONY: help tools venv venv-vllm up down status test test-unit test-api test-e2e test-vllm crds bench

help:
	@echo "make up        install everything, start the local stack, run a demo request"
	@echo "make down      stop everything 'make up' started"
	@echo "make test      build tools if needed, run every test tier (what CI runs)"
	@echo "make test-unit / test-api / test-e2e / test-vllm   one tier (test-vllm: the vLLM engine, its own venv)"
	@echo "make crds      regenerate crds/ (and the chart's copy) from contracts/"
	@echo "make bench     run the benchmarks (writes nothing; copy figures into docs/benchmarks.md)"

tools:
	@tools/install-test-tools >/dev/null

venv:
	@tools/venv >/dev/null

# The vLLM engine's virtualenv (docker/vllm/requirements.lock: its pins conflict with requirements.lock).
venv-vllm:
	@tools/venv-vllm >/dev/null

up: tools venv
	@"$$(tools/venv)/bin/python" -m lorafleet.localstack.stack up

down:
	@"$$(tools/venv)/bin/python" -m lorafleet.localstack.stack down

status:
	@"$$(tools/venv)/bin/python" -m lorafleet.localstack.stack status

# The e2e tier runs in a pytest process of its own: threads that api-tier tests leave behind (in-process
# sidecars' API clients) once wrote into sockets the e2e clients had reused. The vLLM tier runs in its own
# virtualenv (tools/venv-vllm).
test: tools venv venv-vllm
	@"$$(tools/venv)/bin/python" -m pytest --durations=20 tests/unit tests/api $(PYTEST_ARGS) && \
	  "$$(tools/venv)/bin/python" -m pytest --durations=10 tests/e2e $(PYTEST_ARGS) && \
	  "$$(tools/venv-vllm)/bin/python" -m pytest --durations=10 tests/vllm $(PYTEST_ARGS) && \
	  LORAFLEET_VLLM_VENV="$$(tools/venv-vllm)" "$$(tools/venv)/bin/python" -m pytest --durations=10 tests/vllm_stack $(PYTEST_ARGS)

test-unit: venv
	@"$$(tools/venv)/bin/python" -m pytest tests/unit $(PYTEST_ARGS)

test-api: tools venv
	@"$$(tools/venv)/bin/python" -m pytest tests/api $(PYTEST_ARGS)

test-e2e: tools venv
	@"$$(tools/venv)/bin/python" -m pytest tests/e2e $(PYTEST_ARGS)

# tests/vllm_stack: the local stack from the main virtualenv, the vLLM runtime image's pods from the vLLM one.
test-vllm: tools venv venv-vllm
	@"$$(tools/venv-vllm)/bin/python" -m pytest tests/vllm $(PYTEST_ARGS) && \
	  LORAFLEET_VLLM_VENV="$$(tools/venv-vllm)" "$$(tools/venv)/bin/python" -m pytest tests/vllm_stack $(PYTEST_ARGS)

crds: venv
	@"$$(tools/venv)/bin/lorafleet" gen-crds --out crds
	@if [ -d charts/lorafleet/crds ]; then cp crds/*.yaml charts/lorafleet/crds/; fi

bench: venv
	@for b in bench/*_bench.py; do echo "== $$b"; "$$(tools/venv)/bin/python" "$$b" || exit 1; done
