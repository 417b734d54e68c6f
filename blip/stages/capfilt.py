"""`blip capfilt`: CapFilt, BLIP's dataset bootstrapping.

For every web image the captioner samples synthetic captions (nucleus, top-p 0.9); the filter scores the web
caption and each synthetic one (ITM match probability, or ITC similarity); pairs at or above the threshold are
kept. The output (`capfilt.out_dir/bootstrapped`) holds the human-annotated pairs as they were, the kept web
pairs and the kept synthetic pairs, one caption per sample, each record marked with its `origin`; beside it
`manifest.json` (counts, score histograms, the threshold). reports/capfilt/ holds the score histogram and a
gallery of examples (image, web and synthetic captions, scores, kept or not).

Work is split into units, one per input shard. A finished unit (its shard, then its stats file as the commit
mark) lives in `capfilt.work_dir`, outside the DVC output, so a killed run resumes at the first unfinished unit
without redoing or losing one. Under torchrun the units are dealt out to ranks; within a unit, data-loader
workers decode the images. Each unit's sampling is seeded by (seed, unit), so a resumed run writes the same
captions. The synthetic world's noise labels are read only to measure the filter (precision, recall, ROC-AUC).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from tqdm import tqdm
from transformers import PreTrainedTokenizer

from blip.config import Params
from blip.config.tasks import CapfiltConfig
from blip.data.ingest import swap_in
from blip.data.language import is_true
from blip.data.loader import split_by_worker
from blip.data.scene import Scene
from blip.data.shards import read_shards, shard_urls
from blip.data.transforms import eval_transform
from blip.eval.capfilt_report import capfilt_gallery, capfilt_metrics, score_histogram
from blip.eval.retrieval import load_pair_split
from blip.models.caption import BlipCaptioner
from blip.models.factory import load_trained
from blip.models.generation import GenerationConfig
from blip.models.retrieval import BlipRetrieval
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.tracking import stage_run
from blip.training.distributed import DistContext, setup, teardown

SPLIT = "bootstrapped"


@dataclass(frozen=True)
class Unit:
    index: int
    url: str
    human: bool  # human-annotated shards are copied as they are


def plan_units(params: Params) -> list[Unit]:
    cfg, root = params.capfilt, params.data.shard_root
    urls = [(url, False) for split in cfg.source_splits for url in shard_urls(root / split)]
    urls += [(url, True) for split in cfg.human_splits for url in shard_urls(root / split)]
    return [Unit(index, url, human) for index, (url, human) in enumerate(urls)]


def keep(scores: torch.Tensor, threshold: float, use_filter: bool) -> torch.Tensor:
    """The paper's rule: keep a pair whose score is at or above the threshold (everything without a filter)."""
    return scores >= threshold if use_filter else torch.ones_like(scores, dtype=torch.bool)


def score(filter_model: torch.nn.Module, cfg: CapfiltConfig, images: torch.Tensor, texts: list[str],
          tokenizer: PreTrainedTokenizer, max_length: int) -> dict[str, torch.Tensor]:  # fmt: skip
    tokens = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    device = images.device
    itm, itc = filter_model.score_pairs(images, tokens.input_ids.to(device), tokens.attention_mask.to(device))
    return {"itm": itm.float().cpu(), "itc": itc.float().cpu()}


@dataclass
class Models:
    """The captioner and the filter, each with its own tokenizer and image size (imported folders may differ)."""

    captioner: BlipCaptioner
    captioner_tokenizer: PreTrainedTokenizer
    filter: BlipRetrieval
    filter_tokenizer: PreTrainedTokenizer

    @property
    def image_sizes(self) -> tuple[int, int]:
        return self.captioner.model_config.image_size, self.filter.model_config.image_size


def _decoded(src: Iterator[dict], image_sizes: tuple[int, ...]) -> Iterator[dict]:
    transforms = {size: eval_transform(size) for size in image_sizes}
    for sample in src:
        try:
            image = Image.open(io.BytesIO(sample["jpg"]))
            image.load()
            image = image.convert("RGB")
            yield {"key": sample["__key__"], "jpg": sample["jpg"], "record": json.loads(sample["json"]),
                   "images": {size: transform(image) for size, transform in transforms.items()}}  # fmt: skip
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            yield {"key": sample.get("__key__"), "corrupt": True}


