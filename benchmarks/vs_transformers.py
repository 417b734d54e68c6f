"""Our BLIP against transformers' BLIP at equal sizes, weights and inputs; ratio = ours / reference time (<= 1.0:
we are at least as fast).

    python -m benchmarks.vs_transformers [--sizes tiny base] [--device cpu|cuda] [--bf16] [--batch 8] [--check]

- caption training step: forward + backward + AdamW step of the LM loss (ours: BlipCaptioner with the trainer's
  optimizer; reference: BlipForConditionalGeneration with `labels` and torch's AdamW);
- ITM + ITC scoring of image-text pairs (ours: `score_pairs`; reference: BlipForImageTextRetrieval called with
  use_itm_head=True and False, as its API needs for the two scores);
- caption generation, beam 3 and greedy, 5 to 20 tokens (ours: `generate`; reference: `generate` of the same
  weights, exported with blip.models.export_hf).
tiny = params.yaml's model, base = configs/base.yaml's (ViT-B/16, BERT-base), random weights and BERT's vocabulary.
Prints a table and writes benchmarks/results/vs_transformers_<device>.json. With --check it exits 1 when a ratio is
above its target (TARGETS; `make bench` checks), so a change that makes us slower does not slide by unnoticed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import PreTrainedTokenizer

from blip.allocator import reuse_freed_memory
from blip.config import load_params
from blip.config.schema import ModelConfig, TrainConfig
from blip.data.tokenizer import PACKAGED_BERT, SpecialTokens, load_tokenizer
from blip.models.caption import PROMPT
from blip.models.export_hf import HF_CLASSES, hf_config, to_hf_state
from blip.models.factory import build_model
from blip.models.generation import GenerationConfig
from blip.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
# BERT's vocabulary: the packaged copy, or a vocab.txt where that package is not installed (the GPU script).
TOKENIZER = os.environ.get("BLIP_BENCH_TOKENIZER", PACKAGED_BERT)
CAPTIONS = ["a large red circle to the left of a small blue square", "a small green triangle", "a white diamond"]


# Ours / transformers' time, at most (issue 18), per device and size. At base on a CPU both sides do the same
# compute-bound matrix products at batch 4: `cpu_floor.py` measures how low a ratio that leaves (0.83 for greedy
# generation, 0.74 for the training step), hence the looser base row there.
ISSUE_TARGETS = {"caption_train_step": 0.67, "generate_beam": 0.5, "generate_greedy": 0.5, "itm_itc_scores": 0.67}
TARGETS = {
    "cpu": {"tiny": ISSUE_TARGETS,
            "base": {"caption_train_step": 0.9, "generate_beam": 1.0, "generate_greedy": 1.0, "itm_itc_scores": 0.8}},
    "cuda": {"tiny": ISSUE_TARGETS, "base": ISSUE_TARGETS},
}  # fmt: skip


def model_config(size: str) -> ModelConfig:
    params = load_params(ROOT / ("params.yaml" if size == "tiny" else "configs/base.yaml"))
    # Random weights, BERT's vocabulary on both sides; dropout off so the two do the same arithmetic.
    return params.model.model_copy(update={"vit_init": None, "bert_init": None, "vocab_size": 30524,
                                           "text_dropout": 0.0, "max_text_positions": 512})  # fmt: skip


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `repeats` calls after `warmup` calls."""
    times = []
    for i in range(repeats + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_of(ours: torch.nn.Module, kind: str, cfg: ModelConfig, tokenizer: PreTrainedTokenizer) -> torch.nn.Module:
    model = HF_CLASSES[kind][0](hf_config(cfg, SpecialTokens.of(tokenizer)))
    model.load_state_dict(to_hf_state(ours.state_dict(), kind), strict=False)  # the tied LM head comes along
    return model


def bench_size(size: str, device: torch.device, batch: int, repeats: int, bf16: bool, compile_: bool) -> dict:
    cfg, tokenizer = model_config(size), load_tokenizer(TOKENIZER)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    texts = [PROMPT + CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    tokens = tokenizer(texts, padding="longest", return_tensors="pt").to(device)
    out: dict[str, dict] = {}

    torch.manual_seed(0)
    ours = build_model("caption", cfg, tokenizer).to(device).train()
    theirs = reference_of(ours, "caption", cfg, tokenizer).to(device).train()
    optimizer = build_optimizer(ours, TrainConfig(lr=1e-5), device)
    reference_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-5, weight_decay=0.05)
    step_model = torch.compile(ours) if compile_ else ours
    hf_ids = tokens.input_ids.clone()
    hf_ids[:, 0] = SpecialTokens.of(tokenizer).bos
    labels = hf_ids.masked_fill(tokens.attention_mask == 0, -100)

    def our_step() -> None:
        with autocast():
            loss = step_model(images, tokens.input_ids, tokens.attention_mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def reference_step() -> None:
        with autocast():
            loss = theirs(pixel_values=images, input_ids=hf_ids, attention_mask=tokens.attention_mask,
                          labels=labels).loss  # fmt: skip
        loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)

    out["caption_train_step"] = compare(our_step, reference_step, device, repeats)

    ours.eval()
    theirs.eval()
    prompt = tokenizer([PROMPT.strip()] * batch, return_tensors="pt").input_ids.to(device)
    for method, beams in (("beam", 3), ("greedy", 1)):
        config = GenerationConfig(method=method, num_beams=beams, max_length=20, min_length=5)

        @torch.no_grad()
        def our_generate(config: GenerationConfig = config) -> None:
            with autocast():
                ours.generate(images, config)

        @torch.no_grad()
        def reference_generate(beams: int = beams) -> None:
            with autocast():
                theirs.generate(pixel_values=images, input_ids=prompt, max_length=20, min_length=5, num_beams=beams,
                                do_sample=False)  # fmt: skip

        out[f"generate_{method}"] = compare(our_generate, reference_generate, device, repeats)

    torch.manual_seed(0)
    ours = build_model("retrieval", cfg, tokenizer, queue_size=16).to(device).eval()
    theirs = reference_of(ours, "retrieval", cfg, tokenizer).to(device).eval()
    pair_tokens = tokenizer(CAPTIONS * (batch // len(CAPTIONS) + 1), padding="longest", return_tensors="pt")
    ids, mask = pair_tokens.input_ids[:batch].to(device), pair_tokens.attention_mask[:batch].to(device)
    enc_ids = ids.clone()
    enc_ids[:, 0] = SpecialTokens.of(tokenizer).enc

    @torch.no_grad()
    def our_scores() -> None:
        with autocast():
            ours.score_pairs(images, ids, mask)

    @torch.no_grad()
    def reference_scores() -> None:
        with autocast():
            theirs(pixel_values=images, input_ids=enc_ids, attention_mask=mask).itm_score.softmax(-1)
            theirs(pixel_values=images, input_ids=ids, attention_mask=mask, use_itm_head=False)

    out["itm_itc_scores"] = compare(our_scores, reference_scores, device, repeats)
    return out


def compare(ours: Callable[[], None], reference: Callable[[], None], device: torch.device, repeats: int) -> dict:
    """Medians of `repeats` rounds, each timing one call of either side in turn: a drift of the machine's speed
    (another process, frequency) then weighs on both alike."""
    rounds = [(timed(ours, device, 1, warmup=0 if i else 2), timed(reference, device, 1, warmup=0 if i else 2))
              for i in range(repeats)]  # fmt: skip
    mine, theirs = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
    return {"ours_s": mine, "reference_s": theirs, "ratio": mine / theirs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our training step")
    parser.add_argument("--check", action="store_true", help="exit 1 if a ratio is above its target (TARGETS)")
    args = parser.parse_args()
    reuse_freed_memory()  # for both sides alike (one process): page faults are not what is compared
    device = torch.device(args.device)
    results = {"device": describe(device),
               "batch": args.batch, "bf16": args.bf16, "compile": args.compile, "sizes": {}}  # fmt: skip
    print(f"{'size':<5} {'what':<19} {'ours ms':>9} {'transformers ms':>16} {'ratio':>6}")
    for size in args.sizes:
        results["sizes"][size] = bench_size(size, device, args.batch, args.repeats, args.bf16, args.compile)
        for what, row in results["sizes"][size].items():
            print(
                f"{size:<5} {what:<19} {row['ours_s'] * 1e3:9.1f} {row['reference_s'] * 1e3:16.1f} {row['ratio']:6.2f}"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"vs_transformers_{device.type}.json").write_text(json.dumps(results, indent=2))
    targets = TARGETS[device.type]
    slower = [f"{size} {what}: {row['ratio']:.2f} > {targets[size][what]}" for size, rows in results["sizes"].items()
              for what, row in rows.items() if row["ratio"] > targets[size][what]]  # fmt: skip
    if slower and args.check:
        print("above target: " + "; ".join(slower))
    return 1 if slower and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
