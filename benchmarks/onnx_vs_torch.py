"""onnxruntime against torch on the same weights: captions/s and scored pairs/s.

    python -m benchmarks.onnx_vs_torch [--sizes tiny] [--batch 8] [--repeats 5]

Random weights and BERT's vocabulary (as `vs_transformers.py`), exported with `blip export-onnx` into a temporary
folder; both sides on the CPU with the same thread count. Captions: greedy and beam 3, 5 to 20 tokens, the same
Python search loop over each side's logits (the captions are checked equal). Pairs: ITM probability + ITC
similarity of `--batch` image-text pairs. Writes benchmarks/results/onnx_vs_torch.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.vs_transformers import CAPTIONS, RESULTS, TOKENIZER, describe, model_config, timed
from blip.data.tokenizer import load_tokenizer
from blip.models.factory import build_model
from blip.models.generation import GenerationConfig
from blip.onnx.export import export_onnx
from blip.onnx.runner import load_onnx

CPU = torch.device("cpu")


def bench_size(size: str, batch: int, repeats: int, folder: Path) -> dict:
    cfg, tokenizer = model_config(size), load_tokenizer(TOKENIZER)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    out: dict[str, dict] = {}
    torch.manual_seed(0)
    captioner = build_model("caption", cfg, tokenizer).eval()
    export_onnx(captioner, "caption", tokenizer, folder / f"{size}_caption")
    runner = load_onnx(folder / f"{size}_caption", threads=torch.get_num_threads())
    for method, beams in (("greedy", 1), ("beam", 3)):
        config = GenerationConfig(method=method, num_beams=beams, max_length=20, min_length=5)
        with torch.inference_mode():
            if runner.generate(images, config) != captioner.generate(images, config):
                raise AssertionError(f"{size} {method}: onnxruntime's captions differ from torch's")
            seconds = {"torch": timed(lambda c=config: captioner.generate(images, c), CPU, repeats),
                       "onnxruntime": timed(lambda c=config: runner.generate(images, c), CPU, repeats)}  # fmt: skip
        out[f"captions_{method}"] = {side: batch / s for side, s in seconds.items()}

    torch.manual_seed(0)
    model = build_model("retrieval", cfg, tokenizer, queue_size=16).eval()
    export_onnx(model, "retrieval", tokenizer, folder / f"{size}_retrieval")
    scorer = load_onnx(folder / f"{size}_retrieval", threads=torch.get_num_threads())
    texts = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)], padding="longest", return_tensors="pt")
    pairs = (images, texts.input_ids, texts.attention_mask)
    with torch.inference_mode():
        seconds = {"torch": timed(lambda: model.score_pairs(*pairs), CPU, repeats),
                   "onnxruntime": timed(lambda: scorer.score_pairs(*pairs), CPU, repeats)}  # fmt: skip
    out["pairs"] = {side: batch / s for side, s in seconds.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny"], choices=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {"device": describe(CPU), "batch": args.batch, "sizes": {}}
    print(f"{'size':<5} {'what':<16} {'torch /s':>9} {'onnxruntime /s':>15} {'ort/torch':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            results["sizes"][size] = rows = bench_size(size, args.batch, args.repeats, Path(tmp))
            for what, row in rows.items():
                speedup = row["onnxruntime"] / row["torch"]
                print(f"{size:<5} {what:<16} {row['torch']:9.1f} {row['onnxruntime']:15.1f} {speedup:9.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_vs_torch.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
