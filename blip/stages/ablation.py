"""`blip capfilt-ablation EXPERIMENTS.json`: BLIP's Table 1 in miniature, read from DVC experiments.

Each (seed, arm) is a DVC experiment of the DAG (the README's `dvc exp run --queue -S ...`): the arm is
`capfilt.use_captioner` / `capfilt.use_filter` (filter only, captioner only, both), the seed that of every training
section; the arm `itc_top30` is DataComp's filter (`capfilt.threshold_rule=top_fraction`, ITC, 30%, no captioner).
An experiment's @capfilt fine-tunes give its arm's figures, its @pretrain fine-tunes the "none" arm (no CapFilt: the
same for every arm of a seed). This command reads what `dvc exp show --json` recorded and writes the table (mean and
std over seeds) to `--out/table.{md,json}` and to MLflow: a parent run, a child run per seed and arm tagged
`blip.seed`, `blip.arm` and `dvc.experiment`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from statistics import mean, stdev

from blip.config import ConfigError

ARMS = {(False, True): "filter", (True, False): "captioner", (True, True): "both"}  # (use_captioner, use_filter)
TOP_ITC = "itc_top30"  # DataComp's rule beside CapFilt: the 30% of web pairs with the highest ITC, no captioner


def arm_of(capfilt: dict) -> str | None:
    """The arm an experiment's `capfilt` params make (None: not an ablation arm)."""
    if capfilt.get("threshold_rule") == "top_fraction":
        is_datacomp = (capfilt["score"], capfilt["keep_fraction"], capfilt["use_captioner"]) == ("itc", 0.3, False)
        return TOP_ITC if is_datacomp and capfilt["use_filter"] else None
    return ARMS.get((capfilt["use_captioner"], capfilt["use_filter"]))


RETRIEVAL = ("txt_r1", "img_r1", "semantic_txt_r1", "semantic_img_r1")
FILTER = ("filter_auc_itm", "filter_auc_itc", "filter_auc_synthetic_itm", "web_removed", "synthetic_kept",
          "synthetic_kept_true")  # fmt: skip


def experiments(shown: list[dict]) -> Iterator[tuple[str, dict, dict[str, dict]]]:
    """(name, params, metrics by file) of each experiment in `dvc exp show --json` with params and metrics."""
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs", []):
                data = rev.get("data") or {}
                params = data.get("params", {}).get("params.yaml", {}).get("data")
                metrics = {path: found["data"] for path, found in data.get("metrics", {}).items() if "data" in found}
                if params and metrics:
                    yield rev.get("name") or rev["rev"][:7], params, metrics


def summary(metrics: dict[str, dict], suffix: str) -> dict[str, float]:
    """Retrieval R@1 (and their means) and CIDEr of one variant's fine-tunes (suffix "" or "_capfilt")."""
    retrieval, caption = metrics[f"metrics/retrieval{suffix}.json"], metrics[f"metrics/caption{suffix}.json"]
    out = {key: retrieval[key] for key in RETRIEVAL if key in retrieval} | {"CIDEr": caption["CIDEr"]}
    out["r1_mean"] = (out["txt_r1"] + out["img_r1"]) / 2
    if "semantic_txt_r1" in out:
        out["semantic_r1_mean"] = (out["semantic_txt_r1"] + out["semantic_img_r1"]) / 2
    return out


def results_by_seed(shown: list[dict]) -> tuple[dict[int, dict[str, dict]], dict[tuple[int, str], str]]:
    """seed -> arm -> summary, and which experiment gave each (seed, arm); two experiments for one are an error."""
    results: dict[int, dict[str, dict]] = {}
    names: dict[tuple[int, str], str] = {}
    for name, params, metrics in experiments(shown):
        arm, seed = arm_of(params["capfilt"]), params["pretrain"]["seed"]
        if arm is None or "metrics/retrieval_capfilt.json" not in metrics:
            continue  # not an ablation arm (no CapFilt part), or not run through the fine-tunes
        if (seed, arm) in names:
            raise ConfigError(f"experiments {names[seed, arm]} and {name} are both seed {seed}, arm {arm}: remove one "
                              "(dvc exp remove NAME)")  # fmt: skip
        names[seed, arm] = name
        per_seed = results.setdefault(seed, {})
        per_seed["none"] = summary(metrics, "")
        per_seed[arm] = summary(metrics, "_capfilt") | {k: metrics["metrics/capfilt.json"][k] for k in FILTER
                                                         if k in metrics["metrics/capfilt.json"]}  # fmt: skip
    return results, names


def table(results: dict[int, dict[str, dict]]) -> tuple[str, dict]:
    """Markdown and JSON: mean and std over seeds of each arm's summary metrics."""
    columns = ("r1_mean", "txt_r1", "img_r1", "semantic_r1_mean", "CIDEr", "filter_auc_itm", "filter_auc_itc",
               "filter_auc_synthetic_itm", "synthetic_kept_true")  # fmt: skip
    summary_: dict = {}
    lines = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm in ("none", *ARMS.values(), TOP_ITC):
        cells = []
        for column in columns:
            values = [per_arm[arm][column] for per_arm in results.values() if column in per_arm.get(arm, {})]
            if not values:
                cells.append("-")
                continue
            spread = stdev(values) if len(values) > 1 else 0.0
            summary_.setdefault(arm, {})[column] = {"mean": mean(values), "std": spread, "values": values}
            cells.append(f"{mean(values):.3g} ± {spread:.2g}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary_


def log_to_mlflow(results: dict[int, dict[str, dict]], names: dict[tuple[int, str], str], files: list[Path]) -> None:
    """A parent run with the table; a child per (seed, arm) with its figures."""
    import mlflow

    from blip.tracking.runs import git_commit, use_experiment

    use_experiment()
    tags = {"blip.stage": "capfilt-ablation", "mlflow.source.git.commit": git_commit()}
    with mlflow.start_run(run_name="capfilt-ablation", tags=tags, log_system_metrics=False):
        for seed, per_arm in sorted(results.items()):
            for arm, metrics in per_arm.items():
                child = {"blip.seed": str(seed), "blip.arm": arm, "dvc.experiment": names.get((seed, arm), "-")}
                with mlflow.start_run(run_name=f"seed{seed}/{arm}", nested=True, tags=tags | child,
                                      log_system_metrics=False):  # fmt: skip
                    mlflow.log_metrics(metrics)
        for path in files:
            mlflow.log_artifact(str(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip capfilt-ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("experiments", type=Path, help="what `dvc exp show --json` printed")
    parser.add_argument("--out", type=Path, default=Path("reports/ablation"))
    args = parser.parse_args(argv)
    results, names = results_by_seed(json.loads(args.experiments.read_text()))
    if not results:
        raise ConfigError(f"{args.experiments}: no finished ablation experiment (CapFilt arm with its fine-tunes)")
    markdown, summary_ = table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    files = [args.out / "table.md", args.out / "table.json"]
    files[0].write_text(markdown)
    files[1].write_text(json.dumps({"seeds": sorted(results), "experiments": {f"seed{s}/{a}": n for (s, a), n in
                                                                               names.items()}, "arms": summary_},
                                   indent=2))  # fmt: skip
    log_to_mlflow(results, names, files)
    print(markdown)
    return 0
