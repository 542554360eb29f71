# segwatch: `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test bench train-dodgers clean

$(PY):
	$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(PIP) install -q --upgrade pip

# The agent and the demo need only the base install and the embedded broker.
$(VENV)/.agent-installed: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[demo]'
	touch $@

# The tests also exercise the trainer (TensorFlow) and use hypothesis.
$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install -q -e '.[demo,trainer,dev]'
	touch $@

demo: $(VENV)/.agent-installed
	$(PY) -m agent demo

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q

# Inference and agent benchmarks (a few minutes); figures printed and in results/bench-*.json.
bench: $(VENV)/.dev-installed
	$(PY) bench/inference.py
	$(PY) bench/agent.py

# Reproduces the shipped bundle models/dodgers-unet and results/dodgers-unet.json.
train-dodgers: $(VENV)/.dev-installed
	$(VENV)/bin/segwatch-train dodgers

clean:
	rm -rf $(VENV) demo.db demo.db-wal demo.db-shm .pytest_cache