def unit_samples(url: str, image_sizes: tuple[int, ...], workers: int) -> Iterator[dict]:
    """One unit's samples, decoded by `workers` data-loader workers (each takes every workers-th sample)."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([url]), read_shards, split_by_worker,
                                lambda src: _decoded(src, image_sizes))  # fmt: skip
    return iter(wds.WebLoader(pipeline, batch_size=None, num_workers=workers))


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def bootstrap_unit(unit: Unit, models: Models, params: Params, threshold: float, device: torch.device) -> dict:
    """Write the unit's output shard to the work dir, return its stats (the caller commits them)."""
    cfg = params.capfilt
    generation = GenerationConfig("nucleus", 1, cfg.max_length, cfg.min_length, cfg.top_p, cfg.repetition_penalty)
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + unit.index)
    stats: dict = {"unit": unit.index, "source": unit.url, "images": 0, "skipped": 0, "kept": {}, "total": {},
                   "scores": {"web": {"itm": [], "itc": []}, "synthetic": {"itm": [], "itc": []}},
                   "noisy": [], "noise": [], "synthetic_true": [], "examples": []}  # fmt: skip
    shard = unit_shard(cfg, unit)
    partial = shard.with_name(shard.name + ".partial")
    with open(partial, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=0.0) as tar:
        samples = unit_samples(unit.url, models.image_sizes, cfg.num_workers)
        for batch in _batches(samples, cfg.batch_size):
            stats["skipped"] += sum("corrupt" in s for s in batch)
            batch = [s for s in batch if "corrupt" not in s]
            stats["images"] += len(batch)
            if unit.human:  # copied as they are (all their captions), marked human by ingest
                for s in batch:
                    tar.write({"__key__": s["key"], "jpg": s["jpg"], "json": json.dumps(s["record"]).encode()})
                    _count(stats, "human", True)
                continue
            _bootstrap_batch(batch, models, cfg, generation, generator, threshold, tar, stats, params, device)
    os.replace(partial, shard)
    return stats


def _bootstrap_batch(batch: list[dict], models: Models, cfg: CapfiltConfig, generation: GenerationConfig,
                     generator: torch.Generator, threshold: float, tar: wds.TarWriter, stats: dict, params: Params,
                     device: torch.device) -> None:  # fmt: skip
    captioner_size, filter_size = models.image_sizes
    images = torch.stack([s["images"][captioner_size] for s in batch]).to(device)
    candidates = [[("web", c) for c in s["record"]["captions"]] for s in batch]
    if cfg.use_captioner:
        for _ in range(cfg.synthetic_per_image):
            ids = models.captioner.generate(images, generation, generator)
            texts = models.captioner_tokenizer.batch_decode(ids, skip_special_tokens=True)
            for row, text in zip(candidates, texts, strict=True):
                row.append(("synthetic", text))
    rows = [i for i, row in enumerate(candidates) for _ in row]
    texts = [text for row in candidates for _, text in row]
    images = torch.stack([s["images"][filter_size] for s in batch]).to(device)
    scores = score(models.filter, cfg, images[rows], texts, models.filter_tokenizer, params.tokenizer.max_length)
    kept = keep(scores[cfg.score], threshold, cfg.use_filter)
    flat = 0
    for s, row in zip(batch, candidates, strict=True):
        world = s["record"].get("world", {})  # measuring only: the noise label never reaches the decision
        example = {"key": s["key"], "pairs": []}
        for j, (origin, text) in enumerate(row):
            pair_scores = {name: values[flat].item() for name, values in scores.items()}
            for name, value in pair_scores.items():
                stats["scores"][origin][name].append(value)
            if origin == "web":
                stats["noisy"].append(bool(world.get("noisy", False)))
                stats["noise"].append(world.get("noise"))
            elif "scene" in world:
                stats["synthetic_true"].append(is_true(text, Scene.from_json(world["scene"])))
            example["pairs"].append({"origin": origin, "caption": text, **pair_scores, "kept": bool(kept[flat])})
            _count(stats, origin, bool(kept[flat]))
            if kept[flat]:
                record = {**s["record"], "captions": [text], "origin": origin, "capfilt": pair_scores}
                tar.write({"__key__": f"{s['key']}_{origin}{j}", "jpg": s["jpg"], "json": json.dumps(record).encode()})
            flat += 1
        if len(stats["examples"]) < cfg.gallery_images:
            stats["examples"].append(example)


def _count(stats: dict, origin: str, kept: bool) -> None:
    stats["total"][origin] = stats["total"].get(origin, 0) + 1
    stats["kept"][origin] = stats["kept"].get(origin, 0) + int(kept)


def unit_shard(cfg: CapfiltConfig, unit: Unit) -> Path:
    return cfg.work_dir / "units" / f"shard-{unit.index:06d}.tar"


def unit_stats(cfg: CapfiltConfig, unit: Unit) -> Path:
    return cfg.work_dir / "units" / f"unit-{unit.index:06d}.json"


