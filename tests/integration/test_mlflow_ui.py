"""What MLflow's UI shows of two variants of a stage, read through the REST API the UI itself calls.

The runs table and the compare view need: the experiment to open on its runs (its kind), a variant tag and a
description on each run, only the stage's own hyperparameters as params, summary figures logged once, and the
same artifact names for both variants so that compare-artifacts lines them up.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from blip.config import load_params
from blip.data.tokenizer import load_tokenizer
from blip.models.checkpoint import save_weights
from blip.models.factory import build_model
from blip.stages.retrieval import main as retrieval_main
from tests.integration.servers import free_port, process

pytestmark = pytest.mark.slow
EVAL = {"split": "clean_test", "images": 10, "k_test": 4, "itc_chunk": 3, "itm_batch": 7}


def rest(base: str, path: str, query: dict | None = None, body: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_variants_of_a_stage_line_up_in_the_runs_table_and_compare_view(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    vocab = project / "data/vocab/vocab.txt"
    params = load_params(project / "params.yaml", [f"tokenizer.name={vocab}"])
    init = save_weights(build_model("pretrain", params.model, load_tokenizer(str(vocab)), queue_size=0),
                        tmp_path / "pretrain.safetensors", str(vocab))  # fmt: skip
    for variant, suffix in (("pretrain", ""), ("capfilt", "_capfilt")):
        # As dvc.yaml runs the two variants (DVC names the stage in DVC_STAGE).
        monkeypatch.setenv("DVC_STAGE", f"retrieval-finetune@{variant}")
        sets = {"data.shard_root": project / "data/shards", "tokenizer.name": vocab, "retrieval.init": init,
                "retrieval.epochs": 1, "retrieval.steps_per_epoch": 4, "retrieval.batch_size": 8,
                "retrieval.log_every": 2, "retrieval.output": f"models/retrieval{suffix}.safetensors",
                "retrieval.checkpoint_dir": tmp_path / f"ck{suffix}",
                **{f"retrieval.eval.{k}": v for k, v in EVAL.items()}}  # fmt: skip
        args = ["--params", str(project / "params.yaml")]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        assert retrieval_main(args) == 0

    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    server = [mlflow, "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
              "--workers", "1"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with process(server, tmp_path / "server.log", tmp_path, dict(os.environ), f"{base}/health", timeout=120):
        experiment = rest(base, "experiments/get-by-name", {"experiment_name": "blip-pipeline"})["experiment"]
        tags = {t["key"]: t["value"] for t in experiment["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs table
        found = rest(base, "runs/search", body={"experiment_ids": [experiment["experiment_id"]]})["runs"]
        runs = {}
        for run in found:
            run_tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            runs[run_tags["blip.variant"]] = (run, run_tags)
        assert set(runs) == {"pretrain", "capfilt"}
        artifact_names = []
        for variant, (run, run_tags) in runs.items():
            run_id = run["info"]["run_id"]
            assert run_tags["dvc.stage"] == f"retrieval-finetune@{variant}"
            assert run_tags["mlflow.note.content"].startswith("retrieval fine-tune (ITC + ITM) from ")
            # The runs table's columns: only this stage's hyperparameters; file settings are tags.
            names = {p["key"] for p in run["data"]["params"]}
            assert {n.split(".")[0] for n in names} == {"retrieval", "model", "tokenizer", "data"}
            assert "retrieval.lr" in names and not names & {"retrieval.init", "retrieval.output", "caption.lr"}
            assert run_tags["retrieval.init"] == str(init)
            # Summary figures once, at step 0 (drawn as bars), training curves per step.
            history = rest(base, "metrics/get-history", {"run_id": run_id, "metric_key": "txt_r1"})["metrics"]
            assert [m["step"] for m in history] == [0]
            curve = rest(base, "metrics/get-history", {"run_id": run_id, "metric_key": "loss"})["metrics"]
            assert [m["step"] for m in curve] == [2, 4]
            listed = rest(base, "artifacts/list", {"run_id": run_id})["files"]
            artifact_names.append({f["path"] for f in listed})
        # The compare view's artifact tab lines both variants up: the same names, none named after the variant.
        assert artifact_names[0] == artifact_names[1]
        expected = {"config.yaml", "metrics.json", "training_curves.csv", "training_curves.png", "weights.safetensors",
                    "recall_at_k.png"}  # fmt: skip
        assert expected <= artifact_names[0]
