"""Ingest: every configured source -> checked, cleaned samples -> webdataset shards per split + a manifest.

The whole output is built in a staging folder beside `out_dir` and swapped in at the end, so a killed or
failed ingest leaves the previous output untouched; inside, each shard appears only when complete. With
`ingest.workers` > 1, worker processes check, clean and re-encode the entries (the costly part) while the sources
are read on; results are taken in source order, so the shards are byte for byte those of one worker.
Bad entries (unreadable, truncated or empty images, empty captions, missing files) are skipped and counted
with their reason in the manifest; a source shard cut short is listed there too (`skipped.shards`: shard, samples
read before the cut, reason), its earlier samples kept.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from blip.config import Params
from blip.config.schema import SyntheticSource, VqaSource, WebdatasetSource, WorldConfig
from blip.data import language, synthetic
from blip.data.items import ImageSource, Item
from blip.data.scene import encode_jpeg
from blip.data.shards import ShardWriter
from blip.data.sources import Skip, iter_source
from blip.data.text import pre_caption, pre_question
from blip.files import swap_in

MANIFEST = "manifest.json"
SKIP_EXAMPLES = 200  # skipped entries listed one by one in the manifest (all are counted)
BATCH = 64  # entries of a non-shard source per task


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


@dataclass
class Prepared:
    """One source entry, checked and cleaned: its record and image members, or why it is skipped."""

    split: str
    kind: str
    ref: str
    record: dict | None = None
    members: dict[str, bytes] | None = None
    skipped: str | None = None
    samples: int | None = None  # a cut source shard: samples read before the cut


def prepare(entry: Item | Skip, max_words: int, quality: int) -> Prepared:
    try:
        if isinstance(entry, Skip):
            raise SkipItem(entry.reason)
        record = clean_record(entry, max_words)
        members = {ext: prepare_image(img, quality) for ext, img in entry.images.items()}
    except SkipItem as exc:
        samples = entry.samples if isinstance(entry, Skip) else None
        return Prepared(entry.split, getattr(entry, "kind", ""), entry.ref, skipped=str(exc), samples=samples)
    return Prepared(entry.split, entry.kind, entry.ref, record, members)


Task = list[Item | Skip] | WebdatasetSource  # entries, or one source shard that the worker itself reads


def tasks(params: Params) -> Iterator[Task]:
    """The work in source order: a webdataset source shard by shard (its bytes are read where they are prepared,
    so they cross between processes once), every other source in batches of its entries."""
    for source in params.ingest.sources:
        if isinstance(source, WebdatasetSource):
            yield from (source.model_copy(update={"shards": [shard]}) for shard in source.shards)
            continue
        entries = iter_source(source, params.world)
        while batch := list(itertools.islice(entries, BATCH)):
            yield batch


def prepare_task(task: Task, max_words: int, quality: int, world: WorldConfig) -> list[Prepared]:
    entries = iter_source(task, world) if isinstance(task, WebdatasetSource) else task
    return [prepare(entry, max_words, quality) for entry in entries]


def prepared_entries(params: Params, bar: tqdm) -> Iterator[Prepared]:
    """Every source entry prepared, in source order: here, or by `ingest.workers` processes."""
    cfg = params.ingest
    work = partial(prepare_task, max_words=cfg.max_words, quality=cfg.jpeg_quality, world=params.world)
    done_tasks = map(work, tasks(params)) if cfg.workers == 1 else in_workers(work, tasks(params), cfg.workers)
    for done in done_tasks:
        bar.update(len(done))
        yield from done


def in_workers(work: Callable[[Task], list[Prepared]], todo: Iterator[Task], workers: int) -> Iterator[list[Prepared]]:
    """`map(work, todo)` in worker processes, results in order, while `todo` is read on: at most two tasks per
    worker in flight, so memory stays bounded whatever the sources' size."""
    in_flight = threading.Semaphore(2 * workers)

    def fed() -> Iterator[Task]:  # runs in the pool's feeder thread: waits while enough work is in flight
        for task in todo:
            in_flight.acquire()
            yield task

    with get_context("spawn").Pool(workers) as pool:  # fresh processes: no locks or threads inherited
        for done in pool.imap(work, fed()):
            in_flight.release()
            yield done


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
    for entry in prepared_entries(params, bar):
        if entry.skipped is not None or entry.record is None or entry.members is None:
            skipped[entry.skipped] += 1
            if entry.samples is not None:
                truncated.append({"split": entry.split, "shard": entry.ref, "samples": entry.samples,
                                  "reason": entry.skipped})  # fmt: skip
            if len(examples) < SKIP_EXAMPLES:
                examples.append({"split": entry.split, "ref": entry.ref, "reason": entry.skipped})
            continue
        writer = writers.get(entry.split)
        if writer is None:
            writer = writers[entry.split] = ShardWriter(staging / entry.split, cfg.samples_per_shard)
            kinds[entry.split] = entry.kind
        # Keys are our own sequence numbers: a source's names never become paths or member names.
        record = json.dumps(entry.record, sort_keys=True).encode()
        writer.write(f"{writer.samples:09d}", entry.members | {"json": record})
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
