"""One MLflow run per stage: its own params, tags, metrics and artifacts; only rank 0 talks to MLflow.

Default store: `sqlite:///mlflow.db` with artifacts in `mlartifacts/`, so `mlflow ui --backend-store-uri
sqlite:///mlflow.db` shows every run with no server; `MLFLOW_TRACKING_URI` points elsewhere.

What a run carries is shaped for MLflow's runs table and compare view:
- params: only the sections the stage reads (as listed under `params:` in dvc.yaml), hyperparameters only; the
  file and folder settings (init, output, ...) are tags of the same name, so the compare view's plots default to
  what was tuned; the whole validated config is the artifact `config.yaml`;
- tags: `blip.stage`, `dvc.stage` (DVC's address, e.g. `caption-finetune@capfilt`), `blip.variant` (`pretrain` or
  `capfilt` for the evaluations that run on both pretrainings) and a one-line description (`mlflow.note.content`);
- metrics: training curves per step (steps >= 1), summary figures once at step 0 (MLflow draws those as bars);
- artifacts: named by what they are (`metrics.json`, `training_curves.png`, ...), not by the stage's file names,
  so the two variants of a stage line up in MLflow's artifact comparison.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from blip.config import Params, flatten

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "blip-pipeline"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value
# MLflow 3 opens an experiment of this kind on its runs table (untagged ones may open in the GenAI traces view).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EXPERIMENT_NOTE = (
    "One run per stage of the BLIP pipeline (dvc.yaml). The tag `blip.variant` tells the evaluations "
    "of the web-pretrained model (pretrain) from those of the CapFilt re-pretrained one (capfilt)."
)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def dvc_stage(stage: str) -> str:
    """The DVC stage running this process: DVC sets DVC_STAGE for every stage command (through the Prefect flows
    too, which run `dvc repro`); outside DVC, the stage's own name."""
    return os.environ.get("DVC_STAGE") or stage


def stage_params(params: Params, sections: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(hyperparameters, file settings) of `sections`, flat (`caption.lr`), as MLflow stores them."""
    paths = set(_path_keys(params, ""))
    wanted = tuple(f"{section}." for section in sections)
    flat = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items() if k.startswith(wanted)}
    return {k: v for k, v in flat.items() if k not in paths}, {k: v for k, v in flat.items() if k in paths}


def _path_keys(model: BaseModel, prefix: str) -> Iterator[str]:
    """The flat keys of fields typed as paths (optional ones included, whatever their value)."""
    for key, field in type(model).model_fields.items():
        value, name = getattr(model, key), f"{prefix}{key}"
        if isinstance(value, BaseModel):
            yield from _path_keys(value, f"{name}.")
        elif "Path" in str(field.annotation):
            yield name


class StageRun:
    """What a stage logs; a no-op on ranks other than 0."""

    def __init__(self, mlflow: Any | None) -> None:
        self._mlflow = mlflow
        self.run_id = mlflow.active_run().info.run_id if mlflow else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Per-step values with `step` (>= 1); summary figures without (logged once, at step 0)."""
        if self._mlflow:
            self._mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """`path` as the artifact `name` (default: its file name). Renaming links the file rather than copying
        it: weights can be gigabytes."""
        if not self._mlflow:
            return
        if name is None or name == path.name:
            self._mlflow.log_artifact(str(path))
            return
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".mlflow-") as folder:
            alias = Path(folder) / name
            try:
                os.link(path, alias)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, alias)
            self._mlflow.log_artifact(str(alias))

    def log_text(self, text: str, name: str) -> None:
        if self._mlflow:
            self._mlflow.log_text(text, name)


def use_experiment() -> str:
    """Point MLflow at the project's store and experiment (created with local artifacts on SQLite, tagged to open
    on its runs table); its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    if mlflow.get_experiment_by_name(name) is None and tracking_uri().startswith("sqlite:"):
        mlflow.create_experiment(name, artifact_location=Path("mlartifacts").resolve().as_uri())
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        mlflow.set_experiment_tags({**EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_NOTE})
    return experiment.experiment_id


@contextmanager
def stage_run(stage: str, params: Params, sections: Iterable[str], description: str, run_id: str | None = None
              ) -> Iterator[StageRun]:  # fmt: skip
    """The stage's MLflow run, logging the params of `sections` and the one-line `description`; `run_id` continues
    an earlier run (resume) instead of starting a new one.

    When the stages run as one pipeline, `BLIP_PARENT_RUN_ID` nests each stage's run under the pipeline's.
    """
    if not is_rank_zero():
        yield StageRun(None)
        return
    import mlflow  # imported here: ranks other than 0 and plain library use never pay for it

    use_experiment()
    hyper, files = stage_params(params, sections)
    address = dvc_stage(stage)
    tags = {"blip.stage": stage, "dvc.stage": address, "mlflow.source.git.commit": git_commit(),
            "mlflow.note.content": description, **files}  # fmt: skip
    if "@" in address:  # a foreach stage of dvc.yaml: which pretraining it evaluates
        tags["blip.variant"] = address.rsplit("@", 1)[1]
    if parent := os.environ.get("BLIP_PARENT_RUN_ID"):
        tags["mlflow.parentRunId"] = parent
    system_metrics = os.environ.get("BLIP_SYSTEM_METRICS", "1") == "1"
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage, tags=None if run_id else tags,
                          log_system_metrics=system_metrics):  # fmt: skip
        if run_id is None:  # a resumed run already holds its params (MLflow refuses to overwrite them)
            mlflow.log_params(hyper)
            mlflow.log_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), "config.yaml")
        try:
            yield StageRun(mlflow)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (blip.cli): stopped, which is neither failed nor running
            mlflow.end_run("KILLED")
            raise
