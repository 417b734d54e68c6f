"""benchmarks/gpu_dag.py, the GPU run's script, dry-run on the CPU: every stage of dvc.yaml in order under
torchrun (2 ranks, gloo), pretraining killed after its first checkpoint and resumed from it, every metrics file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.gpu_dag import dag_order, small_params
from blip.config import load_params
from tests.conftest import REPO


def test_stages_come_in_dependency_order_and_the_small_params_validate(tmp_path: Path) -> None:
    order = [name for name, _ in dag_order(REPO / "dvc.yaml")]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    expected = {f"{n}@{k}" for n, s in stages.items() if "foreach" in s for k in s["foreach"]}
    assert set(order) == expected | {n for n, s in stages.items() if "foreach" not in s}
    assert order.index("pretrain") < order.index("capfilt") < order.index("repretrain")
    assert order.index("repretrain") < order.index("caption-finetune@capfilt") and order[-1] == "summary"
    assert order.index("caption-finetune@pretrain") < order.index("capfilt")  # the captioner CapFilt uses
    for preset in ("params.yaml", "configs/base.yaml"):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(small_params(REPO / preset, 40, 64, 8, 224)))
        params = load_params(path)
        assert params.pretrain.steps_per_epoch == params.repretrain.steps_per_epoch == 40
        assert params.pretrain.queue_size % 64 == 0


@pytest.mark.slow
def test_the_gpu_script_runs_the_whole_dag_with_a_kill_and_resume_on_the_cpu(tmp_path: Path) -> None:
    temp = tmp_path / "temp"  # where the script makes its own work folder (~350 MB), which it must remove
    temp.mkdir()
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_dag", "--cpu-dry-run", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "TMPDIR": str(temp)})  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert not list(temp.glob("blip-gpu-dag-*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks"] == 2 and all(stage["exit_code"] == 0 for stage in summary["stages"])
    assert len(summary["stages"]) == len(dag_order(REPO / "dvc.yaml")) and summary["missing_metrics"] == []
    kill = summary["kill_resume"]
    assert kill["ok"] and 0 < kill["killed_after_checkpoint_step"] <= kill["resumed_from_step"] < kill["of_steps"]
    pretrain = json.loads((tmp_path / "metrics/pretrain.json").read_text())
    assert pretrain["step"] == kill["of_steps"]  # the resumed run went on to the end
