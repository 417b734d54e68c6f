"""The small project the integration tests share: ingested shards and a fitted vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blip.stages.ingest import main as ingest_main
from blip.stages.vocab import main as vocab_main
from tests.conftest import SMALL_WORLD, write_params

TRAIN = {"epochs": 1, "steps_per_epoch": 20, "batch_size": 16, "log_every": 2, "checkpoint_every": 5,
         "warmup_steps": 4, "eval_images": 10, "deterministic": True}  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ingested shards and a fitted vocabulary, shared by the tests (each trains in its own folder)."""
    root = tmp_path_factory.mktemp("project")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        ingest = {"out_dir": "data/shards", "samples_per_shard": 25, "sources": [{"format": "synthetic"}]}
        params = write_params(root, world=SMALL_WORLD, ingest=ingest, data={"num_workers": 2},
                              pretrain=TRAIN)  # fmt: skip
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'setup.db'}"
        assert ingest_main(["--params", str(params), "--no-progress"]) == 0
        assert vocab_main(["--params", str(params)]) == 0
    finally:
        os.chdir(cwd)
    return root


def run_args(project: Path, out: Path, **extra: object) -> list[str]:
    sets = {"data.shard_root": project / "data/shards", "vocab.out": project / "data/vocab/vocab.txt",
            "tokenizer.name": project / "data/vocab/vocab.txt", "pretrain.checkpoint_dir": out / "checkpoints",
            "pretrain.output": out / "weights.safetensors", **extra}  # fmt: skip
    args = ["--params", str(project / "params.yaml")]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def env_for(out: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
