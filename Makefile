# The two commands of the course, on a fresh machine with no GPU and no internet:
#   make demo   train the CPU model (10 min) and write samples.png beside the reference model's
#   make test   unit tests, notebooks under nbval, papermill and multi-process checks
#   make lab    open the lessons in JupyterLab (installs it with the dev extras)
#   make test-oldest  the unit tests with every dependency at its declared floor (below)
#
# Both create .venv, install torch first when it is missing (TORCH_SPEC, overridable: a plain
# `torch` from PyPI pulls a multi-GB CUDA build), then this package with its dev extras.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.tld-installed
OLDEST      ?= .venv-oldest
TEST_ARGS   ?=

.PHONY: install demo test test-fast test-oldest notebooks lint course course-installed lab clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tld.demo

test: $(STAMP)
	$(PY) -m pytest -q tests notebooks solutions --nbval-lax -p no:cacheprovider $(TEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow and not multiprocess" -p no:cacheprovider

# The declared floors hold: a fresh $(OLDEST) gets this machine's torch first (TORCH_SPEC), then the
# package with its hub, lab and dev extras and every other dependency pinned to exactly its floor
# (.ci/floors.py prints them from pyproject.toml; pip failing to resolve them means two floors cannot be
# installed together), then the unit tests (not the notebooks). torch stays at TORCH_SPEC, pinned again
# with the floors so that none can move it: its declared floor (2.1) has no CPU wheel on PyPI, only
# multi-GB CUDA builds, so it is not tested here.
test-oldest:
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(OLDEST)/bin/python .ci/floors.py > $(OLDEST)/floors.txt
	echo "$(TORCH_SPEC)" >> $(OLDEST)/floors.txt
	$(OLDEST)/bin/python -m pip install -q -r $(OLDEST)/floors.txt -e ".[dev]"
	$(OLDEST)/bin/python -m pip check
	$(OLDEST)/bin/python -m pytest -q tests -m "not slow and not multiprocess" -p no:cacheprovider

notebooks: $(STAMP)
	$(PY) -m pytest -q --nbval-lax notebooks solutions -p no:cacheprovider

course: $(STAMP)
	$(PY) -m tld.course run --preset cpu

# every lesson and solution from a wheel installed in a fresh venv, run outside the repo (the learner's path)
course-installed: $(STAMP)
	$(PY) -m tld.course run --preset cpu --installed

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

lint: $(STAMP)
	$(PY) -m ruff check tld tests

clean:
	rm -rf build runs samples.png .pytest_cache
