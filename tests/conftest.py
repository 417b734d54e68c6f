"""Shared fixtures. Tests run offline and keep every tool's state inside their temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from blip.config import load_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]


def _tiny_bert():

    # The committed tiny model with BERT's vocabulary (30,524 with [DEC] and [ENC]), as the BERT-id tests need.
    return load_params(REPO / "params.yaml").model.model_copy(update={"vocab_size": 30524})


TINY_BERT = _tiny_bert()

# A world small enough for unit tests: every split present, a few hundred items.
SMALL_WORLD = {
    "seed": 7,
    "web_images": 200,
    "clean_train": 40,
    "clean_val": 10,
    "clean_test": 20,
    "nlvr_train": 30,
    "nlvr_test": 10,
}


@pytest.fixture(autouse=True)
def _clean_blip_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("BLIP__"):
            monkeypatch.delenv(name)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project folder as the working directory (mlflow.db, metrics/ and data/ land here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def write_params(folder: Path, **sections: dict) -> Path:
    """The committed params.yaml with some sections replaced or updated."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, values in sections.items():
        if isinstance(params.get(name), dict) and name != "ingest":
            params[name] = {**params[name], **values}
        else:
            params[name] = values
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def small_params(workdir: Path) -> Path:
    ingest = {"out_dir": "data/shards", "samples_per_shard": 50, "sources": [{"format": "synthetic"}]}
    return write_params(workdir, world=SMALL_WORLD, ingest=ingest)
