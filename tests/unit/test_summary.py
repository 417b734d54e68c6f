"""`blip summary` and `dvc metrics show metrics/summary`: the headline figures, one row per pretraining."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blip.config import ConfigError
from blip.stages.summary import HEADLINES, main, summarise
from tests.conftest import REPO


def write_all(folder: Path, value: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for web, bootstrapped, key, _ in HEADLINES.values():
        for stem, offset in ((web, 0.0), (bootstrapped, 0.25)):
            (folder / f"{stem}.json").write_text(json.dumps({key: value + offset, "images": 10, "note": "x"}))


def test_rows_per_pretraining_from_each_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_all(Path("metrics"), 0.5)
    assert main(["--params", str(REPO / "params.yaml")]) == 0
    web = json.loads(Path("metrics/summary/pretrain.json").read_text())
    bootstrapped = json.loads(Path("metrics/summary/capfilt.json").read_text())
    assert set(web) == set(bootstrapped) == set(HEADLINES)
    assert web["pretrain_R1"] == 50.0 and bootstrapped["pretrain_R1"] == 75.0  # a fraction, shown in percent
    assert web["CIDEr"] == 0.5 and bootstrapped["CIDEr"] == 0.75


def test_a_missing_stage_or_figure_is_named(tmp_path: Path) -> None:
    write_all(tmp_path, 1.0)
    (tmp_path / "vqa_capfilt.json").unlink()
    with pytest.raises(ConfigError, match=r"vqa_capfilt\.json is missing"):
        summarise(tmp_path)
    write_all(tmp_path / "other", 1.0)
    (tmp_path / "other/nlvr.json").write_text(json.dumps({"accuracy": "n/a"}))
    with pytest.raises(ConfigError, match=r"nlvr\.json has no number 'accuracy'"):
        summarise(tmp_path / "other")


def test_dvc_metrics_show_of_the_summary_fits_120_columns() -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "metrics/summary"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 3, done.stdout + done.stderr  # a header and two rows
    assert {line.split()[0] for line in lines[1:]} == {"metrics/summary/pretrain.json", "metrics/summary/capfilt.json"}
    assert max(map(len, lines)) <= 120


def test_a_figure_recorded_as_unavailable_is_null_in_the_summary(tmp_path: Path) -> None:
    write_all(tmp_path, 1.0)
    (tmp_path / "caption.json").write_text(json.dumps({"CIDEr": None, "images": 10}))  # e.g. no Java on a GPU node
    rows = summarise(tmp_path)
    assert rows["pretrain"]["CIDEr"] is None and rows["capfilt"]["CIDEr"] == 1.25
