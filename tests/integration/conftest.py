"""The small project the integration tests share: ingested shards and a fitted vocabulary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blip.stages.ingest import main as ingest_main
from blip.stages.vocab import main as vocab_main
from tests.conftest import REPO, SMALL_WORLD, write_params

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


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    # Generous: the whole default pipeline runs here, and a busy machine slows it (about 5 minutes alone).
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def clone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "repo"
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }  # fmt: skip
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, copy, env)
    return copy, env
