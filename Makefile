# together-meter: every target creates/uses .venv
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# atheris (the `fuzz` extra) for `make fuzz` and the long tier: tests/fuzz/README.md
FUZZ_STAMP := $(VENV)/.installed-fuzz
FUZZ_RUNS ?= 200000
FUZZ_SECONDS ?= 60

.PHONY: demo serve test test-long lint bench install clean fuzz container-test sdk-envs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/together-meter demo

serve: $(STAMP)
	$(VENV)/bin/together-meter serve --config config/example.yaml

# The SDK matrix's environments (tests/sdk/envs.py): together 1.x and 2.x venvs, Node 22 (from npm)
# and the Node SDKs,
# made once under ~/.cache/together-meter-sdk (keyed by their pins, reused after), bounded in time
sdk-envs: $(STAMP)
	$(PY) -m tests.sdk.envs

test: $(STAMP) sdk-envs
	$(PY) -m ruff check proxy tests
	$(PY) -m ruff format --check proxy tests
	$(PY) -m mypy
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow"

test-long: $(STAMP) $(FUZZ_STAMP) sdk-envs
	$(PY) -m pytest -q

$(FUZZ_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,fuzz]'
	touch $(FUZZ_STAMP)

fuzz: $(FUZZ_STAMP)
	$(PY) tests/fuzz/runner.py --runs $(FUZZ_RUNS) --seconds $(FUZZ_SECONDS)

lint: $(STAMP)
	$(PY) -m ruff check proxy tests
	$(PY) -m ruff format --check proxy tests
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# The container tier (root, podman): build the Dockerfile on a local base, run the image and the
# compose stack (docker-compose.yml + deploy/compose.ci.yml) and check them; bounded to 20 min.
# README.md#docker says what it proves. .ci/run runs it after `test`.
container-test: $(STAMP)
	CHECK_PYTHON=$(PY) timeout --kill-after=30 1200 bash deploy/container-test.sh

bench: $(STAMP)
	bash bench/run.sh

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache .mypy_cache
