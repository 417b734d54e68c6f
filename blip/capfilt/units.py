"""CapFilt's work as units, one per input shard, and their resumable state in `capfilt.work_dir`.

A finished unit is its output shard, then its stats file as the commit mark (both written atomically), so a killed
run resumes at the first unfinished unit without redoing or losing one. The work dir is kept only while its
fingerprint (settings, threshold, models, input shards) matches; the finished units are assembled into the output
folder, swapped in whole. With `capfilt.out_url` (object storage) each unit's shard is uploaded there before its
commit mark (an object appears whole or not at all) and its local copy dropped, so the work dir stays small; the
output folder then holds the manifest, which lists the uploaded shards with their sizes and versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fsspec.core import url_to_fs

from blip.config import Params
from blip.config.tasks import CapfiltConfig
from blip.data import locations
from blip.files import atomic_write_text, swap_in

SPLIT = "bootstrapped"
ORIGINS = ("web", "synthetic", "human")


@dataclass(frozen=True)
class Unit:
    index: int
    url: str
    human: bool  # human-annotated shards are copied as they are


@dataclass
class UnitStats:
    """What one unit did: pairs seen and kept by origin, every filter score, examples for the gallery and, for
    measuring only, what the synthetic world knows of each pair."""

    unit: int
    source: str
    images: int = 0
    skipped: int = 0
    total: dict[str, int] = field(default_factory=dict)  # origin -> pairs
    kept: dict[str, int] = field(default_factory=dict)
    scores: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {origin: {"itm": [], "itc": []} for origin in ("web", "synthetic")}
    )
    noisy: list[bool] = field(default_factory=list)  # per web pair: the world made its caption wrong
    noise: list[str | None] = field(default_factory=list)  # per web pair: which kind of noise
    synthetic_true: list[bool] = field(default_factory=list)  # per synthetic caption: true of its image
    examples: list[dict] = field(default_factory=list)  # {"key", "pairs": [{origin, caption, itm, itc, kept}]}

    def count(self, origin: str, kept: bool) -> None:
        self.total[origin] = self.total.get(origin, 0) + 1
        self.kept[origin] = self.kept.get(origin, 0) + int(kept)


def plan_units(params: Params) -> list[Unit]:
    cfg, root = params.capfilt, params.data.shard_root
    urls = [(url, False) for split in cfg.source_splits for url in locations.split_urls(root, split)]
    urls += [(url, True) for split in cfg.human_splits for url in locations.split_urls(root, split)]
    return [Unit(index, url, human) for index, (url, human) in enumerate(urls)]


def unit_shard(cfg: CapfiltConfig, unit: Unit) -> Path:
    return cfg.work_dir / "units" / f"shard-{unit.index:06d}.tar"


def unit_stats_path(cfg: CapfiltConfig, unit: Unit) -> Path:
    return cfg.work_dir / "units" / f"unit-{unit.index:06d}.json"


def is_done(cfg: CapfiltConfig, unit: Unit) -> bool:
    return unit_stats_path(cfg, unit).is_file()


def unit_url(cfg: CapfiltConfig, unit: Unit) -> str:
    """Where a finished unit's shard lives: the work dir, or object storage (`out_url`)."""
    shard = unit_shard(cfg, unit)
    return f"{cfg.out_url.rstrip('/')}/{shard.name}" if cfg.out_url else str(shard)


def commit(cfg: CapfiltConfig, stats: UnitStats) -> None:
    """The unit's commit mark, written after its shard (uploaded first, with `out_url`)."""
    unit = Unit(stats.unit, stats.source, False)
    if cfg.out_url:
        shard = unit_shard(cfg, unit)
        fs, path = url_to_fs(unit_url(cfg, unit))
        fs.put_file(str(shard), path)
        shard.unlink()
    atomic_write_text(unit_stats_path(cfg, unit), json.dumps(asdict(stats)))


def read_stats(cfg: CapfiltConfig, units: list[Unit]) -> list[UnitStats]:
    return [UnitStats(**json.loads(unit_stats_path(cfg, unit).read_text())) for unit in units]


def fingerprint(params: Params, threshold: float, units: list[Unit]) -> str:
    """Everything a unit's output depends on: a changed one invalidates the finished units."""
    digest = hashlib.sha256(params.capfilt.model_dump_json().encode())
    digest.update(f"{threshold!r}{params.tokenizer.max_length}".encode())
    digest.update(locations.remote_versions(unit.url for unit in units))
    local = (Path(unit.url) for unit in units if locations.is_local(unit.url))
    for path in (params.capfilt.captioner, params.capfilt.filter, *local):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # a transformers folder
        for file in files:
            digest.update(file.name.encode() + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def prepare_work_dir(cfg: CapfiltConfig, stamp: str) -> None:
    """Keep finished units only if they were made with the same inputs and settings (rank 0 only)."""
    marker = cfg.work_dir / "fingerprint"
    if not marker.is_file() or marker.read_text() != stamp:
        shutil.rmtree(cfg.work_dir, ignore_errors=True)
        if cfg.out_url:  # an earlier run's shards there: none of them may pass for this run's
            fs, path = url_to_fs(cfg.out_url)
            for stale in fs.glob(path.rstrip("/") + "/shard-*.tar"):
                fs.rm_file(stale)
    (cfg.work_dir / "units").mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp)


def assemble(cfg: CapfiltConfig, units: list[Unit], manifest: dict) -> None:
    """The output folder from the finished units' shards (hard links; uploaded ones stay where they are) and
    `manifest`, swapped in whole."""
    staging = cfg.out_dir.parent / f".{cfg.out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / SPLIT).mkdir(parents=True)
    if cfg.out_url:  # the shards stay where they were uploaded; the manifest names them and their versions
        manifest = manifest | {"shards": locations.describe(unit_url(cfg, unit) for unit in units)}
    else:
        for unit in units:
            os.link(unit_shard(cfg, unit), staging / SPLIT / unit_shard(cfg, unit).name)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    swap_in(staging, cfg.out_dir)
