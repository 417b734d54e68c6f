"""`dvc repro` on the committed params, in a fresh copy of the repository: runs every stage, then skips them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
STAGES = ("ingest", "vocab", "pretrain", "retrieval-zeroshot", "retrieval-finetune", "caption-finetune",
          "vqa-finetune", "nlvr-finetune")  # fmt: skip
TASK_METRICS = ("retrieval_zeroshot", "retrieval", "caption", "vqa", "nlvr")


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


def test_dvc_repro_runs_the_pipeline_then_does_nothing(clone: tuple[Path, dict[str, str]]) -> None:
    repo, env = clone
    out = run(["dvc", "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["web"]["samples"] == 6000 and manifest["skipped"]["total"] == 0
    assert manifest["splits"]["clean_train"]["samples"] == 800
    assert json.loads((repo / "metrics/ingest.json").read_text())["samples"]["web"] == 6000
    pretrain = json.loads((repo / "metrics/pretrain.json").read_text())
    assert pretrain["eval_i2t_r1"] > 5 * pretrain["eval_chance_r1"]  # ITC learned (measured: 10% vs 0.5%)
    metrics = {name: json.loads((repo / f"metrics/{name}.json").read_text()) for name in TASK_METRICS}
    # Every task beats its trivial baseline by a clear margin (figures measured on this CPU in the comments).
    assert metrics["caption"]["CIDEr"] > 1.5 * metrics["caption"]["constant_CIDEr"]  # 1.47 vs 0.65
    for name in ("retrieval", "retrieval_zeroshot"):
        retrieval = metrics[name]
        for direction in ("txt", "img"):  # retrieval: 3.8 / 2.2 vs chance 0.2; semantic 21 / 29 vs 11
            assert retrieval[f"{direction}_r1"] > 5 * retrieval["chance_r1"]
            assert retrieval[f"semantic_{direction}_r1"] > 1.5 * retrieval["semantic_chance_r1"]
    vqa = metrics["vqa"]  # rank 50, majority answer 15, question-type prior 30
    for mode in ("rank", "generate"):
        assert vqa[f"{mode}_accuracy"] > vqa["type_prior_accuracy"] + 5 > vqa["majority_answer_accuracy"] + 5
    assert metrics["nlvr"]["accuracy"] > 58 > metrics["nlvr"]["majority_label_accuracy"] + 5  # 67 vs 49
    assert (repo / "reports/caption/gallery.png").stat().st_size > 10_000
    assert (repo / "reports/retrieval/recall_at_k.png").stat().st_size > 10_000
    assert len(json.loads((repo / "reports/vqa/results_rank.json").read_text())) == 1500
    shard = repo / "data/shards/web/shard-000000.tar"
    stamp = shard.stat().st_mtime_ns

    again = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again and "didn't change" in again
    assert shard.stat().st_mtime_ns == stamp
    assert "up to date" in run(["dvc", "status"], repo, env).lower()
    (shown,) = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env)).values()
    assert shown["data"]["metrics/ingest.json"]["data"]["samples"]["web"] == 6000
    assert {f"metrics/{name}.json" for name in TASK_METRICS} <= set(shown["data"])
