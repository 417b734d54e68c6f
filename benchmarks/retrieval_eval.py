"""Retrieval evaluation cost as the gallery grows: the ITC part is chunked (peak memory set by the chunk, not by
N x 5N), the ITM part costs (N + 5N) x k pair scorings.

    python benchmarks/retrieval_eval.py [--device cuda] [--sizes 1000 2000 5000] [--chunk 256]

Each size runs in a fresh subprocess so that its peak memory is its own (CPU: peak RSS above the features;
CUDA: peak allocated above the features). Prints a table and writes benchmarks/results/retrieval_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from blip.config import load_params
from blip.data.tokenizer import load_tokenizer
from blip.eval.retrieval import TopK, chunked_topk, itm_rerank
from blip.models.factory import build_model

RESULTS = Path(__file__).parent / "results"
MiB = 2**20


def itc_part(images: int, chunk: int, key_chunk: int, k: int, dim: int, device: str) -> dict[str, float]:
    """Peak extra memory and time of both top-k passes over `images` x 5 `images` similarities."""
    generator = torch.Generator().manual_seed(0)
    image_feat = torch.nn.functional.normalize(torch.randn(images, dim, generator=generator), dim=1).to(device)
    text_feat = torch.nn.functional.normalize(torch.randn(5 * images, dim, generator=generator), dim=1).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    i2t = chunked_topk(image_feat, text_feat, k, chunk, key_chunk)
    t2i = chunked_topk(text_feat, image_feat, k, chunk, key_chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB on Linux
    result = sum(t.indices.nbytes + t.scores.nbytes for t in (i2t, t2i))  # the N x k answer itself
    return {"seconds": time.perf_counter() - start, "peak_extra_mib": max(peak, 0) / MiB, "result_mib": result / MiB,
            "working_mib": max(peak - 2 * result, 0) / MiB,  # x2: the chunks' results and their concatenation
            "full_matrix_mib": images * 5 * images * 4 / MiB}  # fmt: skip


def itm_part(queries: int, k: int, device: str) -> float:
    """Seconds to re-rank `queries` x k candidates with the committed tiny model's ITM (BERT vocabulary)."""
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    model = (
        build_model(
            "retrieval",
            params.model,
            load_tokenizer(os.environ.get("BLIP_BENCH_TOKENIZER", "bert-base-uncased-offline")),
            0,
        )
        .to(device)
        .eval()
    )
    tokens = (params.model.image_size // params.model.patch_size) ** 2 + 1
    embeds = torch.randn(queries, tokens, params.model.vision_width)  # one image per query, 64 candidate texts
    ids, mask = torch.randint(1000, 2000, (64, 12)), torch.ones(64, 12, dtype=torch.long)
    candidates = TopK(torch.randint(0, 64, (queries, k)), torch.zeros(queries, k))
    start = time.perf_counter()
    itm_rerank(model, candidates, embeds, ids, mask, True, 256, torch.device(device))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--key-chunk", type=int, default=4096)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--itm-queries", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--itm-k", type=int, default=16)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size and print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(itc_part(args.one, args.chunk, args.key_chunk, args.k, args.dim, args.device)))
        return
    rows = []
    for images in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(images), "--chunk", str(args.chunk), "--key-chunk",
               str(args.key_chunk), "--k", str(args.k), "--dim", str(args.dim), "--device", args.device]  # fmt: skip
        rows.append({"images": images, "texts": 5 * images, **json.loads(subprocess.check_output(cmd, text=True))})
    itm = [{"queries": q, "k": args.itm_k, "seconds": itm_part(q, args.itm_k, args.device)} for q in args.itm_queries]
    print(f"ITC top-{args.k}, blocks of {args.chunk} rows x {args.key_chunk} keys, dim {args.dim}, {args.device}")
    print(f"{'images':>8} {'texts':>8} {'seconds':>8} {'peak MiB':>9} {'result MiB':>11} {'working MiB':>12} "
          f"{'N x 5N MiB':>11}")  # fmt: skip
    for row in rows:
        print(f"{row['images']:>8} {row['texts']:>8} {row['seconds']:>8.2f} {row['peak_extra_mib']:>9.1f} "
              f"{row['result_mib']:>11.1f} {row['working_mib']:>12.1f} {row['full_matrix_mib']:>11.1f}")  # fmt: skip
    print(f"ITM re-rank (tiny model), k = {args.itm_k}")
    for row in itm:
        rate = row["queries"] * row["k"] / row["seconds"]
        print(f"{row['queries']:>8} queries {row['seconds']:>8.2f} s {rate:>8.0f} pairs/s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieval_eval.json").write_text(json.dumps({"itc": rows, "itm": itm, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
