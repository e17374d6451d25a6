# Two set-up-free entry points: `make demo` and `make test` create .venv when needed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test mutations install clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch and torchvision are installed together: torchvision only imports beside its own torch.
	$(VENV)/bin/pip install --quiet torch torchvision
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raysd tune --space demo

# Two pytest-xdist workers: a trial keeps about one core busy, so two share a 2-core machine
# (tests that share a session fixture run in one worker: conftest.py). --durations: the 30
# slowest tests, so CI's log shows where the suite's time goes.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadgroup --durations=30

# Applies each bug of benchmarks/mutations.py alone to a copy and runs its fast tests;
# two at a time by default (`make mutations JOBS=1` for one). About 5 min on 2 cores.
JOBS ?= 2
mutations: $(STAMP)
	$(VENV)/bin/python benchmarks/mutations.py --jobs $(JOBS)

# The environment only: raysd_results/ holds the user's studies and is never deleted here.
clean:
	rm -rf $(VENV)
