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

.PHONY: install pipeline test lint format clean mlflow-ui prefect-server deploy bench

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

# The local UIs, on 127.0.0.1 only. MLflow reads the project's SQLite store (what `make pipeline` writes).
# MLflow 3.17's UI picks its GenAI or model-training view from the URL (then remembers it), not from the experiment.
mlflow-ui: $(STAMP)
	@echo "runs table: http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# PREFECT_PORT=... serves on another port. Prefect keeps its SQLite database in PREFECT_HOME but creates no missing
# parent folder, and a fresh clone has no .cache.
PREFECT_PORT ?= 4200
prefect-server: $(STAMP)
	mkdir -p $(PREFECT_HOME)
	prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# With `make prefect-server` running: the pools `cpu` (process) and `gpu` (Kubernetes, infra/k8s), every deployment
# of prefect.yaml (`nightly`'s schedule shows; its runs wait for a GPU worker) and a `cpu` worker for this checkout.
deploy: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
deploy: $(STAMP)
	mkdir -p $(PREFECT_HOME)
	prefect work-pool inspect cpu >/dev/null 2>&1 || prefect work-pool create cpu --type process
	prefect work-pool inspect gpu >/dev/null 2>&1 || \
		prefect work-pool create gpu --type kubernetes --base-job-template infra/k8s/gpu-job-template.json
	prefect --no-prompt deploy --all
	BLIP_PROJECT_DIR=$(CURDIR) prefect worker start --pool cpu --type process

# The CPU benchmarks (a few minutes here); benchmarks/gpu.sh runs them at base size on a GPU.
bench: $(STAMP)
	python -m benchmarks.cpu_floor --batch 4 --repeats 3
	python -m benchmarks.pretrain_step --sizes tiny base --steps 3
	python -m benchmarks.data_and_capfilt --workers 1 2
	python -m benchmarks.object_storage --samples 10000 --workers 1 2 --loader-workers 1 2
	python benchmarks/retrieval_eval.py --sizes 1000 2000
	python -m benchmarks.onnx_vs_torch --sizes tiny --batch 8
	python -m benchmarks.serving_load --requests 300 --concurrency 4
	# last, so that the figures above are written even when a ratio misses its target
	python -m benchmarks.vs_transformers --sizes tiny base --batch 4 --repeats 5 --check

lint: $(STAMP)
	ruff check . && ruff format --check .

format: $(STAMP)
	ruff format . && ruff check --fix .

clean:
	rm -rf data metrics .cache
