"""The README's CapFilt ablation block, run as written on a fresh copy of the project at a tiny budget (one seed,
the four arms as DVC experiments through the queue), then what DVC and `blip capfilt-ablation` report."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

pytestmark = pytest.mark.slow
TINY_WORLD = ("-S world.web_images=200 -S world.clean_train=40 -S world.clean_val=20 -S world.clean_test=20 "
              "-S world.nlvr_train=20 -S world.nlvr_test=10 -S data.num_workers=0")  # fmt: skip
TRAINING = {"epochs": 1, "steps_per_epoch": 6, "batch_size": 16, "warmup_steps": 2, "eval_images": 10}
FINETUNE = {"caption.steps_per_epoch": 3, "caption.eval_images": 10, "retrieval.steps_per_epoch": 3,
            "retrieval.eval.images": 10}  # fmt: skip
TINY_BUDGET = " ".join(
    [f"-S {section}.{key}={value}" for section in ("pretrain", "repretrain") for key, value in TRAINING.items()]
    + [f"-S {key}={value}" for key, value in FINETUNE.items()]
)


def readme_block() -> str:
    section = (REPO / "README.md").read_text().split("### The CapFilt ablation", 1)[1]
    found = re.search(r"```bash\n(.*?)```", section, re.S)  # the section's first block
    assert found is not None
    return found.group(1)


def test_ablation_runs_on_dvc_experiments_as_written(clone: tuple[Path, dict[str, str]]) -> None:
    copy, env = clone
    env = {**env, "SEEDS": "0", "WORLD": TINY_WORLD, "BUDGET": TINY_BUDGET, "DVC_NO_ANALYTICS": "1",
           "BLIP_SYSTEM_METRICS": "0"}  # fmt: skip
    done = subprocess.run(["bash", "-e", "-c", readme_block()], cwd=copy, env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = subprocess.run(["dvc", "queue", "status"], cwd=copy, env=env, capture_output=True, text=True).stdout
    assert status.count("Success") == 4 and "Failed" not in status, status
    # The arms of a seed share its first pretraining and fine-tunes through DVC's run cache: each ran once.
    logs = "".join(subprocess.run(["dvc", "queue", "logs", line.split()[1]], cwd=copy, env=env, capture_output=True,
                                  text=True).stdout for line in status.splitlines() if "Success" in line)  # fmt: skip
    for stage in ("pretrain", "retrieval-finetune@pretrain", "caption-finetune@pretrain", "repretrain"):
        assert logs.count(f"Running stage '{stage}'") == (1 if stage != "repretrain" else 4), stage

    # DVC's own record: four experiments, one per arm, each with its arm's params and metrics.
    shown = json.loads((copy / "experiments.json").read_text())
    revs = [rev for baseline in shown for exp in baseline.get("experiments") or [] for rev in exp["revs"]]
    capfilt = [r["data"]["params"]["params.yaml"]["data"]["capfilt"] for r in revs]
    arms = sorted((c["use_captioner"], c["use_filter"], c["threshold_rule"]) for c in capfilt)
    assert arms == [(False, True, "calibrated"), (False, True, "top_fraction"), (True, False, "calibrated"),
                    (True, True, "calibrated")]  # fmt: skip
    assert all("data" in r["data"]["metrics"]["metrics/retrieval_capfilt.json"] for r in revs)
    for rev in revs:  # the budget reached the re-pretraining as well as the pretraining
        metrics = rev["data"]["metrics"]
        assert (
            metrics["metrics/repretrain.json"]["data"]["step"] == metrics["metrics/pretrain.json"]["data"]["step"] == 6
        )
    assert "capfilt.use_captioner" in done.stdout and "txt_r1" in done.stdout  # the `dvc exp show` table

    table = json.loads((copy / "reports/ablation/table.json").read_text())
    assert table["seeds"] == [0] and set(table["arms"]) == {"none", "filter", "captioner", "both", "itc_top30"}
    assert 0 <= table["arms"]["both"]["r1_mean"]["mean"] <= 100
    assert "filter_auc_itc" in table["arms"]["filter"] and "filter_auc_itc" not in table["arms"]["none"]
    assert (copy / "reports/ablation/table.md").read_text().count("\n") == 7

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (experiment,) = client.search_experiments(filter_string="name = 'blip-pipeline'")
    runs = client.search_runs([experiment.experiment_id], "tags.`blip.stage` = 'capfilt-ablation'")
    children = [r for r in runs if "blip.arm" in r.data.tags]
    assert sorted(r.data.tags["blip.arm"] for r in children) == ["both", "captioner", "filter", "itc_top30", "none"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {r.info.run_id for r in runs if r not in children}
