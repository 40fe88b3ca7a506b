# The two commands of the contract: `make run` and `make test`. Both set everything up first.
VENV := .venv
PY := $(VENV)/bin/python
export AIOSD_STATE_DIR ?= $(CURDIR)/.state
export AIOSD_RUNTIME_DIR ?= $(CURDIR)/.run

.PHONY: install run test bench clean

install:
	@scripts/install.sh

run: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .state .run *.egg-info
