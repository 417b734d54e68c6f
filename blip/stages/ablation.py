"""`blip capfilt-ablation`: BLIP's Table 1 in miniature. For each seed, pretrain on web + human pairs, fine-tune
the captioner and the filter, then for each arm bootstrap, re-pretrain from scratch (same steps) and fine-tune
retrieval and captioning:

- none: no CapFilt (the first pretraining's own fine-tunes: the same data and steps)
- filter: web captions filtered, no synthetic ones
- captioner: synthetic captions added, nothing filtered
- both: synthetic captions added, web and synthetic filtered

Every run happens in `--out/seed<s>/<arm>/` (its own metrics/, models/, reports/) with the project's shards and
vocabulary; `--set` overrides apply to every stage (e.g. a larger budget: `--set pretrain.epochs=4`). MLflow: one
parent run, a child per (seed, arm) tagged with both and holding the summary metrics, the stage runs under it.
The table (mean and std over seeds) goes to `--out/table.md` and `table.json` and to the parent run.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from statistics import mean, stdev

from blip.config import ConfigError, load_params
from blip.config.params import DEFAULT_PARAMS

ARMS = {"filter": (False, True), "captioner": (True, False), "both": (True, True)}  # (use_captioner, use_filter)
SUMMARY = ("txt_r1", "img_r1", "semantic_txt_r1", "semantic_img_r1", "CIDEr", "filter_auc_itm", "filter_auc_itc",
           "web_removed", "synthetic_kept")  # fmt: skip


@contextmanager
def inside(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


SEEDED = ("pretrain", "repretrain", "caption", "retrieval", "capfilt")
STAGES = {"pretrain": "blip.stages.pretrain", "caption": "blip.stages.caption", "retrieval": "blip.stages.retrieval",
          "capfilt": "blip.stages.capfilt"}  # fmt: skip


def mirrored(sets: list[str]) -> list[str]:
    """`--set pretrain.<key>=...` applied to `repretrain` too, so the re-pretraining keeps the same budget (its
    data, output and checkpoint keys stay its own)."""
    own = ("splits", "shard_root", "output", "checkpoint_dir")
    extra = [
        f"re{item}" for item in sets if item.startswith("pretrain.") and item.split("=")[0].split(".")[1] not in own
    ]
    return [*sets, *extra]


def _absolute(name: str) -> str:
    """A tokenizer path made absolute (the runs happen in other folders); a hub or package name unchanged."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def run_stage(name: str, params_file: Path, sets: list[str], extra: Sequence[str] = ()) -> None:
    args = ["--params", str(params_file), *extra]
    for item in sets:
        args += ["--set", item]
    if import_module(STAGES[name]).main(args) != 0:
        raise RuntimeError(f"ablation: stage {name} failed ({' '.join(sets)})")


def arm_summary(folder: Path) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name in ("retrieval", "caption", "capfilt"):
        path = folder / "metrics" / f"{name}.json"
        if path.is_file():
            metrics |= {k: v for k, v in json.loads(path.read_text()).items() if k in SUMMARY}
    metrics["r1_mean"] = (metrics["txt_r1"] + metrics["img_r1"]) / 2
    metrics["semantic_r1_mean"] = (metrics["semantic_txt_r1"] + metrics["semantic_img_r1"]) / 2
    return metrics


def seed_runs(
    seed: int, out: Path, params_file: Path, sets: list[str], child: Callable, arms: Sequence[str] = ("none", *ARMS)
) -> dict[str, dict]:
    """All arms of one seed (finished arms are read back, not rerun); returns arm -> summary metrics."""
    params = load_params(params_file, sets)
    common = [f"data.shard_root={params.data.shard_root.resolve()}",
              f"tokenizer.name={_absolute(params.tokenizer.name)}", *mirrored(sets),
              *(f"{section}.seed={seed}" for section in SEEDED)]  # fmt: skip
    base = out / f"seed{seed}" / "none"
    plans: dict[str, tuple[Path, list[tuple[str, list[str], list[str]]]]] = {
        "none": (base, [(stage, common, []) for stage in ("pretrain", "caption", "retrieval")])
    }
    for arm, (captioner, filter_) in ARMS.items():
        arm_sets = [*common, f"capfilt.use_captioner={captioner}", f"capfilt.use_filter={filter_}",
                    f"capfilt.captioner={base / 'models/caption.safetensors'}",
                    f"capfilt.filter={base / 'models/retrieval.safetensors'}",
                    "caption.init=models/repretrain.safetensors",
                    "retrieval.init=models/repretrain.safetensors"]  # fmt: skip
        steps = [("capfilt", arm_sets, []), ("pretrain", arm_sets, ["--section", "repretrain"]),
                 ("caption", arm_sets, []), ("retrieval", arm_sets, [])]  # fmt: skip
        plans[arm] = (out / f"seed{seed}" / arm, steps)
    results = {}
    for arm, (folder, steps) in plans.items():
        if arm != "none" and arm not in arms:  # none always runs: the baseline, and the others need its models
            continue
        done = folder / "summary.json"
        if done.is_file():
            results[arm] = json.loads(done.read_text())
            continue
        with child(seed, arm) as log_summary, inside(folder):
            for stage, stage_sets, extra in steps:
                run_stage(stage, params_file, stage_sets, extra)
            results[arm] = arm_summary(folder)
            log_summary(results[arm])
            done.write_text(json.dumps(results[arm], indent=2))
    return results


