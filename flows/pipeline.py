"""Prefect flows around the pipeline's DVC stages: operations only (placement, retries, timeouts, progress, artifacts).

DVC is the one DAG: `pipeline` reads the stages from `dvc.yaml` in DVC's own topological order and runs each one
as a `stage` flow, which does `dvc repro --single-item <stage>` (or `dvc repro <stage>`, upstream included, when
run alone), so DVC decides what is up to date and records lineage. With a DVC remote configured, a stage pulls its
inputs first and pushes its outputs after, so consecutive stages may run on different workers. Prefect caches no
stage output. Failures are retried unless they are usage errors (`blip` exits 2 on a configuration error, DVC
names a stage `dvc.yaml` does not have): rerunning cannot fix those.

A stage DVC skips ends in the state "Skipped" (a kind of Completed). Each stage flow leaves a markdown artifact: its
metrics and a link to the MLflow run behind them. The pipeline opens one MLflow parent run that the stage runs nest
under, only once a stage is about to run (a pipeline DVC skips entirely leaves no empty run), then runs the
promotion gate (`blip promote`) and leaves a summary artifact: every stage, ran or skipped, its time, its headline
metric and its MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State

PROJECT = Path(os.environ.get("BLIP_PROJECT_DIR", Path(__file__).resolve().parents[1]))
STAGE_TIMEOUT_S = float(os.environ.get("BLIP_STAGE_TIMEOUT_S", 12 * 3600))  # a base-size pretrain is hours
PROGRESS_EVERY_S = 15.0  # progress bars redraw many times a second: log one line per bar this often
CONFIG_ERROR = 2  # `blip` exits 2 on a configuration or usage error
UNKNOWN_STAGE = re.compile(r"Stage '[^']*' not found inside")  # DVC's words for a stage dvc.yaml does not have
STOP_GRACE_S = 30.0  # after SIGTERM, how long a stopped stage may take to end its MLflow run before SIGKILL


class StageFailed(RuntimeError):
    def __init__(self, stage: str, exit_code: int, tail: str) -> None:
        super().__init__(f"stage {stage} failed (exit {exit_code}):\n" + "\n".join(tail.splitlines()[-40:]))
        self.exit_code = exit_code


def is_retryable(exit_code: int, output: str) -> bool:
    """Infrastructure failures (killed, out of memory, lost storage or network) are retried; a usage error is
    not. DVC exits 255 for any failure and names a failed command's own exit code in its message."""
    if UNKNOWN_STAGE.search(output):
        return False
    own = re.findall(r"exited with (-?\d+)", output)
    code = int(own[-1]) if own else exit_code
    return code != CONFIG_ERROR


def _retry_condition(task_, task_run, state) -> bool:  # Prefect's callback: (task, task run, failed state)
    """Retry a failed stage unless it was a usage error, and a timeout or OS-level error; not a bug here."""
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, StageFailed):
        return is_retryable(exc.exit_code, str(exc))
    return isinstance(exc, TimeoutError | OSError)


