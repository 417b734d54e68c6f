"""The whole DAG end to end at a preset's size on a small world, every training stage under torchrun, with a kill
and resume of pretraining: the check that the GPU path runs, sized for one lent GPU call (a few minutes).

    python -m benchmarks.gpu_dag                      # configs/base.yaml on the GPUs here (benchmarks/gpu.sh runs it)
    python -m benchmarks.gpu_dag --cpu-dry-run        # params.yaml's tiny model, 2 ranks with gloo: the same path

Writes the params it used, every stage's log and metrics file, and `summary.json` (each stage's seconds and exit
code, the kill and the resumed step, the metrics files found) to `--out` (default benchmarks/results/gpu_dag).
Stages come from dvc.yaml in DVC's order (dag_order; DVC itself need not be installed); each runs in a fresh work
folder with `python -m blip`, the training ones through `torch.distributed.run` on every GPU (NCCL; a single GPU
runs one rank, which holds no process group, so NCCL itself needs two or more). Pretraining is killed (SIGKILL to
the launcher and every rank) once its first checkpoint is on disk and run again: its log must say it resumed
from that step.
Exits 1 if a stage failed, a metrics file is missing or the resume did not happen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Not training (no torchrun): data preparation and the summary.
PLAIN = {"ingest", "sources", "vocab", "summary"}
SMALL_WORLD = {"web_images": 2000, "clean_train": 200, "clean_val": 50, "clean_test": 100, "nlvr_train": 200,
               "nlvr_test": 100}  # fmt: skip
TASKS = ("caption", "retrieval", "vqa", "nlvr")


def expanded_stages(dvc_yaml: Path) -> list[tuple[str, dict]]:
    """(name, spec) of every stage in file order, `foreach` expanded (name@key, `${item.*}` filled in)."""
    stages: list[tuple[str, dict]] = []
    for name, spec in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        if "foreach" not in spec:
            stages.append((name, spec))
            continue
        for key, item in spec["foreach"].items():
            text = yaml.safe_dump(spec["do"])
            for field, value in item.items():
                text = text.replace("${item." + field + "}", str(value))
            stages.append((f"{name}@{key}", yaml.safe_load(text)))
    return stages


def paths(entries: list | None) -> set[str]:
    """The paths of a stage's deps, outs or metrics (an entry is a path or {path: options})."""
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}


def dag_order(dvc_yaml: Path) -> list[tuple[str, str]]:
    """(stage name, command) of every stage, each after the stages whose outputs it depends on, otherwise in file
    order."""
    stages = expanded_stages(dvc_yaml)

    def overlap(a: set[str], b: set[str]) -> bool:  # a folder holds the files under it
        return any(x == y or x.startswith(y + "/") or y.startswith(x + "/") for x in a for y in b)

    outs = {name: paths(spec.get("outs")) | paths(spec.get("metrics")) for name, spec in stages}
    ordered: list[tuple[str, str]] = []
    done: set[str] = set()
    while len(ordered) < len(stages):
        for name, spec in stages:
            needs = {other for other, made in outs.items() if other != name and overlap(made, paths(spec.get("deps")))}
            if name not in done and needs <= done:
                ordered.append((name, " ".join(spec["cmd"].split())))
                done.add(name)
                break
        else:
            raise ValueError(f"{dvc_yaml}: a dependency cycle among {sorted({n for n, _ in stages} - done)}")
    return ordered


