"""Where the floor is at base size on a CPU: how close to transformers' BLIP equal arithmetic lets us get.

    python -m benchmarks.cpu_floor [--batch 4] [--repeats 3]

At base size both sides do the same matrix products, attention and (in training) optimizer arithmetic on the same
weights, and at batch 4 a decoding step's matrix products are compute-bound on this CPU (a [4, 768] x [768, 30,524]
vocabulary head runs at ~67 GFLOP/s, twice as long as the same product for one row, which streams the weights):
what one implementation can save is the rest. On random base weights and BERT's vocabulary (as
`vs_transformers.py`), for greedy generation (5 to 20 tokens) and the caption training step, `torch.profiler` gives
each side's share of time in that shared arithmetic (mm, addmm, bmm, convolution, SDPA or the reference's attention
products, our fused AdamW); floor = our time x our share, the best ratio = floor / the reference's time.
Prints both and writes benchmarks/results/cpu_floor.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.vs_transformers import RESULTS, TOKENIZER, model_config, reference_of, timed
from blip.allocator import reuse_freed_memory
from blip.config.schema import TrainConfig
from blip.data.tokenizer import SpecialTokens, load_tokenizer
from blip.models.caption import PROMPT
from blip.models.factory import build_model
from blip.models.generation import GenerationConfig
from blip.training.optim import build_optimizer

# The arithmetic both sides must do: matrix products, attention (ours SDPA, the reference's bmm + softmax) and
# AdamW's reads and writes of parameters and moments (ours the fused kernel; the reference's per-tensor loop is
# many small kernels, not counted here, so its share reads low).
SHARED = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution_backward",
          "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_softmax_backward_data",
          "aten::_fused_adamw_")  # fmt: skip
CPU = torch.device("cpu")


def shared_share(fn: Callable[[], object]) -> float:
    """The share of one call's self CPU time spent in SHARED kernels."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    return sum(e.self_cpu_time_total for e in events if e.key in SHARED) / sum(e.self_cpu_time_total for e in events)


def floor_of(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> dict:
    mine, reference = timed(ours, CPU, repeats), timed(theirs, CPU, repeats)
    shares = {"ours": shared_share(ours), "theirs": shared_share(theirs)}
    return {"ours_s": mine, "reference_s": reference, "ratio": mine / reference, "shared_share": shares,
            "floor_s": mine * shares["ours"], "best_ratio": mine * shares["ours"] / reference}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reuse_freed_memory()  # for both sides alike (one process): page faults are not what is compared
    cfg, tokenizer = model_config("base"), load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    ours = build_model("caption", cfg, tokenizer).eval()
    theirs = reference_of(ours, "caption", cfg, tokenizer).eval()
    images = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size)
    prompt = tokenizer([PROMPT.strip()] * args.batch, return_tensors="pt").input_ids
    greedy = GenerationConfig(method="greedy", max_length=20, min_length=5)

    results = {"batch": args.batch}
    with torch.no_grad():
        results["generate_greedy"] = floor_of(
            lambda: ours.generate(images, greedy),
            lambda: theirs.generate(pixel_values=images, input_ids=prompt, max_length=20, min_length=5, num_beams=1,
                                    do_sample=False), args.repeats)  # fmt: skip

    tokens = tokenizer([PROMPT + "a large red circle to the left of a small blue square"] * args.batch,
                       return_tensors="pt")  # fmt: skip
    ours.train()
    theirs.train()
    optimizer = build_optimizer(ours, TrainConfig(lr=1e-5), CPU)
    reference_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-5, weight_decay=0.05)
    labels = tokens.input_ids.clone()
    labels[:, 0] = SpecialTokens.of(tokenizer).bos

    def our_step() -> None:
        ours(images, tokens.input_ids, tokens.attention_mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def their_step() -> None:
        out = theirs(pixel_values=images, input_ids=labels, attention_mask=tokens.attention_mask, labels=labels)
        out.loss.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad(set_to_none=True)

    results["caption_train_step"] = floor_of(our_step, their_step, args.repeats)
    for what in ("generate_greedy", "caption_train_step"):
        row = results[what]
        print(f"base {what}, batch {args.batch}: ours {row['ours_s'] * 1e3:.0f} ms, transformers "
              f"{row['reference_s'] * 1e3:.0f} ms (ratio {row['ratio']:.2f}); shared arithmetic "
              f"{row['shared_share']['ours']:.0%} / {row['shared_share']['theirs']:.0%} of each side's time -> "
              f"floor {row['floor_s'] * 1e3:.0f} ms, best ratio {row['best_ratio']:.2f}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_floor.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
