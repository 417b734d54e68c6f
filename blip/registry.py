"""`blip promote`: the model-registry gate, run after evaluation (the Prefect pipeline's last step).

For each registered model in `params.promotion.models` (blip-captioner, blip-retrieval, blip-vqa, blip-nlvr), every
candidate output (models/<stem>.safetensors, evaluated in metrics/<stem>.json) that the registry does not hold yet
(same DVC hash) becomes a new version: an MLflow pyfunc (blip.serving) logged into the run that trained it, tagged with
that run id, the git commit, the DVC hashes of the weights and metrics, and the metric, and described (the registered
model: what it does, its inputs and outputs; the version: its stem, metric and run). The alias (`champion`)
then moves to the best new version only if it beats the current champion on the declared metric. Nothing new
(a rerun with nothing changed) registers nothing and moves nothing. The changes go to reports/promotion.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import yaml

from blip.config import ConfigError, Params
from blip.config.tasks import RegisteredModel
from blip.stages.common import parse_stage_args, stage_parser

REPORT = Path("reports/promotion.md")


@dataclass
class Candidate:
    stem: str
    weights: Path
    value: float
    hashes: dict[str, str]  # tag -> hash


def dvc_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """Output path -> md5 recorded by DVC (empty without a dvc.lock)."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", []) if "md5" in out}


def candidate(stem: str, spec: RegisteredModel, locked: dict[str, str]) -> Candidate | None:
    weights, metrics = Path(f"models/{stem}.safetensors"), Path(f"metrics/{stem}.json")
    if not (weights.is_file() and metrics.is_file()):
        return None
    values = json.loads(metrics.read_text())
    if spec.metric not in values:
        raise ConfigError(f"promotion: metric {spec.metric!r} is not in {metrics} (it has {', '.join(values)})")
    hashes = {f"dvc.md5.{kind}": locked[str(path)] for kind, path in (("weights", weights), ("metrics", metrics))
              if str(path) in locked}  # fmt: skip
    if "dvc.md5.weights" not in hashes:  # outside DVC (a stage run by hand) the content hash stands in
        hashes["dvc.md5.weights"] = "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    return Candidate(stem, weights, float(values[spec.metric]), hashes)


def training_run(client, stem: str) -> str | None:
    """The newest finished MLflow run of the stage that wrote models/<stem>.safetensors."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.`blip.stage` = '{stem}' and "
        "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    return runs[0].info.run_id if runs else None


def registration_run(client, stem: str) -> str:
    """A finished run to hold the version's lineage when no training run of `stem` is recorded."""
    from blip.tracking.runs import use_experiment

    run = client.create_run(use_experiment(), run_name=f"register-{stem}", tags={"blip.stage": "promote"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def register(client, name: str, spec: RegisteredModel, found: Candidate, max_length: int) -> int:
    """Log `found` as a pyfunc against the run that trained it and add it as a version of `name`, described (the
    registered model's description follows the code: what it does, its inputs and outputs); its version number."""
    import mlflow

    from blip.serving import describe, log_pyfunc
    from blip.tracking.runs import git_commit

    trained = training_run(client, found.stem)
    run_id = trained or registration_run(client, found.stem)
    # The model is logged against its training run without reopening it: reopening and closing a run would rewrite
    # its end time (history must not change after the fact).
    logged = mlflow.initialize_logged_model(name="model", source_run_id=run_id)
    info = log_pyfunc(spec.task, found.weights, max_length, model_id=logged.model_id)
    if client.search_registered_models(f"name = '{name}'"):
        client.update_registered_model(name, description=describe(spec.task))
    else:
        client.create_registered_model(name, description=describe(spec.task))
    lineage = f"trained in MLflow run {run_id}" if trained else f"no training run recorded (registered in run {run_id})"
    description = (f"`{found.stem}` ({found.weights}): {spec.metric} {found.value:.4g} (metrics/{found.stem}.json), "
                   f"{lineage}.")  # fmt: skip
    tags = {**found.hashes, "blip.run_id": run_id, "git.commit": git_commit(), "blip.stem": found.stem,
            "blip.metric": spec.metric, "blip.metric_value": str(found.value)}  # fmt: skip
    # The client rather than mlflow.register_model: it takes the description, and prints nothing besides our report.
    version = client.create_model_version(name, info.model_uri, run_id, tags, description=description,
                                          model_id=logged.model_id)  # fmt: skip
    return int(version.version)


def better(spec: RegisteredModel, new: float, old: float) -> bool:
    return new > old if spec.higher_is_better else new < old


def promote_model(name: str, spec: RegisteredModel, alias: str, locked: dict[str, str], max_length: int) -> list[str]:
    """Register the new candidates of one model and move its alias if one wins; report lines."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    registered = {v.tags.get("dvc.md5.weights") for v in client.search_model_versions(f"name = '{name}'")}
    lines, new = [], []
    for stem in spec.candidates:
        found = candidate(stem, spec, locked)
        if found is None:
            lines.append(f"| {name} | {stem} | - | not built |")
        elif found.hashes["dvc.md5.weights"] in registered:
            lines.append(f"| {name} | {stem} | {found.value:.4g} | already registered |")
        else:
            version = register(client, name, spec, found, max_length)
            new.append((found.value, version))
            lines.append(f"| {name} | {stem} | {found.value:.4g} | registered as version {version} |")
    if not new:
        return lines
    value, version = max(new) if spec.higher_is_better else min(new)
    try:
        champion = client.get_model_version_by_alias(name, alias)
        held = float(champion.tags["blip.metric_value"]) if champion.tags.get("blip.metric") == spec.metric else None
    except MlflowException:  # no champion yet
        champion, held = None, None
    if champion is None or held is None or better(spec, value, held):
        client.set_registered_model_alias(name, alias, version)
        before = "none" if champion is None else f"version {champion.version}"
        lines.append(f"| {name} | version {version} | {value:.4g} | now `{alias}` (was {before}) |")
    else:
        lines.append(f"| {name} | version {version} | {value:.4g} | not better than `{alias}` ({held:.4g}) |")
    return lines


def promote(params: Params) -> str:
    from blip.tracking.runs import use_experiment

    use_experiment()
    locked = dvc_hashes()
    lines = ["| model | candidate | metric | outcome |", "|---|---|---|---|"]
    # No progress bar per copied weights file (unless asked for): noise in a batch job's log and the flow run's.
    bar = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    with mock.patch.dict(os.environ, {bar: os.environ.get(bar, "false")}):
        for name, spec in params.promotion.models.items():
            lines += promote_model(name, spec, params.promotion.alias, locked, params.tokenizer.max_length)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("promote", __doc__ or ""), argv)
    report = promote(params)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report)
    print(report, end="")
    return 0
