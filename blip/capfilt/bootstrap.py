"""One CapFilt unit: for every web image the captioner samples synthetic captions (nucleus, top-p 0.9); the filter
scores the web caption and each synthetic one (ITM match probability, or ITC similarity); pairs at or above the
threshold are kept, one caption per output sample, each record marked with its `origin`. Human-annotated units
are copied as they are. Sampling is seeded by (seed, unit), so a resumed run writes the same captions. The
synthetic world's labels are read only to measure (precision, recall, ROC-AUC), never to decide.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import webdataset as wds
from PIL import Image
from transformers import PreTrainedTokenizer

from blip.capfilt.units import Unit, UnitStats, plan_units, unit_shard
from blip.config import ConfigError, Params
from blip.data.language import is_true
from blip.data.loader import split_by_worker
from blip.data.locations import split_urls
from blip.data.scene import Scene
from blip.data.shards import read_shards
from blip.data.transforms import eval_transform
from blip.eval.retrieval import load_pair_split
from blip.files import atomic_path
from blip.models.caption import BlipCaptioner
from blip.models.factory import load_trained
from blip.models.generation import GenerationConfig
from blip.models.retrieval import BlipRetrieval


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


def load_models(params: Params, device: torch.device) -> Models:
    cfg = params.capfilt
    captioner, captioner_tokenizer = load_trained("caption", cfg.captioner, params.model, params.tokenizer.name)
    filter_model, filter_tokenizer = load_trained("retrieval", cfg.filter, params.model, params.tokenizer.name)
    return Models(captioner.to(device).eval(), captioner_tokenizer, filter_model.to(device).eval(), filter_tokenizer)


def keep(scores: torch.Tensor, threshold: float, use_filter: bool) -> torch.Tensor:
    """The paper's rule: keep a pair whose score is at or above the threshold (everything without a filter)."""
    return scores >= threshold if use_filter else torch.ones_like(scores, dtype=torch.bool)


