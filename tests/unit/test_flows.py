"""The Prefect flows' own logic: which failures are retried, and the stage order read from DVC."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from prefect.states import Failed

from flows.pipeline import StageFailed, _retry_condition, is_retryable, process_group, stage_order


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


def test_stage_order_is_dvcs() -> None:
    order = stage_order()
    assert len(order) == len(set(order)) == 15 and order[:3] == ["ingest", "vocab", "pretrain"]
    before = lambda a, b: order.index(a) < order.index(b)  # noqa: E731
    assert before("caption-finetune@pretrain", "capfilt") and before("retrieval-finetune@pretrain", "capfilt")
    assert before("capfilt", "repretrain")
    assert all(before("repretrain", s) for s in order if s.endswith("@capfilt"))
    needed = stage_order(["capfilt"])
    assert set(needed) == {"ingest", "vocab", "pretrain", "caption-finetune@pretrain", "retrieval-finetune@pretrain",
                           "capfilt"} and needed[-1] == "capfilt"  # fmt: skip


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody has reaped yet counts: it runs nothing)."""
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "State:\tZ" in status.read_text()


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