def fingerprint(params: Params, threshold: float) -> str:
    """Everything a unit's output depends on: a changed one invalidates the finished units."""
    digest = hashlib.sha256(params.capfilt.model_dump_json().encode())
    digest.update(f"{threshold!r}{params.tokenizer.max_length}".encode())
    for path in (params.capfilt.captioner, params.capfilt.filter, *map(Path, _all_sources(params))):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # a transformers folder
        for file in files:
            digest.update(file.name.encode() + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _all_sources(params: Params) -> list[str]:
    return [unit.url for unit in plan_units(params)]


def load_models(params: Params, device: torch.device) -> Models:
    cfg = params.capfilt
    captioner, captioner_tokenizer = load_trained("caption", cfg.captioner, params.model, params.tokenizer.name)
    filter_model, filter_tokenizer = load_trained("retrieval", cfg.filter, params.model, params.tokenizer.name)
    return Models(captioner.to(device).eval(), captioner_tokenizer, filter_model.to(device).eval(), filter_tokenizer)


@torch.no_grad()
def decide_threshold(params: Params, models: Models, device: torch.device) -> float:
    """The fixed threshold, or the score that keeps `calibration_keep` of the held-out human pairs."""
    cfg = params.capfilt
    if cfg.threshold_rule == "fixed":
        return cfg.threshold
    split = load_pair_split(params.data.shard_root / cfg.calibration_split, models.image_sizes[1], 10**9)
    values = []
    for start in range(0, len(split.texts), cfg.batch_size):
        rows = split.text_image[start : start + cfg.batch_size]
        values.append(score(models.filter, cfg, split.images[rows].to(device),
                            split.texts[start : start + cfg.batch_size], models.filter_tokenizer,
                            params.tokenizer.max_length)[cfg.score])  # fmt: skip
    return torch.quantile(torch.cat(values).double(), 1 - cfg.calibration_keep).item()


def prepare_work_dir(cfg: CapfiltConfig, stamp: str, ctx: DistContext) -> None:
    """Keep finished units only if they were made with the same inputs and settings."""
    marker = cfg.work_dir / "fingerprint"
    if ctx.is_main:
        if not marker.is_file() or marker.read_text() != stamp:
            shutil.rmtree(cfg.work_dir, ignore_errors=True)
        (cfg.work_dir / "units").mkdir(parents=True, exist_ok=True)
        marker.write_text(stamp)
    if ctx.distributed:
        dist.barrier()


def _commit(path: Path, stats: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(stats))
    os.replace(partial, path)


def assemble(params: Params, units: list[Unit], threshold: float) -> dict[str, float]:
    """Rank 0, once every unit is done: the output folder (swapped in whole), manifest, reports, metrics."""
    cfg = params.capfilt
    stats = [json.loads(unit_stats(cfg, unit).read_text()) for unit in units]
    staging = cfg.out_dir.parent / f".{cfg.out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / SPLIT).mkdir(parents=True)
    for unit in units:
        os.link(unit_shard(cfg, unit), staging / SPLIT / unit_shard(cfg, unit).name)
    metrics = capfilt_metrics(stats, threshold, cfg)
    manifest = {"split": SPLIT, "threshold": threshold, "rule": cfg.threshold_rule, "score": cfg.score,
                "units": len(units), "metrics": metrics, "histograms": score_histogram(stats, None)}  # fmt: skip
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    swap_in(staging, cfg.out_dir)
    reports = Path("reports/capfilt")
    plots = [score_histogram(stats, reports / "scores.png"), capfilt_gallery(stats, reports / "gallery.png")]
    with stage_run("capfilt", params) as run:
        run.log_metrics(metrics)
        for artifact in (write_metrics("capfilt", metrics), cfg.out_dir / "manifest.json", *plots):
            run.log_artifact(artifact)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("capfilt", __doc__ or ""), argv)
    cfg = params.capfilt
    ctx = setup()
    try:
        models = load_models(params, ctx.device)
        threshold = decide_threshold(params, models, ctx.device)
        prepare_work_dir(cfg, fingerprint(params, threshold), ctx)
        units = plan_units(params)
        todo = [unit for unit in units[ctx.rank :: ctx.world_size] if not unit_stats(cfg, unit).is_file()]
        if ctx.is_main and len(todo) < len(units[:: ctx.world_size]):
            print(f"capfilt: resuming, {len(units) - len(todo) * ctx.world_size} units already done")
        for unit in tqdm(todo, desc=f"capfilt units (rank {ctx.rank})", position=ctx.rank):
            _commit(unit_stats(cfg, unit), bootstrap_unit(unit, models, params, threshold, ctx.device))
        if ctx.distributed:
            dist.barrier()
        if ctx.is_main:
            metrics = assemble(params, units, threshold)
            print("capfilt: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    finally:
        teardown()
    return 0
