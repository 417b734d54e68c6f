"""The whole pipeline as a team runs it: Prefect server + process worker + MLflow server on 127.0.0.1, deployed from
prefect.yaml, stages through DVC with a (local-folder) DVC remote, then the registry gate and a served model.

One run of the committed params.yaml in a fresh copy of the repository (about 13 minutes here): it checks the
flow, the retry of a killed stage, every stage's MLflow run and metrics (each task beating its trivial baseline),
the registry, `mlflow models serve`, a second trigger that DVC skips entirely, and the DVC remote round trip.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from blip.data import language
from tests.integration.conftest import run
from tests.integration.servers import free_port, orchestration, process

pytestmark = pytest.mark.slow
TASKS = ("retrieval-zeroshot", "retrieval-finetune", "caption-finetune", "vqa-finetune", "nlvr-finetune")
STAGES = ("ingest", "vocab", "pretrain", "capfilt", "repretrain",
          *(f"{task}@{model}" for task in TASKS for model in ("pretrain", "capfilt")))  # fmt: skip
TASK_METRICS = tuple(f"{name}{suffix}" for name in ("retrieval_zeroshot", "retrieval", "caption", "vqa", "nlvr")
                     for suffix in ("", "_capfilt"))  # fmt: skip
REGISTERED = ("blip-captioner", "blip-retrieval", "blip-vqa", "blip-nlvr")


def api(env: dict[str, str], path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}/{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def kill_pretrain_once(after_s: float, killed: list[int]) -> threading.Thread:
    """An infrastructure failure: SIGKILL the first `blip pretrain` process once it has run `after_s`."""

    def watch() -> None:
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            for proc in psutil.process_iter(["cmdline", "create_time"]):
                cmd = proc.info["cmdline"] or []
                is_pretrain = any(part.endswith("/blip") for part in cmd) and "pretrain" in cmd
                if is_pretrain and time.time() - proc.info["create_time"] > after_s:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
            time.sleep(1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def trigger(repo: Path, env: dict[str, str]) -> dict:
    run(["prefect", "--no-prompt", "deployment", "run", "blip-pipeline/pipeline-cpu", "--watch",
         "--watch-timeout", "2400"], repo, env)  # fmt: skip
    (flow_run,) = api(env, "flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}},
                                                "sort": "START_TIME_DESC", "limit": 1})  # fmt: skip
    return flow_run


def stage_runs(client: MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(experiments, max_results=1000) if r.data.tags.get("dvc.stage") in STAGES]


def test_prefect_deployment_runs_the_pipeline_retries_registers_serves_then_skips(clone, tmp_path: Path) -> None:
    repo, env = clone
    logs = tmp_path / "logs"
    logs.mkdir()
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], repo, env)
    with orchestration(repo, env, logs) as env:
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        run(["prefect", "--no-prompt", "deploy", "--name", "pipeline-cpu"], repo, env)
        killed: list[int] = []
        kill_pretrain_once(after_s=15, killed=killed)
        first = trigger(repo, env)
        assert first["state_type"] == "COMPLETED", (logs / "worker.log").read_text()[-5000:]
        assert killed, "the pretrain process was never seen"

        # The killed stage was retried by its task (and resumed), every stage ran once under the pipeline.
        subflows = api(env, "flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": False}}})
        assert sorted(f["name"] for f in subflows) == sorted(STAGES)
        pretrain = next(f for f in subflows if f["name"] == "pretrain")
        (repro,) = [t for t in api(env, "task_runs/filter", {"flow_runs": {"id": {"any_": [pretrain["id"]]}}})
                    if t["name"].startswith("repro")]  # fmt: skip
        assert repro["run_count"] == 2 and repro["state_type"] == "COMPLETED"
        artifacts = {a["key"]: a["data"] for a in api(env, "artifacts/filter", {})}
        assert "CIDEr" in artifacts["stage-caption-finetune-capfilt"]
        assert "/#/experiments/" in artifacts["stage-caption-finetune-capfilt"]  # a link to the MLflow run
        assert "registered as version" in artifacts["promotion"]

        # MLflow: a finished run with metrics for every stage (the killed attempt may leave one more).
        runs = stage_runs(client)
        for stage in STAGES:
            done = [r for r in runs if r.data.tags["dvc.stage"] == stage and r.info.status == "FINISHED"]
            assert done and done[0].data.metrics, stage
        metrics = {name: json.loads((repo / f"metrics/{name}.json").read_text()) for name in TASK_METRICS}
        check_task_metrics(repo, metrics)

        # The registry: every model has a champion carrying its lineage.
        for name in REGISTERED:
            champion = client.get_model_version_by_alias(name, "champion")
            assert champion.tags["dvc.md5.weights"] and champion.tags["git.commit"]
            assert client.get_run(champion.run_id).data.tags["dvc.stage"] in STAGES
        serve_and_caption(repo, env, logs)

        # Nothing changed: the second run skips every stage through DVC; no new runs, versions or files.
        shard = repo / "data/shards/web/shard-000000.tar"
        stamp, versions = shard.stat().st_mtime_ns, len(client.search_model_versions("name = 'blip-captioner'"))
        before = len(stage_runs(client))
        second = trigger(repo, env)
        assert second["state_type"] == "COMPLETED" and second["id"] != first["id"]
        assert len(stage_runs(client)) == before and shard.stat().st_mtime_ns == stamp
        assert len(client.search_model_versions("name = 'blip-captioner'")) == versions
        assert "up to date (DVC skipped it)" in artifacts_now(env)["stage-pretrain"]

    # The DVC remote the stages pushed to holds everything: drop the cache and outputs, pull, and all is back.
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / "models")
    run(["dvc", "pull"], repo, env)
    assert shard.stat().st_size > 0
    assert "up to date" in run(["dvc", "status"], repo, env).lower()


def artifacts_now(env: dict[str, str]) -> dict[str, str]:
    return {a["key"]: a["data"] for a in api(env, "artifacts/filter", {"sort": "CREATED_DESC"})[::-1]}


def check_task_metrics(repo: Path, metrics: dict[str, dict]) -> None:
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["web"]["samples"] == 6000 and manifest["skipped"]["total"] == 0
    pretrain = json.loads((repo / "metrics/pretrain.json").read_text())
    assert pretrain["eval_i2t_r1"] > 5 * pretrain["eval_chance_r1"]  # ITC learned
    # Every fine-tuned task, on both models, beats its trivial baseline by a clear margin (figures in the README).
    for suffix in ("", "_capfilt"):
        caption = metrics[f"caption{suffix}"]
        assert caption["CIDEr"] > 1.5 * caption["constant_CIDEr"]
        for direction in ("txt", "img"):
            retrieval = metrics[f"retrieval{suffix}"]
            assert retrieval[f"{direction}_r1"] > 5 * retrieval["chance_r1"]
            assert retrieval[f"semantic_{direction}_r1"] > 1.4 * retrieval["semantic_chance_r1"]
            zeroshot = metrics[f"retrieval_zeroshot{suffix}"]
            assert zeroshot[f"{direction}_r1"] > 3 * zeroshot["chance_r1"]
        vqa = metrics[f"vqa{suffix}"]
        for mode in ("rank", "generate"):
            assert vqa[f"{mode}_accuracy"] > vqa["type_prior_accuracy"] + 5 > vqa["majority_answer_accuracy"] + 5
        assert metrics[f"nlvr{suffix}"]["accuracy"] > 58 > metrics[f"nlvr{suffix}"]["majority_label_accuracy"] + 5
    capfilt = json.loads((repo / "metrics/capfilt.json").read_text())
    assert capfilt["filter_auc_itc"] > 0.7 and capfilt["web_total"] == capfilt["synthetic_total"] == 6000
    assert capfilt["filter_precision"] > 0.6 > 0.4 > capfilt["filter_clean_removed"]
    assert (repo / "reports/caption/gallery.png").stat().st_size > 10_000
    assert (repo / "reports/retrieval/recall_at_k.png").stat().st_size > 10_000
    assert len(json.loads((repo / "reports/vqa/results_rank.json").read_text())) == 1500


def serve_and_caption(repo: Path, env: dict[str, str], logs: Path) -> None:
    """`mlflow models serve` of the champion captioner answers a request with a caption in the world's grammar."""
    with tarfile.open(repo / "data/shards/clean_test/shard-000000.tar") as shard:
        jpeg = next(shard.extractfile(m).read() for m in shard.getmembers() if m.name.endswith(".jpg"))
    port = free_port()
    with process(["mlflow", "models", "serve", "-m", "models:/blip-captioner@champion", "--env-manager", "local",
                  "--host", "127.0.0.1", "--port", str(port)], logs / "serve.log", repo, env,
                 f"http://127.0.0.1:{port}/ping", timeout=180):  # fmt: skip
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode()]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            (prediction,) = json.loads(response.read())["predictions"]
    assert language.parse(prediction["caption"]) is not None, prediction  # a sentence of the world's grammar
