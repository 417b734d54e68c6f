"""One MLflow run per stage: validated params, tags, metrics and artifacts; only rank 0 talks to MLflow.

Default store: `sqlite:///mlflow.db` with artifacts in `mlartifacts/`, so `mlflow ui --backend-store-uri
sqlite:///mlflow.db` shows every run with no server; `MLFLOW_TRACKING_URI` points elsewhere.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from blip.config import Params, flatten

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "blip-pipeline"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


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


class StageRun:
    """What a stage logs; a no-op on ranks other than 0."""

    def __init__(self, mlflow: Any | None) -> None:
        self._mlflow = mlflow
        self.run_id = mlflow.active_run().info.run_id if mlflow else None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_metrics(metrics, step=step)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_text(self, text: str, name: str) -> None:
        if self._mlflow:
            self._mlflow.log_text(text, name)


def use_experiment() -> str:
    """Point MLflow at the project's store and experiment (created with local artifacts on SQLite); its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    if mlflow.get_experiment_by_name(name) is None and tracking_uri().startswith("sqlite:"):
        mlflow.create_experiment(name, artifact_location=Path("mlartifacts").resolve().as_uri())
    return mlflow.set_experiment(name).experiment_id


@contextmanager
def stage_run(stage: str, params: Params, run_id: str | None = None) -> Iterator[StageRun]:
    """The stage's MLflow run; `run_id` continues an earlier run (resume) instead of starting a new one.

    When the stages run as one pipeline, `BLIP_PARENT_RUN_ID` nests each stage's run under the pipeline's.
    """
    if not is_rank_zero():
        yield StageRun(None)
        return
    import mlflow  # imported here: ranks other than 0 and plain library use never pay for it

    use_experiment()
    # Under `dvc repro` from the flows, BLIP_DVC_STAGE names the DVC stage (e.g. caption-finetune@capfilt).
    tags = {"blip.stage": stage, "dvc.stage": os.environ.get("BLIP_DVC_STAGE", stage),
            "mlflow.source.git.commit": git_commit()}  # fmt: skip
    if parent := os.environ.get("BLIP_PARENT_RUN_ID"):
        tags["mlflow.parentRunId"] = parent
    system_metrics = os.environ.get("BLIP_SYSTEM_METRICS", "1") == "1"
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage, tags=None if run_id else tags,
                          log_system_metrics=system_metrics):  # fmt: skip
        if run_id is None:  # a resumed run already holds its params (MLflow refuses to overwrite them)
            mlflow.log_params({k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()})
        try:
            yield StageRun(mlflow)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (blip.cli): stopped, which is neither failed nor running
            mlflow.end_run("KILLED")
            raise
