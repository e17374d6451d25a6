# Two set-up-free entry points: `make demo` and `make test` create .venv when needed.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

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

# --durations: the 30 slowest tests, so CI's log shows where the suite's time goes.
test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q --durations=30

clean:
	rm -rf $(VENV) raysd_results
