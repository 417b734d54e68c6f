"""The full pretraining step (ITC with momentum encoders and queue + ITM with hard negatives + LM, backward,
AdamW): samples/s, peak memory, model FLOPs per sample (benchmarks/flops.py) and, on a GPU, MFU against its bf16
dense peak.

    python -m benchmarks.pretrain_step [--sizes tiny base] [--device cuda] [--bf16] [--compile] [--batch 32]
    python -m benchmarks.pretrain_step --sizes base base --batch 96 192 --profile   (a batch sweep; a kernel table)

tiny = params.yaml's model (queue 0, as its pretrain section), base = configs/base.yaml's (ViT-B/16 at 224, BERT-base,
queue 57,600 as BLIP). Inputs are random images and 30-token captions (BLIP's pretraining max_words is 30).
Writes benchmarks/results/pretrain_step_<device>[_compile].json and, with --profile, the top operators of the last
run's steps by device time to pretrain_profile_<device>[_compile].txt.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.flops import pretrain_flops_per_sample
from benchmarks.vs_transformers import ROOT, TOKENIZER, describe, model_config
from blip.config import load_params
from blip.data.tokenizer import load_tokenizer
from blip.models.factory import build_model
from blip.training.optim import build_optimizer

RESULTS = Path(__file__).parent / "results"
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts).
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
TEXT_LEN = 32  # [CLS] + 30 words + [SEP]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def bench(size: str, device: torch.device, batch: int, steps: int, bf16: bool, compile_: bool,
          profile_to: Path | None = None) -> dict:  # fmt: skip
    cfg = model_config(size)
    section = load_params(ROOT / ("params.yaml" if size == "tiny" else "configs/base.yaml")).pretrain
    torch.manual_seed(0)
    model = (
        build_model("pretrain", cfg, load_tokenizer(TOKENIZER), section.queue_size, section.momentum).to(device).train()
    )
    optimizer = build_optimizer(model, section, device)
    forward = model
    if compile_:
        torch._dynamo.reset()  # a fresh compilation per run: a second batch size would turn on dynamic shapes
        forward = torch.compile(model)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    ids = torch.randint(1000, 29000, (batch, TEXT_LEN), device=device)
    ids[:, 0] = 101  # [CLS]
    mask, image_ids = torch.ones_like(ids), torch.arange(batch, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast:
            loss = forward(images, ids, mask, 0.4, image_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    if profile_to is not None:  # after timing and memory: the profiler's overhead stays out of them
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile_to.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70))
    flops = pretrain_flops_per_sample(cfg, TEXT_LEN, batch, section.queue_size)
    achieved = flops * batch / seconds
    out = {"batch": batch, "step_s": seconds, "samples_per_s": batch / seconds, "peak_memory_gib": peak / 2**30,
           "gflops_per_sample": flops / 1e9, "achieved_tflops": achieved / 1e12,
           "parameters_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6}  # fmt: skip
    if peak_flops(device):
        out["mfu"] = achieved / peak_flops(device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="per size; default 64 tiny, 4 (CPU) base")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler table of the last run")
    args = parser.parse_args()
    device = torch.device(args.device)
    defaults = {"tiny": 64, "base": 48 if device.type == "cuda" else 4}
    batches = args.batch or [defaults[size] for size in args.sizes]
    if len(batches) != len(args.sizes):
        parser.error(f"--batch needs one value per size ({len(args.sizes)}), got {len(batches)}")
    suffix = f"{device.type}{'_compile' if args.compile else ''}"
    results = {"device": describe(device), "bf16": args.bf16, "compile": args.compile, "runs": []}
    RESULTS.mkdir(exist_ok=True)
    print(f"{'size':<5} {'batch':>5} {'samples/s':>10} {'peak GiB':>9} {'GFLOP/sample':>13} {'TFLOP/s':>8} {'MFU':>6}")
    for i, (size, batch) in enumerate(zip(args.sizes, batches, strict=True)):
        last = i == len(args.sizes) - 1
        profile_to = RESULTS / f"pretrain_profile_{suffix}.txt" if args.profile and last else None
        row = {"size": size} | bench(size, device, batch, args.steps, args.bf16, args.compile, profile_to)
        results["runs"].append(row)
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "-"
        print(f"{size:<5} {row['batch']:>5} {row['samples_per_s']:10.1f} {row['peak_memory_gib']:9.2f} "
              f"{row['gflops_per_sample']:13.1f} {row['achieved_tflops']:8.2f} {mfu:>6}")  # fmt: skip
    (RESULTS / f"pretrain_step_{suffix}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
