"""Ingest: every configured source -> checked, cleaned samples -> webdataset shards per split + a manifest.

The whole output is built in a staging folder beside `out_dir` and swapped in at the end, so a killed or
failed ingest leaves the previous output untouched; inside, each shard appears only when complete.
Bad entries (unreadable, truncated or empty images, empty captions, missing files) are skipped and counted
with their reason in the manifest; a source shard cut short is listed there too (`skipped.shards`: shard, samples
read before the cut, reason), its earlier samples kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from blip.config import Params
from blip.config.schema import SyntheticSource, VqaSource
from blip.data import language, synthetic
from blip.data.items import ImageSource, Item
from blip.data.scene import encode_jpeg
from blip.data.shards import ShardWriter
from blip.data.sources import Skip, iter_source
from blip.data.text import pre_caption, pre_question
from blip.files import swap_in

MANIFEST = "manifest.json"
SKIP_EXAMPLES = 200  # skipped entries listed one by one in the manifest (all are counted)


class SkipItem(Exception):
    """This entry cannot be used; the message is the reason recorded in the manifest."""


def _decode(data: bytes) -> Image.Image:
    if not data:
        raise SkipItem("zero-size file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decoding happens here: truncation shows up now, not at training time
    except UnidentifiedImageError as exc:
        raise SkipItem("unreadable image") from exc
    except Image.DecompressionBombError as exc:
        raise SkipItem("unreadable image: too many pixels") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise SkipItem("truncated image" if "truncat" in str(exc).lower() else "unreadable image") from exc
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):  # transparent pixels become white, not whatever colour they hide
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def prepare_image(source: ImageSource, quality: int) -> bytes:
    """JPEG bytes of an RGB image; an RGB JPEG with no rotation tag is kept byte for byte."""
    if isinstance(source, Image.Image):
        return encode_jpeg(source, quality)
    if isinstance(source, Path):
        if not source.is_file():
            raise SkipItem("missing file")
        source = source.read_bytes()
    image = _decode(source)
    if image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(0x0112, 1) == 1:
        return source
    return encode_jpeg(_to_rgb(image), quality)


def clean_record(item: Item, max_words: int) -> dict:
    record = dict(item.record)
    if item.kind == "pairs":
        captions = [pre_caption(c, max_words) for c in record["captions"] if isinstance(c, str)]
        record["captions"] = [c for c in captions if c]
        if not record["captions"]:
            raise SkipItem("empty caption")
    elif item.kind == "vqa":
        record["question"] = pre_question(str(record["question"]), max_words)
        if not record["question"]:
            raise SkipItem("empty question")
    else:
        record["sentence"] = pre_caption(str(record["sentence"]), max_words)
        if not record["sentence"]:
            raise SkipItem("empty caption")
    return record


def _answer_lists(params: Params) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    for source in params.ingest.sources:
        if isinstance(source, SyntheticSource):
            lists.update(vqa_train=language.answer_list(), vqa_test=language.answer_list())
        elif isinstance(source, VqaSource) and source.answer_list is not None:
            lists[source.split] = json.loads(source.answer_list.read_text())
    return lists


def _total(params: Params) -> int | None:
    sources = params.ingest.sources
    if all(isinstance(s, SyntheticSource) for s in sources):
        return synthetic.item_count(params.world)
    return None


def ingest(params: Params, show_progress: bool = True) -> dict:
    out_dir = params.ingest.out_dir
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run; never the live output
    staging.mkdir(parents=True)

    try:
        manifest = _write_all(params, staging, show_progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the previous output stays as it was
        raise
    swap_in(staging, out_dir)
    return manifest


def _write_all(params: Params, staging: Path, show_progress: bool) -> dict:
    cfg = params.ingest
    writers: dict[str, ShardWriter] = {}
    kinds: dict[str, str] = {}
    skipped: Counter[str] = Counter()
    examples: list[dict] = []
    truncated: list[dict] = []
    bar = tqdm(total=_total(params), desc="ingest", unit="item", disable=not show_progress, mininterval=1.0)
    for source in cfg.sources:
        for entry in iter_source(source, params.world):
            bar.update(1)
            try:
                if isinstance(entry, Skip):
                    raise SkipItem(entry.reason)
                record = clean_record(entry, cfg.max_words)
                members = {ext: prepare_image(img, cfg.jpeg_quality) for ext, img in entry.images.items()}
            except SkipItem as exc:
                reason = str(exc)
                skipped[reason] += 1
                if isinstance(entry, Skip) and entry.samples is not None:
                    truncated.append({"split": entry.split, "shard": entry.ref, "samples": entry.samples,
                                      "reason": reason})  # fmt: skip
                if len(examples) < SKIP_EXAMPLES:
                    examples.append({"split": entry.split, "ref": entry.ref, "reason": reason})
                continue
            writer = writers.get(entry.split)
            if writer is None:
                writer = writers[entry.split] = ShardWriter(staging / entry.split, cfg.samples_per_shard)
                kinds[entry.split] = entry.kind
            members["json"] = json.dumps(record, sort_keys=True).encode()
            # Keys are our own sequence numbers: a source's names never become paths or member names.
            writer.write(f"{writer.samples:09d}", members)
    bar.close()

    splits = {}
    for split, writer in sorted(writers.items()):
        writer.close()
        splits[split] = {
            "kind": kinds[split],
            "samples": writer.samples,
            "shards": [f"{split}/{name}" for name in writer.shards],
        }
    digest = hashlib.sha256()
    for split, writer in sorted(writers.items()):
        for name, shard_hash in writer.shards.items():
            digest.update(f"{split}/{name}:{shard_hash}\n".encode())
    for split, answers in sorted(_answer_lists(params).items()):
        if split in splits:
            text = json.dumps(answers, indent=1)
            (staging / split / "answer_list.json").write_text(text)
            splits[split]["answer_list"] = f"{split}/answer_list.json"
            digest.update(f"{split}/answer_list.json:{hashlib.sha256(text.encode()).hexdigest()}\n".encode())
    manifest = {
        "splits": splits,
        "skipped": {
            "total": sum(skipped.values()),
            "by_reason": dict(sorted(skipped.items())),
            "examples": examples,
            "shards": truncated,
        },
        "content_hash": f"sha256:{digest.hexdigest()}",
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
