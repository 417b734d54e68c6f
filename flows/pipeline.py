"""Prefect flows around the pipeline's DVC stages: operations only (placement, retries, timeouts, progress, artifacts).

DVC is the one DAG: `pipeline` reads the stages from `dvc.yaml` in DVC's own topological order and runs each one
as a `stage` flow, which does `dvc repro --single-item <stage>` (or `dvc repro <stage>`, upstream included, when
run alone), so DVC decides what is up to date and records lineage. With a DVC remote configured, a stage pulls its
inputs first and pushes its outputs after, so consecutive stages may run on different workers. Prefect caches no
stage output. Failures are retried unless the stage reports a configuration error (exit code 2): rerunning
cannot fix those.

Each stage flow leaves a markdown artifact: the stage's metrics and a link to its MLflow run. The pipeline opens
one MLflow parent run that every stage run nests under, then runs the promotion gate (`blip promote`).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

PROJECT = Path(os.environ.get("BLIP_PROJECT_DIR", Path(__file__).resolve().parents[1]))
STAGE_TIMEOUT_S = float(os.environ.get("BLIP_STAGE_TIMEOUT_S", 12 * 3600))  # a base-size pretrain is hours
PROGRESS_EVERY_S = 15.0  # progress bars redraw many times a second: log one line per bar this often
CONFIG_ERROR = 2  # `blip` exits 2 on a configuration or usage error
STOP_GRACE_S = 30.0  # after SIGTERM, how long a stopped stage may take to end its MLflow run before SIGKILL


class StageFailed(RuntimeError):
    def __init__(self, stage: str, exit_code: int, tail: str) -> None:
        super().__init__(f"stage {stage} failed (exit {exit_code}):\n" + "\n".join(tail.splitlines()[-40:]))
        self.exit_code = exit_code


def is_retryable(exit_code: int, output: str) -> bool:
    """Infrastructure failures (killed, out of memory, lost storage or network) are retried; a config error is
    not. DVC exits 255 for any failed stage and names the command's own exit code in its message."""
    own = re.findall(r"exited with (-?\d+)", output)
    code = int(own[-1]) if own else exit_code
    return code != CONFIG_ERROR


