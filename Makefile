# `make test` builds .venv from nothing (Python 3.13 via .python-version) and runs everything CI runs.
PYTHON ?= $(shell command -v python3.13 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
BASTION := $(VENV)/bin/bastion

.PHONY: test lint unit policy-tests run bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: $(VENV)/.installed lint policy-tests unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Every example policy ships with a `bastion test` suite beside it (`<name>_test.yaml`) that matches each of its
# rules at least once (--require-all-rules): a rule no case reaches could break unnoticed.
policy-tests: $(VENV)/.installed
	$(BASTION) check rules/default.yaml
	@set -e; for suite in rules/examples/*_test.yaml; do \
	  $(BASTION) check $${suite%_test.yaml}.yaml; \
	  $(BASTION) test --require-all-rules --rules $${suite%_test.yaml}.yaml $$suite; done

unit: $(VENV)/.installed
	$(PY) -m pytest -q

run: $(VENV)/.installed
	$(BASTION) serve --rules rules/default.yaml

bench: $(VENV)/.installed
	$(PY) bench/policy_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
