# Two entry points: `make run` (main experiment) and `make test` (whole suite).
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
export MUJOCO_GL ?= egl

.PHONY: run test bench venv clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(PY) dreamer.py --configs small --task dmc_cartpole_balance

test: $(STAMP)
	$(PY) -m pytest -q tests test_detector.py

bench: $(STAMP)
	$(PY) bench.py

clean:
	rm -rf $(VENV) .pytest_cache
