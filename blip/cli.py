"""The `blip` command: `blip <stage> [--params FILE] [--set section.key=value ...]`."""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from blip.allocator import reuse_freed_memory
from blip.config import ConfigError

# command -> "module[:function]" taking argv, returning an exit code; imported lazily, so that
# `blip ingest` never loads torch.
COMMANDS = {
    "ingest": ("blip.stages.ingest", "synthetic world / annotation files -> webdataset shards"),
    "sources": ("blip.stages.sources", "list the shard locations read in place (s3://, patterns) with versions"),
    "vocab": ("blip.stages.vocab", "fit a WordPiece vocabulary to the training text"),
    "pretrain": ("blip.stages.pretrain", "BLIP pretraining (ITC + ITM + LM); torchrun for DDP"),
    "caption-finetune": ("blip.stages.caption", "fine-tune and evaluate the captioner"),
    "retrieval-finetune": ("blip.stages.retrieval", "fine-tune and evaluate image-text retrieval"),
    "retrieval-zeroshot": ("blip.stages.retrieval:zeroshot_main", "retrieval evaluation of the pretrained model"),
    "vqa-finetune": ("blip.stages.vqa", "fine-tune and evaluate VQA (ranking and generation)"),
    "nlvr-finetune": ("blip.stages.nlvr", "fine-tune and evaluate NLVR2"),
    "capfilt": ("blip.stages.capfilt", "CapFilt: caption and filter the web pairs into new shards"),
    "summary": ("blip.stages.summary", "the headline figure of every stage, per pretraining (dvc metrics show)"),
    "capfilt-ablation": ("blip.stages.ablation", "CapFilt ablation (none / filter / captioner / both) over seeds"),
    "promote": ("blip.registry", "register new models; move the champion alias to a better one"),
    "config": ("blip.stages.show_config", "print the validated configuration"),
    "caption": ("blip.commands:caption_main", "caption images with trained or official weights"),
    "itm": ("blip.commands:itm_main", "ITM probability and ITC similarity of texts with an image"),
    "export-hf": ("blip.commands:export_hf_main", "export weights as a transformers BLIP folder"),
    "export-onnx": ("blip.commands:export_onnx_main", "export the captioner or retrieval model as ONNX graphs"),
    "embed": ("blip.commands:embed_main", "ITC embeddings of images or texts to Parquet"),
    "search": ("blip.commands:search_main", "top k of an embeddings file for a text or image query"),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C: a scheduler's timeout or cancellation, or a Kubernetes eviction, then unwinds
    the stage (its MLflow run ends as KILLED, data workers stop) instead of the process vanishing mid-step."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<20} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: blip <command> [options]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    reuse_freed_memory()
    module_name, _, function = COMMANDS[argv[0]][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return entry(argv[1:])
    except ConfigError as exc:
        print(f"blip {argv[0]}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"blip {argv[0]}: stopped ({exc or 'interrupted'})", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
