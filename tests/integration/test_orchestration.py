"""The whole pipeline as a team runs it: an MLflow server, then flows/README.md's `make prefect-server`, `make deploy`
and `prefect deployment run` commands in a fresh copy of the repository, stages through DVC with a (local-folder) DVC
remote, then the registry gate and a served model.

One run of the committed params.yaml (about 13 minutes here): it checks the deployments (nightly's schedule, no path
of the deploying shell baked in), the flow as Prefect's UI shows it (run names, "Skipped" states, the summary
artifact), the retry of a killed stage and no retry of a mistyped one, every stage's MLflow run nested under one
pipeline run and its metrics (each task beating its trivial baseline), the registry, `mlflow models serve`, a second
trigger that DVC skips entirely (and that opens no MLflow run), and the DVC remote round trip.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from blip.data import language
from tests.conftest import REPO
from tests.integration.conftest import run
from tests.integration.servers import free_port, orchestration, process

pytestmark = pytest.mark.slow
TASKS = ("retrieval-zeroshot", "retrieval-finetune", "caption-finetune", "vqa-finetune", "nlvr-finetune")
TRACKED = ("ingest", "vocab", "pretrain", "capfilt", "repretrain",
           *(f"{task}@{model}" for task in TASKS for model in ("pretrain", "capfilt")))  # fmt: skip
# No MLflow run: `blip summary` only gathers metrics files; `blip sources` finds no remote location to record here.
STAGES = (*TRACKED, "sources", "summary")
TASK_METRICS = tuple(f"{name}{suffix}" for name in ("retrieval_zeroshot", "retrieval", "caption", "vqa", "nlvr")
                     for suffix in ("", "_capfilt"))  # fmt: skip
REGISTERED = ("blip-captioner", "blip-retrieval", "blip-vqa", "blip-nlvr")
DEPLOYMENTS = {"nightly", "pipeline-cpu", "finetune", "evaluate"}


def api(env: dict[str, str], path: str, body: dict | None = None) -> list[dict] | dict:
    """Prefect's REST API, what its UI shows: a POST with `body`, else a GET."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{env['PREFECT_API_URL']}/{path}", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def documented(command: str) -> list[str]:
    """A command of flows/README.md's walkthrough, exactly as written there."""
    assert command in (REPO / "flows/README.md").read_text(), command
    return shlex.split(command)


def deployment_run(repo: Path, env: dict[str, str], args: list[str], ok: bool = True) -> dict:
    """Run `prefect deployment run ... --watch`; the flow run it created, once it has ended."""
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=2400)
    assert (done.returncode == 0) == ok, f"{args}:\n{done.stdout}\n{done.stderr}"
    (flow_run_id,) = re.findall(r"UUID: ([0-9a-f-]{36})", done.stdout)
    return api(env, f"flow_runs/{flow_run_id}")


