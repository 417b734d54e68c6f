"""The Prefect flows' own logic: which failures are retried, log levels, the stage order read from DVC, and what the
flow runs and their artifacts show (names, headline metrics, MLflow links, the pipeline's summary)."""

from __future__ import annotations

import logging
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prefect.states import Failed

from flows.pipeline import (
    StageFailed,
    StageReport,
    _retry_condition,
    declared_headlines,
    headline,
    is_retryable,
    log_level,
    process_group,
    run_link,
    run_name,
    stage_order,
    summary,
)


def test_config_errors_are_not_retried_infrastructure_failures_are() -> None:
    assert not is_retryable(2, "")  # `blip` itself: a config or usage error
    assert not is_retryable(255, "ERROR: failed to reproduce 'pretrain': failed to run: blip pretrain, exited with 2")
    assert is_retryable(255, "ERROR: failed to reproduce 'pretrain': failed to run: blip pretrain, exited with -9")
    assert is_retryable(255, "failed to run: blip pretrain, exited with 1")  # e.g. a lost disk or NCCL timeout
    assert is_retryable(1, "ERROR: failed to pull data from the cloud")
    config = Failed(data=StageFailed("pretrain", 255, "blip pretrain, exited with 2"))
    killed = Failed(data=StageFailed("pretrain", 255, "blip pretrain, exited with -9"))
    assert not _retry_condition(None, None, config) and _retry_condition(None, None, killed)
    assert _retry_condition(None, None, Failed(data=TimeoutError("stage timed out")))
    assert not _retry_condition(None, None, Failed(data=TypeError("a bug in the flow")))
    # A stage name dvc.yaml does not have: from `dvc repro`, and from `dvc pull` when a remote is set.
    assert not is_retryable(255, "ERROR: Stage 'pretrian' not found inside 'dvc.yaml' file")
    pull = "ERROR: failed to pull data from the cloud - 'pretrian' does not exist as an output or a stage name in "
    pull += "'dvc.yaml': Stage 'pretrian' not found inside 'dvc.yaml' file"
    assert not is_retryable(1, pull)


def test_dvc_errors_and_warnings_keep_their_level_in_the_log() -> None:
    assert log_level("ERROR: failed to reproduce 'pretrain'") == logging.ERROR
    assert log_level("WARNING: failed to collect 'workspace', skipping") == logging.WARNING
    assert log_level("Running stage 'pretrain':") == log_level("step 10 loss ERROR-free") == logging.INFO


def test_what_the_flow_runs_show() -> None:
    assert run_name(None, datetime(2026, 12, 5, 2, 0, tzinfo=UTC)) == "pipeline-all-2026-12-05-0200"
    named = run_name(["capfilt", "vqa-finetune@capfilt"], datetime(2026, 1, 2, 13, 7, tzinfo=UTC))
    assert named == "pipeline-capfilt+vqa-finetune@capfilt-2026-01-02-1307"
    link = run_link("http://mlflow:5000/", "3", "abc")
    assert link == "[MLflow run abc](http://mlflow:5000/#/experiments/3/runs/abc)"
    assert run_link("sqlite:///mlflow.db", "3", "abc") == "MLflow run `abc` in `sqlite:///mlflow.db`"

    # The headline metric: the one `blip summary` shows for the stage, else the first number.
    declared = declared_headlines()
    assert declared["caption_capfilt"] == "CIDEr" and declared["retrieval"] == "r_mean"
    assert declared["repretrain"] == "eval_i2t_r1"
    caption = {"metrics/caption_capfilt.json": {"BLEU_4": 0.31, "CIDEr": 0.42}}
    assert headline(caption, declared) == "CIDEr 0.42"
    assert headline({"metrics/ingest.json": {"samples": 6000, "shards": 240}}, declared) == "samples 6000"
    assert headline({}, declared) == ""

    reports = [StageReport("ingest", False, 2.4, "samples 6000", "MLflow run `a` in `sqlite:///mlflow.db`"),
               StageReport("pretrain", True, 754.0, "", link)]  # fmt: skip
    assert summary(reports, ["ingest", "pretrain", "capfilt"]).splitlines()[2:] == [
        "| ingest | skipped | 2 s | samples 6000 | MLflow run `a` in `sqlite:///mlflow.db` |",
        f"| pretrain | ran | 12.6 min | - | {link} |",
        "| capfilt | not finished | - | - | - |",
    ]


def test_stage_order_is_dvcs() -> None:
    order = stage_order()
    assert len(order) == len(set(order)) == 17 and set(order[:2]) == {"ingest", "sources"}
    assert order[2:4] == ["vocab", "pretrain"]
    assert order[-1] == "summary"  # it gathers every task's metrics
    before = lambda a, b: order.index(a) < order.index(b)  # noqa: E731
    assert before("caption-finetune@pretrain", "capfilt") and before("retrieval-finetune@pretrain", "capfilt")
    assert before("capfilt", "repretrain")
    assert all(before("repretrain", s) for s in order if s.endswith("@capfilt"))
    needed = stage_order(["capfilt"])
    assert set(needed) == {"ingest", "sources", "vocab", "pretrain", "caption-finetune@pretrain",
                           "retrieval-finetune@pretrain", "capfilt"} and needed[-1] == "capfilt"  # fmt: skip


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Exited within `within_s` (a signalled process takes a moment to die on a busy machine; a zombie nobody has
    reaped yet counts: it runs nothing)."""
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + within_s
    while status.exists() and "State:\tZ" not in status.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_stage_left_early_is_stopped_with_its_children() -> None:
    # A stage that starts a worker of its own (as blip's data loader does), then runs until stopped.
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              "print(child.pid, flush=True); time.sleep(120)")  # fmt: skip
    with pytest.raises(TimeoutError), process_group([sys.executable, "-c", script]) as proc:
        child = int(proc.stdout.readline())
        raise TimeoutError("the task's timeout")  # what Prefect raises in the task when it times out
    assert proc.returncode == -signal.SIGTERM
    assert _gone(child)