class Bootstrapper:
    """Captions, scores and selects with fixed models and settings. The threshold is the fixed one, or the score
    that keeps `calibration_keep` of the held-out human pairs (`calibration_split`)."""

    def __init__(self, params: Params, models: Models, device: torch.device) -> None:
        cfg = self.cfg = params.capfilt
        self.max_length, self.models, self.device = params.tokenizer.max_length, models, device
        self.generation = GenerationConfig("nucleus", 1, cfg.max_length, cfg.min_length, cfg.top_p,
                                           cfg.repetition_penalty)  # fmt: skip
        self.threshold = cfg.threshold
        if cfg.threshold_rule == "calibrated":
            self.threshold = self.calibrated_threshold(split_urls(params.data.shard_root, cfg.calibration_split))
        elif cfg.threshold_rule == "top_fraction":  # every rank scores the whole pool: the same threshold on each
            self.threshold = self.top_fraction_threshold([unit for unit in plan_units(params) if not unit.human])

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        """The filter's ITM match probability and ITC similarity of each (image, text) row."""
        tokens = self.models.filter_tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length,
                                              return_tensors="pt").to(self.device)  # fmt: skip
        itm, itc = self.models.filter.score_pairs(images, tokens.input_ids, tokens.attention_mask)
        return {"itm": itm.float().cpu(), "itc": itc.float().cpu()}

    def run(self, unit: Unit) -> UnitStats:
        """Write the unit's output shard to the work dir; its stats (the caller commits them)."""
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed * 1_000_003 + unit.index)
        stats = UnitStats(unit.index, unit.url)
        with atomic_path(unit_shard(self.cfg, unit)) as partial, open(partial, "wb") as handle, \
                wds.TarWriter(handle, encoder=False, mtime=0.0) as tar:  # fmt: skip
            for batch in _batches(unit_samples(unit.url, self.models.image_sizes, self.cfg.num_workers),
                                  self.cfg.batch_size):  # fmt: skip
                stats.skipped += sum("corrupt" in s for s in batch)
                batch = [s for s in batch if "corrupt" not in s]
                stats.images += len(batch)
                if unit.human:  # copied as they are (all their captions), marked human by ingest
                    for s in batch:
                        tar.write({"__key__": s["key"], "jpg": s["jpg"], "json": json.dumps(s["record"]).encode()})
                        stats.count("human", True)
                else:
                    self._bootstrap(batch, generator, tar, stats)
        return stats

    def _bootstrap(self, batch: list[dict], generator: torch.Generator, tar: wds.TarWriter, stats: UnitStats) -> None:
        models, cfg = self.models, self.cfg
        captioner_size, filter_size = models.image_sizes
        candidates = [[("web", c) for c in s["record"]["captions"]] for s in batch]
        if cfg.use_captioner:
            images = torch.stack([s["images"][captioner_size] for s in batch]).to(self.device)
            for _ in range(cfg.synthetic_per_image):
                ids = models.captioner.generate(images, self.generation, generator)
                texts = models.captioner_tokenizer.batch_decode(ids, skip_special_tokens=True)
                for row, text in zip(candidates, texts, strict=True):
                    row.append(("synthetic", text))
        rows = [i for i, row in enumerate(candidates) for _ in row]
        images = torch.stack([s["images"][filter_size] for s in batch]).to(self.device)
        scores = self.score(images[rows], [text for row in candidates for _, text in row])
        kept = keep(scores[cfg.score], self.threshold, cfg.use_filter)
        flat = 0
        for s, row in zip(batch, candidates, strict=True):
            world = s["record"].get("world", {})  # measuring only: the noise label never reaches the decision
            example = {"key": s["key"], "pairs": []}
            for j, (origin, text) in enumerate(row):
                pair_scores = {name: values[flat].item() for name, values in scores.items()}
                for name, value in pair_scores.items():
                    stats.scores[origin][name].append(value)
                if origin == "web":
                    stats.noisy.append(bool(world.get("noisy", False)))
                    stats.noise.append(world.get("noise"))
                elif "scene" in world:
                    stats.synthetic_true.append(is_true(text, Scene.from_json(world["scene"])))
                example["pairs"].append({"origin": origin, "caption": text, **pair_scores, "kept": bool(kept[flat])})
                stats.count(origin, bool(kept[flat]))
                if kept[flat]:
                    record = {**s["record"], "captions": [text], "origin": origin, "capfilt": pair_scores}
                    tar.write({"__key__": f"{s['key']}_{origin}{j}", "jpg": s["jpg"],
                               "json": json.dumps(record).encode()})  # fmt: skip
                flat += 1
            if len(stats.examples) < cfg.gallery_images:
                stats.examples.append(example)

    @torch.no_grad()
    def calibrated_threshold(self, urls: list[str]) -> float:
        """The score that keeps `calibration_keep` of the held-out human pairs in these shards."""
        cfg = self.cfg
        split = load_pair_split(urls, self.models.image_sizes[1], 10**9)
        values = []
        for start in range(0, len(split.texts), cfg.batch_size):
            rows = split.text_image[start : start + cfg.batch_size]
            texts = split.texts[start : start + cfg.batch_size]
            values.append(self.score(split.images[rows].to(self.device), texts)[cfg.score])
        return torch.quantile(torch.cat(values).double(), 1 - cfg.calibration_keep).item()

    @torch.no_grad()
    def top_fraction_threshold(self, units: list[Unit]) -> float:
        """The score that `keep_fraction` of the web pairs reach: DataComp's rule keeps a share of the pool, whatever
        the scores' level (a first pass over the units, web captions only)."""
        cfg, size = self.cfg, self.models.image_sizes[1]
        values = []
        for unit in units:
            for batch in _batches(unit_samples(unit.url, (size,), cfg.num_workers), cfg.batch_size):
                pairs = [(s["images"][size], c) for s in batch if "corrupt" not in s for c in s["record"]["captions"]]
                if pairs:
                    images = torch.stack([image for image, _ in pairs]).to(self.device)
                    values.append(self.score(images, [text for _, text in pairs])[cfg.score])
        if not values:
            raise ConfigError(f"capfilt: no web pairs in {', '.join(cfg.source_splits)} to take the top fraction of")
        return torch.quantile(torch.cat(values).double(), 1 - cfg.keep_fraction).item()


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