def check_settings(out: Path, params_file: Path, sets: list[str]) -> None:
    """Finished arms are reused, so `out` must only ever hold runs of one configuration."""
    settings = {"params": json.loads(load_params(params_file, sets).model_dump_json()), "overrides": sets}
    recorded = out / "settings.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise ConfigError(f"{out} holds ablation runs made with other params or overrides ({recorded}); "
                          "use another --out, or delete it to start over")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=2))


def table(results: dict[int, dict[str, dict]]) -> tuple[str, dict]:
    """Markdown and JSON: mean and std over seeds of each arm's summary metrics."""
    columns = ("r1_mean", "txt_r1", "img_r1", "semantic_r1_mean", "CIDEr", "filter_auc_itm", "filter_auc_itc")
    summary: dict = {}
    lines = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm in ("none", *ARMS):
        cells = []
        for column in columns:
            values = [per_arm[arm][column] for per_arm in results.values() if column in per_arm.get(arm, {})]
            if not values:
                cells.append("-")
                continue
            spread = stdev(values) if len(values) > 1 else 0.0
            summary.setdefault(arm, {})[column] = {"mean": mean(values), "std": spread, "values": values}
            cells.append(f"{mean(values):.3g} ± {spread:.2g}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip capfilt-ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("reports/ablation"))
    parser.add_argument("--arms", nargs="+", choices=["none", *ARMS], default=["none", *ARMS],
                        help="a subset of the arms, e.g. both for a quick look (none always runs)")  # fmt: skip
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from blip.tracking.runs import git_commit, use_experiment

    params_file, out = args.params.resolve(), args.out.resolve()
    check_settings(out, params_file, args.overrides)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")
    # Runs made with the client, never "active": each stage opens its own run, nested by BLIP_PARENT_RUN_ID.
    client, experiment = MlflowClient(), use_experiment()
    tags = {"blip.stage": "capfilt-ablation", "mlflow.source.git.commit": git_commit()}
    parent = client.create_run(experiment, tags=tags, run_name="capfilt-ablation").info.run_id
    client.log_param(parent, "overrides", " ".join(args.overrides)[:6000] or "none")

    @contextmanager
    def child(seed: int, arm: str) -> Iterator[Callable[[dict], None]]:
        run = client.create_run(
            experiment,
            run_name=f"seed{seed}/{arm}",
            tags={**tags, "blip.arm": arm, "blip.seed": str(seed), "mlflow.parentRunId": parent},
        )
        os.environ["BLIP_PARENT_RUN_ID"] = run.info.run_id
        status = "FAILED"
        try:
            yield lambda metrics: [client.log_metric(run.info.run_id, k, v) for k, v in metrics.items()]
            status = "FINISHED"
        finally:
            os.environ.pop("BLIP_PARENT_RUN_ID", None)
            client.set_terminated(run.info.run_id, status)

    results: dict[int, dict[str, dict]] = {}
    try:
        for seed in args.seeds:
            results[seed] = seed_runs(seed, out, params_file, args.overrides, child, args.arms)
            markdown, summary = table(results)
            (out / "table.md").write_text(markdown)
            (out / "table.json").write_text(json.dumps({"seeds": list(results), "arms": summary}, indent=2))
            print(markdown)
        for name in ("table.md", "table.json"):
            client.log_artifact(parent, str(out / name))
        client.set_terminated(parent, "FINISHED")
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    return 0