def subflows(env: dict[str, str], flow_run: dict) -> dict[str, dict]:
    runs = api(env, "flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run["id"]]}}})
    return {f["name"]: f for f in runs}


def artifacts_of(env: dict[str, str], flow_run: dict) -> dict[str, str]:
    found = api(env, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    return {a["key"]: a["data"] for a in found}


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
    return deployment_run(repo, env, documented("prefect deployment run blip-pipeline/pipeline-cpu --watch"))


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def stage_runs(client: MlflowClient) -> list:
    return [r for r in all_runs(client) if r.data.tags.get("dvc.stage") in STAGES]


def pipeline_runs(client: MlflowClient) -> list:
    return [r for r in all_runs(client) if r.data.tags.get("blip.stage") == "pipeline"]


def summary_rows(markdown: str) -> dict[str, list[str]]:
    """The pipeline's summary artifact: stage -> its row (status, time, headline metric, MLflow run)."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()[2:]]
    return {row[0]: row[1:] for row in rows}


def test_prefect_deployment_runs_the_pipeline_retries_registers_serves_then_skips(clone, tmp_path: Path) -> None:
    repo, env = clone
    logs = tmp_path / "logs"
    logs.mkdir()
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], repo, env)
    # As a developer's shell may export it: deploying must not bake the deploying machine's path into a deployment.
    env = {**env, "BLIP_PROJECT_DIR": str(tmp_path / "not-the-worker-checkout")}
    for command in ("make prefect-server", "make deploy"):  # what orchestration() runs
        documented(command)
    with orchestration(repo, env, logs) as env:
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        deployments = {d["name"]: d for d in api(env, "deployments/filter", {})}
        assert set(deployments) == DEPLOYMENTS
        assert [s["schedule"]["cron"] for s in deployments["nightly"]["schedules"]] == ["0 2 * * *"]
        assert "not-the-worker-checkout" not in json.dumps([d["pull_steps"] for d in deployments.values()])
        killed: list[int] = []
        kill_pretrain_once(after_s=15, killed=killed)
        first = trigger(repo, env)
        assert first["state_type"] == "COMPLETED", (logs / "deploy.log").read_text()[-5000:]
        assert killed, "the pretrain process was never seen"
        assert re.fullmatch(r"pipeline-all-\d{4}-\d\d-\d\d-\d{4}", first["name"]), first["name"]

        # Every stage ran as a subflow; the killed one was retried by its task (and resumed).
        stages = subflows(env, first)
        assert sorted(stages) == sorted(STAGES)
        # `sources` runs every time; its listing (no remote location) is the one dvc.lock holds: nothing new, "Skipped".
        states = {name: flow["state_name"] for name, flow in stages.items()}
        assert {name for name, state in states.items() if state != "Completed"} == {"sources"}
        assert states["sources"] == "Skipped"
        tasks = api(env, "task_runs/filter", {"flow_runs": {"id": {"any_": [stages["pretrain"]["id"]]}}})
        (repro,) = [t for t in tasks if t["name"] == "dvc repro pretrain"]
        assert repro["run_count"] == 2 and repro["state_type"] == "COMPLETED"
        artifacts = artifacts_of(env, first)
        assert "registered as version" in artifacts["promotion"]
        summary = summary_rows(artifacts["pipeline-summary"])
        assert sorted(summary) == sorted(STAGES) and summary["sources"][0] == "skipped"
        assert {row[0] for name, row in summary.items() if name != "sources"} == {"ran"}
        assert summary["caption-finetune@capfilt"][2].startswith("CIDEr ")  # the stage's figure in `blip summary`
        assert summary["pretrain"][2].startswith("eval_i2t_r1 ")
        caption = artifacts_of(env, stages["caption-finetune@capfilt"])["stage-caption-finetune-capfilt"]
        assert "CIDEr" in caption and "/#/experiments/" in caption  # its metrics and a link to its MLflow run

        # MLflow: a finished run with metrics for every stage (the killed attempt may leave one more), each nested
        # under the one pipeline run and linked from the summary.
        (parent,) = pipeline_runs(client)
        assert parent.info.status == "FINISHED"
        runs = stage_runs(client)
        for stage in TRACKED:
            done = [r for r in runs if r.data.tags["dvc.stage"] == stage and r.info.status == "FINISHED"]
            assert done and done[0].data.metrics, stage
            assert {r.data.tags["mlflow.parentRunId"] for r in done} == {parent.info.run_id}, stage
            assert f"/runs/{done[0].info.run_id})" in summary[stage][3], stage
        metrics = {name: json.loads((repo / f"metrics/{name}.json").read_text()) for name in TASK_METRICS}
        check_task_metrics(repo, metrics)

        # The registry: every model has a champion carrying its lineage.
        for name in REGISTERED:
            champion = client.get_model_version_by_alias(name, "champion")
            assert champion.tags["dvc.md5.weights"] and champion.tags["git.commit"]
            assert client.get_run(champion.run_id).data.tags["dvc.stage"] in STAGES
        serve_and_caption(repo, env, logs)

        # One stage on demand, as documented: DVC finds it up to date, and the run says so, linking the run behind
        # its metrics. A mistyped stage fails at once (no retry) with DVC's error logged as an error.
        evaluate = deployment_run(repo, env, documented("prefect deployment run blip-stage/evaluate -p "
                                                        "stage=retrieval-zeroshot@pretrain --watch"))  # fmt: skip
        assert evaluate["state_type"] == "COMPLETED" and evaluate["state_name"] == "Skipped"
        (zeroshot,) = [r for r in runs if r.data.tags["dvc.stage"] == "retrieval-zeroshot@pretrain"]
        assert f"/runs/{zeroshot.info.run_id})" in artifacts_of(env, evaluate)["stage-retrieval-zeroshot-pretrain"]
        typo = deployment_run(repo, env, ["prefect", "deployment", "run", "blip-stage/evaluate", "-p",
                                          "stage=retrieval-zeroshot@pretrian", "--watch"], ok=False)  # fmt: skip
        assert typo["state_type"] == "FAILED"
        (task,) = api(env, "task_runs/filter", {"flow_runs": {"id": {"any_": [typo["id"]]}}})
        assert task["name"] == "dvc repro retrieval-zeroshot@pretrian" and task["run_count"] == 1
        errors = api(env, "logs/filter", {"logs": {"flow_run_id": {"any_": [typo["id"]]}, "level": {"ge_": 40}}})
        assert any(e["message"].startswith("ERROR") and "Stage 'retrieval-zeroshot@pretrian' not found" in e["message"]
                   for e in errors)  # fmt: skip

        # Nothing changed: the second run skips every stage through DVC; no new runs (not even an empty pipeline
        # run), versions or files; every stage shows as skipped, linking the run of the first.
        shard = repo / "data/shards/web/shard-000000.tar"
        stamp, versions = shard.stat().st_mtime_ns, len(client.search_model_versions("name = 'blip-captioner'"))
        before = len(all_runs(client))
        second = trigger(repo, env)
        assert second["state_type"] == "COMPLETED" and second["id"] != first["id"]
        assert len(all_runs(client)) == before and shard.stat().st_mtime_ns == stamp
        assert len(client.search_model_versions("name = 'blip-captioner'")) == versions
        assert {f["state_name"] for f in subflows(env, second).values()} == {"Skipped"}
        skipped = summary_rows(artifacts_of(env, second)["pipeline-summary"])
        assert {row[0] for row in skipped.values()} == {"skipped"} and len(skipped) == len(STAGES)
        assert all(skipped[stage][3] == summary[stage][3] for stage in STAGES)

    # The DVC remote the stages pushed to holds everything: drop the cache and outputs, pull, and all is back.
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / "models")
    run(["dvc", "pull"], repo, env)
    assert shard.stat().st_size > 0
    status = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {"sources": ["always changed"]}  # DVC runs `sources` every time


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