def log_level(line: str) -> int:
    """DVC's and blip's own `ERROR: ...` and `WARNING: ...` lines keep their level in the flow-run log."""
    if line.startswith("ERROR"):
        return logging.ERROR
    if line.startswith("WARNING"):
        return logging.WARNING
    return logging.INFO


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
                logger.log(log_level(text), text)
            elif time.monotonic() - last_progress > PROGRESS_EVERY_S:  # a progress bar redraw
                last_progress = time.monotonic()
                logger.info(text.strip())
    if buffer.strip():
        lines.append(buffer)
        logger.log(log_level(buffer), buffer)
    return "\n".join(lines)


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def has_remote() -> bool:
    out = subprocess.run(dvc("remote", "default"), cwd=PROJECT, capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


@task(task_run_name="dvc repro {stage}", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_condition,
      timeout_seconds=STAGE_TIMEOUT_S, cache_policy=None)  # fmt: skip
def repro(stage: str, single_item: bool, parent_run_id: str | None) -> bool:
    """`dvc repro` of one stage (pull before, push after when a remote is set); True when it ran, False when DVC
    found it up to date. DVC names the stage to `blip` (DVC_STAGE), which tags its MLflow run with it."""
    env = {**os.environ, **({"BLIP_PARENT_RUN_ID": parent_run_id} if parent_run_id else {})}
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
    # An always-changed stage (`sources`) runs on every repro: it counts as run only when its outputs changed.
    return f"Running stage '{stage}'" in output and (stage not in always_changed() or "Updating lock file" in output)


def stage_metrics(stage: str) -> dict[str, dict[str, float]]:
    """The stage's declared metrics files (from `dvc.yaml`), read back: file -> flat numbers."""
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        (found,) = repo.stage.collect(stage)
        files = [out.def_path for out in found.metrics]
    out: dict[str, dict[str, float]] = {}
    for name in files:
        path = PROJECT / name
        if path.is_file():
            data = json.loads(path.read_text())
            out[name] = {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return out


def declared_headlines() -> dict[str, str]:
    """Metrics file stem -> its headline metric, as `blip summary` (one figure per stage) picks it."""
    from blip.stages.summary import HEADLINES

    return {stem: key for pretrained, capfilt, key, _ in HEADLINES.values() for stem in (pretrained, capfilt)}


def headline(metrics: dict[str, dict[str, float]], declared: dict[str, str]) -> str:
    """The stage's one number: its declared headline metric, else the first number of its first metrics file."""
    for file, values in metrics.items():
        name = declared.get(Path(file).stem)
        if name in values:
            return f"{name} {values[name]:.4g}"
    first = [(key, value) for values in metrics.values() for key, value in values.items()][:1]
    return "".join(f"{key} {value:.4g}" for key, value in first)


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Markdown naming an MLflow run: a link into the MLflow UI when the store is a server."""
    if uri.startswith(("http://", "https://")):
        return f"[MLflow run {run_id}]({uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"MLflow run `{run_id}` in `{uri}`"


def mlflow_link(stage: str, parent_run_id: str | None) -> str:
    """The newest finished MLflow run of the stage (tag `dvc.stage`): the one behind its metrics, whether it just
    ran (under this pipeline's run, when there is one) or DVC skipped it (then from whichever run made them)."""
    from mlflow.tracking import MlflowClient

    from blip.tracking.runs import tracking_uri

    client = MlflowClient(tracking_uri())
    filters = [f"tags.`dvc.stage` = '{stage}'", "attributes.status = 'FINISHED'"]
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, " and ".join(filters), order_by=["attributes.start_time DESC"],
                              max_results=1)  # fmt: skip
    if not runs:
        return "no finished MLflow run"
    return run_link(client.tracking_uri, runs[0].info.experiment_id, runs[0].info.run_id)


@dataclass(frozen=True)
class StageReport:
    """One stage of a pipeline run, for the summary."""

    stage: str
    ran: bool
    seconds: float
    headline: str
    mlflow: str


@flow(name="blip-stage", flow_run_name="{stage}", log_prints=True)
def stage(stage: str, single_item: bool = False, parent_run_id: str | None = None) -> StageReport | State:
    """One DVC stage (with its upstream stages unless `single_item`), then a metrics artifact. Ends "Skipped"
    when DVC found it up to date."""
    start = time.monotonic()
    ran = repro(stage, single_item, parent_run_id)
    metrics = stage_metrics(stage)
    report = StageReport(stage, ran, time.monotonic() - start, headline(metrics, declared_headlines()),
                         mlflow_link(stage, parent_run_id if ran else None))  # fmt: skip
    rows = [f"| {file} | {key} | {value:.4g} |" for file, values in metrics.items() for key, value in values.items()]
    table = "\n".join(["| file | metric | value |", "|---|---|---|", *rows]) if rows else "(no metrics declared)"
    status = "ran" if ran else "skipped (DVC found it up to date)"
    key = re.sub(r"[^a-z0-9-]", "-", f"stage-{stage}".lower())
    create_markdown_artifact(f"## {stage}: {status}\n\n{report.mlflow}\n\n{table}\n", key=key,
                             description=f"{stage} metrics")  # fmt: skip
    # A plain return shows as "Completed" whether or not anything ran; a skipped stage says so in its state.
    return report if ran else Completed(name="Skipped", message="DVC found it up to date", data=report)


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


def stale_stages(targets: list[str] | None = None) -> set[str]:
    """The stages `dvc status` finds changed now (not counting those DVC runs every time). Stages downstream of
    them may run too, but always after them."""
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        always = {stage.addressing for stage in repo.index.stages if stage.always_changed}
        return set(repo.status(targets=targets, with_deps=bool(targets))) - always


def always_changed() -> set[str]:
    """The stages dvc.yaml marks `always_changed` (DVC runs them on every repro)."""
    from dvc.repo import Repo

    with Repo(str(PROJECT)) as repo:
        return {stage.addressing for stage in repo.index.stages if stage.always_changed}


@task(task_run_name="blip promote", retries=2, retry_delay_seconds=10, retry_condition_fn=_retry_condition,
      cache_policy=None)  # fmt: skip
def promote(parent_run_id: str | None) -> None:
    """The promotion gate: register new models and move each `champion` alias only to a better one."""
    env = {**os.environ, **({"BLIP_PARENT_RUN_ID": parent_run_id} if parent_run_id else {})}
    code, output = run_logged([sys.executable, "-m", "blip", "promote"], env)
    if code:
        raise StageFailed("promote", code, output)
    report = (PROJECT / "reports" / "promotion.md").read_text()
    create_markdown_artifact(report, key="promotion", description="model registry changes")


class ParentRun:
    """The pipeline's MLflow run, started only when a stage is about to run: a pipeline that runs none leaves no
    empty run."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def start(self) -> None:
        import mlflow

        from blip.tracking.runs import use_experiment

        if self.run_id is None:
            use_experiment()
            run = mlflow.start_run(run_name="pipeline", tags={"blip.stage": "pipeline"}, log_system_metrics=False)
            self.run_id = run.info.run_id

    def end(self, status: str, ran_any: bool) -> None:
        """End it; delete it if it stayed empty (DVC pulled the outputs of the stages it found stale from its
        remote, then skipped them all)."""
        import mlflow

        if self.run_id is not None:
            mlflow.end_run(status)
            if status == "FINISHED" and not ran_any:
                mlflow.MlflowClient().delete_run(self.run_id)


def summary(reports: list[StageReport], order: list[str]) -> str:
    """The pipeline run's table: every stage, ran or skipped, its time, headline metric and MLflow run."""
    done = {r.stage: r for r in reports}
    rows = []
    for name in order:
        if r := done.get(name):
            took = f"{r.seconds:.0f} s" if r.seconds < 120 else f"{r.seconds / 60:.1f} min"
            rows.append(f"| {name} | {'ran' if r.ran else 'skipped'} | {took} | {r.headline or '-'} | {r.mlflow} |")
        else:
            rows.append(f"| {name} | not finished | - | - | - |")
    return "\n".join(["| stage | status | time | headline metric | MLflow run |", "|---|---|---|---|---|", *rows])


def run_name(targets: list[str] | None, when: datetime) -> str:
    return f"pipeline-{'+'.join(targets) if targets else 'all'}-{when:%Y-%m-%d-%H%M}"


def _pipeline_run_name() -> str:  # Prefect calls it when the run starts; a scheduled run is named by its slot
    from prefect.runtime import flow_run

    return run_name(flow_run.parameters.get("targets"), flow_run.scheduled_start_time)


@flow(name="blip-pipeline", flow_run_name=_pipeline_run_name, log_prints=True)
def pipeline(targets: list[str] | None = None, promote_models: bool = True) -> list[str]:
    """Every stage (or those `targets` need) in DVC's order, one `stage` flow each, then promotion and a summary
    artifact. Returns the stages that ran (the rest DVC found up to date)."""
    order, stale, always = stage_order(targets), stale_stages(targets), always_changed()
    parent, reports, status = ParentRun(), [], "FAILED"
    try:
        for name in order:
            if name in stale:  # what runs is stale now or after a stale stage: the parent is open before any runs
                parent.start()
            reports.append(stage(name, single_item=True, parent_run_id=parent.run_id))
            if reports[-1].ran and name in always:  # new outputs (a changed source): their readers are stale
                stale |= stale_stages(targets)
        if promote_models:
            promote(parent.run_id)
        status = "FINISHED"
    except KeyboardInterrupt:  # stopped
        status = "KILLED"
        raise
    finally:
        parent.end(status, ran_any=any(r.ran for r in reports))
        create_markdown_artifact(summary(reports, order), key="pipeline-summary", description="stages of this run")
    ran = [r.stage for r in reports if r.ran]
    get_run_logger().info("stages run: %s", ", ".join(ran) or "none (everything up to date)")
    return ran


if __name__ == "__main__":  # `python flows/pipeline.py`: the whole pipeline once, without a server
    pipeline()