def small_params(preset: Path, steps: int, batch: int, workers: int, image_size: int | None) -> dict:
    """The preset on a small world: `steps` steps per training stage, evaluation on a few images."""
    params = yaml.safe_load(preset.read_text())
    params["world"].update(SMALL_WORLD, **({"image_size": image_size} if image_size else {}))
    params["ingest"]["samples_per_shard"] = 250
    params["data"].update(num_workers=workers, shuffle_buffer=500)
    checkpointing = {"checkpoint_every": max(2, steps // 4), "log_every": max(1, steps // 10)}
    for section in ("pretrain", "repretrain"):
        params[section].update(epochs=1, steps_per_epoch=steps, warmup_steps=max(1, steps // 10), batch_size=batch,
                               alpha_ramp_epochs=1, eval_images=50, **checkpointing)  # fmt: skip
        if params[section].get("queue_size"):  # the queue takes whole batches
            params[section]["queue_size"] = batch * (params[section]["queue_size"] // batch)
    for task in TASKS:
        params[task].update(epochs=1, steps_per_epoch=max(2, steps // 2), batch_size=batch, **checkpointing)
    params["caption"]["eval_images"], params["vqa"]["eval_questions"] = 50, 150
    for section in ("retrieval", "retrieval_zeroshot"):
        params[section]["eval"]["images"] = 50
    params["capfilt"]["batch_size"] = batch
    return params


def run_stage(name: str, command: str, work: Path, logs: Path, env: dict[str, str], ranks: int) -> subprocess.Popen:
    argv = shlex.split(command)
    launcher = [sys.executable, "-m", "blip"]
    if name.split("@")[0] not in PLAIN:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                    "-m", "blip"]  # fmt: skip
    log = (logs / f"{name}.log").open("a")
    return subprocess.Popen([*launcher, *argv[1:]], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc): torchrun starts its ranks in sessions of their own, so killing its
    process group leaves them training."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_after_first_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float) -> int | None:
    """SIGKILL the launcher and its ranks once a checkpoint is complete; its step, or None if the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        # Complete: the checkpoint renamed into place (its checksum is written before the rename).
        done = sorted(p for p in folder.glob("step-*.pt") if Path(f"{p}.sha256").is_file())
        if done:  # as a lost machine would: the launcher and every rank at once
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            return int(done[-1].stem.split("-")[1])
        time.sleep(0.05)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="params.yaml's tiny model, 2 CPU ranks (gloo)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_dag")
    parser.add_argument("--work", type=Path, help="work folder, emptied first (default: a new temporary one)")
    parser.add_argument("--steps", type=int, default=40, help="pretraining steps (checkpoints every quarter)")
    args = parser.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here (--cpu-dry-run runs the same path on the CPU)")
    work = args.work or Path(tempfile.mkdtemp(prefix="blip-gpu-dag-"))
    try:
        return run_dag(args, work)
    finally:  # a temporary folder of its own goes when done: each run writes ~350 MB there (what is kept is in --out)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run_dag(args: argparse.Namespace, work: Path) -> int:
    """Every stage in DAG order in `work`; summary, logs and metrics to args.out. 0 when all of it passed."""
    if args.cpu_dry_run:
        preset, ranks, steps, batch, workers, size = ROOT / "params.yaml", 2, args.steps, 16, 1, None
    else:
        preset, ranks, steps, batch, workers, size = ROOT / "configs/base.yaml", torch.cuda.device_count(), \
            args.steps, 64, 8, 224  # fmt: skip
    logs = args.out / "logs"
    for folder in (work, logs):
        shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True)
    logs.mkdir(parents=True)
    params = small_params(preset, steps, batch, workers, size)
    if tokenizer := os.environ.get("BLIP_BENCH_TOKENIZER"):  # BERT's vocab.txt where its package is not installed
        params["tokenizer"]["name"] = tokenizer
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (args.out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    summary: dict = {"device": torch.cuda.get_device_name() if not args.cpu_dry_run else "cpu",
                     "ranks": ranks, "stages": [], "kill_resume": None}  # fmt: skip
    failed = False
    for name, command in dag_order(ROOT / "dvc.yaml"):
        start = time.monotonic()
        proc = run_stage(name, command, work, logs, env, ranks)
        if name == "pretrain":
            killed = kill_after_first_checkpoint(proc, work / params["pretrain"]["checkpoint_dir"], timeout=1800)
            summary["kill_resume"] = {"killed_after_checkpoint_step": killed}
            if killed is not None:
                proc = run_stage(name, command, work, logs, env, ranks)
        code = proc.wait()
        summary["stages"].append({"stage": name, "seconds": round(time.monotonic() - start, 1), "exit_code": code})
        print(f"{name:<32} {time.monotonic() - start:7.1f} s  exit {code}", flush=True)
        if code != 0:
            failed = True
            break
    # A resume counts if the second run started from the checkpoint the first was killed after, before the end.
    resumed = [line for line in (logs / "pretrain.log").read_text().splitlines() if "resuming from" in line]
    killed = (summary["kill_resume"] or {}).get("killed_after_checkpoint_step")
    # (A checkpoint completed between the look and the kill would be resumed instead: a later step, still fine.)
    step = int(resumed[-1].rsplit("(step ", 1)[1].rstrip(")")) if resumed else None
    resumed_ok = killed is not None and step is not None and killed <= step < steps
    if summary["kill_resume"] is not None:
        summary["kill_resume"].update(resumed=resumed[-1] if resumed else None, resumed_from_step=step,
                                      of_steps=steps, ok=resumed_ok)  # fmt: skip
    (args.out / "metrics").mkdir(exist_ok=True)
    found = sorted((work / "metrics").glob("*.json"))
    for path in found:
        (args.out / "metrics" / path.name).write_text(path.read_text())
    summary["metrics_files"] = [path.name for path in found]
    expected = _metrics_outputs(ROOT / "dvc.yaml")
    summary["missing_metrics"] = sorted(expected - set(summary["metrics_files"]))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ok = not failed and not summary["missing_metrics"] and resumed_ok
    print("OK" if ok else f"FAILED: {json.dumps({k: summary[k] for k in ('missing_metrics', 'kill_resume')})}")
    return 0 if ok else 1


def _metrics_outputs(dvc_yaml: Path) -> set[str]:
    """The file names of the metrics the DAG declares in metrics/."""
    declared = {path for _, spec in expanded_stages(dvc_yaml) for path in paths(spec.get("metrics"))}
    return {path.removeprefix("metrics/") for path in declared if path.startswith("metrics/") and path.count("/") == 1}


if __name__ == "__main__":
    raise SystemExit(main())
