"""`dvc plots show` as the README gives it: a page that renders offline, each training curve drawn once, the
@pretrain and @capfilt runs of each task in one chart."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

FILES = (".dvc/config", "dvc.yaml", "params.yaml", "infra/dvc-plots/template.html")


def dvc(args: list[str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_plots_render_offline_each_curve_once_with_both_variants_overlaid(tmp_path: Path) -> None:
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # What the training stages write (steps and a few losses), for every CSV a stage declares.
    csvs = {
        out.replace("${item.suffix}", suffix)
        for stage in stages.values()
        for out in (next(iter(o)) if isinstance(o, dict) else o for o in stage.get("do", stage).get("outs", []))
        if out.endswith(".csv")
        for suffix in ("", "_capfilt")
    }
    assert len(csvs) == 10  # pretrain, repretrain, and four fine-tunes twice
    for csv in csvs:
        rows = [f"{step},{3 - step / 10},{2.0},{1.0},{0.5},{1e-4}" for step in (2, 4, 6)]
        (tmp_path / csv).parent.mkdir(exist_ok=True)
        (tmp_path / csv).write_text("step,loss,itc,itm,lm,lr\n" + "\n".join(rows) + "\n")

    dvc(["plots", "show", "-o", "page"], tmp_path)
    page = (tmp_path / "page/index.html").read_text()
    # Nothing loaded from the network: no script or stylesheet with a remote address (DVC's own page uses a CDN).
    assert not re.search(r"<(script|link)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert page.count("vegaEmbed(") >= 8 and "vega-lite@" not in page  # the inlined libraries, DVC's specs

    charts = json.loads(dvc(["plots", "show", "--json"], tmp_path))["data"]
    drawn = []
    for title, (chart,) in charts.items():
        spec = json.dumps(chart["content"])
        files = {row["filename"] for row in chart["content"]["data"]["values"]}
        (field,) = set(re.findall(r'"y": \{"field": "(\w+)"', spec))
        drawn += [(file, field) for file in files]
        # Two runs of one task side by side: the web-pretrained one and the CapFilt one.
        assert len(files) == 2, title
        first, second = sorted(files)
        assert second in {first.replace(".csv", "_capfilt.csv"), "re" + first}, title
    assert len(drawn) == len(set(drawn))  # each curve once
    assert {file for file, _ in drawn} == {Path(csv).name for csv in csvs}  # every run drawn
