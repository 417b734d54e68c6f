"""`blip vocab`: fit a WordPiece vocabulary to the training splits' text (used when tokenizer.name points at it)."""

from __future__ import annotations

from collections.abc import Sequence

from blip.data.locations import split_urls
from blip.data.tokenizer import load_tokenizer
from blip.data.vocab import train_vocab
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.tracking import stage_run


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("vocab", __doc__ or ""), argv)
    cfg = params.vocab
    description = f"WordPiece vocabulary of {cfg.size} tokens fitted to {', '.join(cfg.splits)}"
    with stage_run("vocab", params, ("vocab",), description) as run:
        urls = [url for split in cfg.splits for url in split_urls(params.data.shard_root, split)]
        path = train_vocab(urls, cfg.size, cfg.out, cfg.extra_texts)
        size = len(load_tokenizer(str(path)))
        metrics = {"vocab_size": size}
        run.log_metrics(metrics)
        run.log_artifact(path)
        run.log_artifact(write_metrics("vocab", metrics), "metrics.json")
    print(f"vocab: {size} tokens ([DEC] and [ENC] included) in {path}")
    return 0