def _retry_condition(task_, task_run, state) -> bool:  # Prefect's callback: (task, task run, failed state)
    """Retry a failed stage unless it was a config error, and a timeout or OS-level error; not a bug here."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, StageFailed):
        return is_retryable(exc.exit_code, str(exc))
    return isinstance(exc, TimeoutError | OSError)


@contextmanager
def process_group(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Start `args` in the project as its own process group. Leaving early (the task's timeout, a cancellation)
    stops the whole group (dvc, blip and its data workers) rather than orphaning it: SIGTERM, which `blip` turns
    into a clean stop (its MLflow run ends as KILLED), then SIGKILL after STOP_GRACE_S."""
    proc = subprocess.Popen(args, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_logged(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a command in the project, streaming its lines to the Prefect log (progress bars throttled)."""
    with process_group(args, env) as proc:
        output = _stream_to_log(proc)  # to the end of its output, then its exit code
        return proc.wait(), output


def _stream_to_log(proc: subprocess.Popen) -> str:
    logger = get_run_logger()
    # newline="": keep "\r", which tells a progress-bar redraw from a finished line.
    stream = io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline="")
    lines: list[str] = []
    last_progress = 0.0
    buffer = ""
    for chunk in iter(lambda: stream.read(256), ""):
        buffer += chunk
        *parts, buffer = re.split(r"(\r|\n)", buffer) if buffer else [""]
        for text, end in zip(parts[::2], parts[1::2], strict=False):
            if not text.strip():
                continue
            if end == "\n":
                lines.append(text)
                logger.info(text)
            elif time.monotonic() - last_progress > PROGRESS_EVERY_S:  # a progress bar redraw
                last_progress = time.monotonic()
                logger.info(text.strip())
    if buffer.strip():
        lines.append(buffer)
        logger.info(buffer)
    return "\n".join(lines)


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def has_remote() -> bool:
    out = subprocess.run(dvc("remote", "default"), cwd=PROJECT, capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_condition, timeout_seconds=STAGE_TIMEOUT_S,
      cache_policy=None)  # fmt: skip
def repro(stage: str, single_item: bool, parent_run_id: str | None) -> bool:
    """`dvc repro` of one stage (pull before, push after when a remote is set); True when it ran, False when DVC
    found it up to date."""
    env = {**os.environ, "BLIP_DVC_STAGE": stage}
    if parent_run_id:
        env["BLIP_PARENT_RUN_ID"] = parent_run_id
    remote = has_remote()
    if remote:  # inputs (and this stage's own outputs, if pushed before) from the shared remote
        code, output = run_logged(dvc("pull", "--with-deps", "--allow-missing", stage), env)
        if code:
            raise StageFailed(stage, code, output)
    code, output = run_logged(dvc("repro", *(["--single-item"] if single_item else []), stage), env)
    if code:
        raise StageFailed(stage, code, output)
    if remote:
        pushed, push_output = run_logged(dvc("push", stage), env)
        if pushed:
            raise StageFailed(stage, pushed, push_output)
    return f"Running stage '{stage}'" in output


def stage_metrics(stage: str) -> dict[str, dict]:
    """The stage's declared metrics files (from `dvc.yaml`), read back: file -> flat numbers."""
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        (found,) = repo.stage.collect(stage)
        files = [out.def_path for out in found.metrics]
    out: dict[str, dict] = {}
    for name in files:
        path = PROJECT / name
        if path.is_file():
            data = json.loads(path.read_text())
            out[name] = {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return out


def mlflow_link(stage: str, parent_run_id: str | None) -> str:
    """A link to the stage's newest MLflow run (nested under this pipeline's run when there is one)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    filters = [f"tags.`dvc.stage` = '{stage}'"]
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=" and ".join(filters),
                              order_by=["start_time DESC"], max_results=1, output_format="list")  # fmt: skip
    if not runs:
        return "no MLflow run (up to date: DVC skipped it)"
    run = runs[0]
    if uri.startswith("http"):
        address = f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        return f"[MLflow run {run.info.run_id}]({address})"
    return f"MLflow run `{run.info.run_id}` in `{uri}`"


@flow(name="blip-stage", flow_run_name="{stage}", log_prints=True)
def stage(stage: str, single_item: bool = False, parent_run_id: str | None = None) -> bool:
    """One DVC stage (with its upstream stages unless `single_item`), then a metrics artifact."""
    ran = repro(stage, single_item, parent_run_id)
    rows = [f"| {file} | {key} | {value:.4g} |" for file, values in stage_metrics(stage).items()
            for key, value in values.items()]  # fmt: skip
    status = "ran" if ran else "up to date (DVC skipped it)"
    table = "\n".join(["| file | metric | value |", "|---|---|---|", *rows]) if rows else "(no metrics declared)"
    link = mlflow_link(stage, parent_run_id) if ran else "no new MLflow run (up to date: DVC skipped it)"
    key = re.sub(r"[^a-z0-9-]", "-", f"stage-{stage}".lower())
    create_markdown_artifact(f"## {stage}: {status}\n\n{link}\n\n{table}\n", key=key, description=f"{stage} metrics")
    return ran


def stage_order(targets: list[str] | None = None) -> list[str]:
    """The pipeline's stages in an order DVC would run them (every dependency first)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(PROJECT)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        stages = [s for s in reversed(list(nx.topological_sort(graph))) if isinstance(s, PipelineStage)]
        wanted = {s.addressing for t in targets for s in repo.stage.collect(t, with_deps=True)} if targets else None
        return [s.addressing for s in stages if wanted is None or s.addressing in wanted]


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_condition, cache_policy=None)
def promote(parent_run_id: str | None) -> None:
    """The promotion gate: register new models and move each `champion` alias only to a better one."""
    env = {**os.environ, **({"BLIP_PARENT_RUN_ID": parent_run_id} if parent_run_id else {})}
    code, output = run_logged([sys.executable, "-m", "blip", "promote"], env)
    if code:
        raise StageFailed("promote", code, output)
    report = (PROJECT / "reports" / "promotion.md").read_text()
    create_markdown_artifact(report, key="promotion", description="model registry changes")


@flow(name="blip-pipeline", log_prints=True)
def pipeline(targets: list[str] | None = None, promote_models: bool = True) -> list[str]:
    """Every stage (or those `targets` need) in DVC's order, one `stage` flow each, then promotion. Returns the
    stages that ran (the rest DVC found up to date)."""
    import mlflow

    from blip.tracking.runs import use_experiment

    use_experiment()
    with mlflow.start_run(run_name="pipeline", tags={"blip.stage": "pipeline"}, log_system_metrics=False) as parent:
        ran = [name for name in stage_order(targets) if stage(name, single_item=True, parent_run_id=parent.info.run_id)]
        if promote_models:
            promote(parent.info.run_id)
    get_run_logger().info("stages run: %s", ", ".join(ran) or "none (everything up to date)")
    return ran


if __name__ == "__main__":  # `python flows/pipeline.py`: the whole pipeline once, without a server
    pipeline()
