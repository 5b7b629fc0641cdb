# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup test demo bench-setup clean-demo help

help:
	@echo "make demo   - set up .venv, then run the whole pipeline on the synthetic demo data (CPU)"
	@echo "make test   - set up .venv, then run the test suite"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/asd run --config demo

bench-setup: $(STAMP)
	$(PY) -m pip install -q -r benchmarks/requirements.txt

clean-demo:
	rm -rf runs/demo data/demo
