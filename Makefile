# Two commands on a fresh machine: `make pipeline` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Keep every tool's state inside the project's ignored folders, and offline.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_HOME := $(CURDIR)/.cache/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install pipeline test lint format clean

$(STAMP): pyproject.toml requirements.lock.txt
	test -x $(PY) || python3.11 -m venv $(VENV)
	# torch first, by exact version: pip takes these two from the machine's disk.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c requirements.lock.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

pipeline: $(STAMP)
	dvc repro

test: $(STAMP)
	pytest -q

lint: $(STAMP)
	ruff check . && ruff format --check .

format: $(STAMP)
	ruff format . && ruff check --fix .

clean:
	rm -rf data metrics .cache
