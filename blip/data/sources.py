"""Ingest sources: each turns one annotation format into `Item`s (or `Skip`s for entries that cannot be used).

Images are not opened here; `blip.data.ingest` reads and checks them, so every source gets the same checks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blip.config import ConfigError
from blip.config.schema import (
    CocoKarpathySource,
    FolderSource,
    Nlvr2Source,
    Source,
    SyntheticSource,
    VqaSource,
    WebdatasetSource,
    WorldConfig,
)
from blip.data import synthetic
from blip.data.items import Item
from blip.data.shards import ShardReadError, TruncatedShardError, shard_samples

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class Skip:
    split: str
    ref: str
    reason: str
    samples: int | None = None  # a truncated shard: the samples read before the cut


class SourceError(ConfigError):
    """A source that cannot be read at all (not one bad entry): the ingest stops and names the file."""


def _load_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: cannot read annotation JSON: {exc}") from exc
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of annotation entries, got {type(data).__name__}")
    return data


def _image_path(root: Path, relative: object) -> Path | str:
    """The image's path inside `root`, or the reason it cannot be used."""
    if not isinstance(relative, str) or not relative:
        return "malformed annotation: no image path"
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        return "image path outside image_root"
    return path


def _entries(path: Path, split: str) -> Iterator[tuple[str, dict] | Skip]:
    for index, entry in enumerate(_load_json_list(path)):
        ref = f"{path}#{index}"
        if isinstance(entry, dict):
            yield ref, entry
        else:
            yield Skip(split, ref, "malformed annotation: not an object")


def coco_karpathy(source: CocoKarpathySource) -> Iterator[Item | Skip]:
    # Karpathy train files list one caption per entry; val/test list all captions of an image in one entry.
    grouped: dict[Path, tuple[str, str, list[str]]] = {}
    for found in _entries(source.annotations, source.split):
        if isinstance(found, Skip):
            yield found
            continue
        ref, entry = found
        path = _image_path(source.image_root, entry.get("image"))
        if isinstance(path, str):
            yield Skip(source.split, ref, path)
            continue
        captions = entry.get("caption", [])
        captions = [captions] if isinstance(captions, str) else [c for c in captions if isinstance(c, str)]
        image_id = str(entry.get("image_id", Path(entry["image"]).stem))
        grouped.setdefault(path, (ref, image_id, []))[2].extend(captions)
    for path, (ref, image_id, captions) in grouped.items():
        record = {"image_id": image_id, "captions": captions, "origin": source.origin}
        yield Item(source.split, "pairs", ref, {"jpg": path}, record)


def vqa(source: VqaSource) -> Iterator[Item | Skip]:
    for found in _entries(source.annotations, source.split):
        if isinstance(found, Skip):
            yield found
            continue
        ref, entry = found
        path = _image_path(source.image_root, entry.get("image"))
        if isinstance(path, str):
            yield Skip(source.split, ref, path)
            continue
        answers = entry.get("answer", [])
        record = {
            "image_id": str(entry.get("image_id", Path(entry["image"]).stem)),
            "question_id": entry.get("question_id", ref),
            "question": entry.get("question", ""),
            "answers": [answers] if isinstance(answers, str) else [str(a) for a in answers],
        }
        yield Item(source.split, "vqa", ref, {"jpg": path}, record)


def nlvr2(source: Nlvr2Source) -> Iterator[Item | Skip]:
    for found in _entries(source.annotations, source.split):
        if isinstance(found, Skip):
            yield found
            continue
        ref, entry = found
        images = entry.get("images")
        label = entry.get("label")
        if not isinstance(images, list) or len(images) != 2:
            yield Skip(source.split, ref, "malformed annotation: needs exactly two images")
            continue
        if str(label).lower() not in ("true", "false", "1", "0"):
            yield Skip(source.split, ref, f"malformed annotation: label {label!r} is not true/false")
            continue
        paths = [_image_path(source.image_root, image) for image in images]
        if bad := next((p for p in paths if isinstance(p, str)), None):
            yield Skip(source.split, ref, bad)
            continue
        record = {"pair_id": ref, "sentence": entry.get("sentence", ""), "label": str(label).lower() in ("true", "1")}
        yield Item(source.split, "nlvr", ref, {"left.jpg": paths[0], "right.jpg": paths[1]}, record)


def folder(source: FolderSource) -> Iterator[Item | Skip]:
    images = sorted(p for p in source.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for path in images:
        ref = str(path)
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            yield Skip(source.split, ref, "missing caption file")
            continue
        captions = sidecar.read_text(errors="replace").splitlines()
        record = {"image_id": str(path.relative_to(source.root)), "captions": captions, "origin": source.origin}
        yield Item(source.split, "pairs", ref, {"jpg": path}, record)


def webdataset_shards(source: WebdatasetSource) -> Iterator[Item | Skip]:
    for shard in source.shards:
        try:
            for sample in shard_samples(str(shard), as_records=False):
                ref = f"{shard}#{sample['__key__']}"
                image_key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
                if image_key is None:
                    yield Skip(source.split, ref, "missing file: no image member")
                    continue
                record = {"image_id": sample["__key__"], "captions": _shard_captions(sample), "origin": source.origin}
                yield Item(source.split, "pairs", ref, {"jpg": sample[image_key]}, record)
        except TruncatedShardError as exc:  # what was read before the cut is kept; the cut is recorded
            yield Skip(source.split, str(shard), f"truncated shard: {exc.reason}", samples=exc.samples)
        except (OSError, ShardReadError) as exc:
            yield Skip(source.split, str(shard), f"unreadable shard: {type(exc).__name__}: {exc}")


def _shard_captions(sample: dict) -> list[str]:
    if "txt" in sample:
        return [sample["txt"].decode("utf-8", errors="replace")]
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption", "")
        except (json.JSONDecodeError, AttributeError):
            return []
        return [caption] if isinstance(caption, str) else []
    return []


def iter_source(source: Source, world: WorldConfig) -> Iterator[Item | Skip]:
    if isinstance(source, SyntheticSource):
        return synthetic.generate(world)
    readers = {
        CocoKarpathySource: coco_karpathy,
        VqaSource: vqa,
        Nlvr2Source: nlvr2,
        FolderSource: folder,
        WebdatasetSource: webdataset_shards,
    }
    return readers[type(source)](source)
