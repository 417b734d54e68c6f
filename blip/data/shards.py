"""Webdataset shards: atomic writing (a shard is visible under its final name only once it is complete), and
reading, wherever the shard lives (`blip.data.locations`), that notices a tar cut short and maps img2dataset
samples (an image + a `txt` or `json` caption) to our record on the fly.

Python's `tarfile` in stream mode (what webdataset reads with) ends quietly where a tar is cut: at a missing
end-of-archive block, inside a header, or at garbage. `shard_samples` tells those apart from a real end and
raises `TruncatedShardError` (shard, samples read, reason) after yielding the samples read before the cut.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import webdataset as wds

from blip.config.schema import MAX_WORDS
from blip.data.locations import open_shard
from blip.data.text import pre_caption
from blip.files import atomic_path


class ShardWriter:
    """Writes `<folder>/shard-NNNNNN.tar`, `samples_per_shard` samples each, via `.partial` + `os.replace`."""

    def __init__(self, folder: Path, samples_per_shard: int) -> None:
        self.folder = folder
        self.samples_per_shard = samples_per_shard
        self.shards: dict[str, str] = {}  # shard file name -> sha256 of its bytes
        self.samples = 0
        self._open: ExitStack | None = None  # the shard being written: its atomic path and file
        self._tar: wds.TarWriter | None = None
        self._in_shard = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None:
            self._open = ExitStack()
            partial = self._open.enter_context(atomic_path(self.folder / self._name()))
            # mtime fixed so the same samples always give the same bytes (stable content hash).
            handle = self._open.enter_context(open(partial, "wb"))  # noqa: SIM115 - the ExitStack closes it
            self._tar = wds.TarWriter(handle, encoder=False, mtime=0.0)
        self._tar.write({"__key__": key, **members})
        self.samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def _name(self) -> str:
        return f"shard-{len(self.shards):06d}.tar"

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._open is not None
        final = self.folder / self._name()
        self._tar.close()  # writes the tar end blocks; the file object stays ours to close
        self._open.close()  # closes the file, then names it
        self.shards[final.name] = hashlib.sha256(final.read_bytes()).hexdigest()
        self._tar, self._open, self._in_shard = None, None, 0

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()


class ShardReadError(ValueError):
    """A shard that could not be read to its end: `samples` were read before `reason` stopped it."""

    def __init__(self, shard: str, samples: int, reason: str, hint: str = "") -> None:
        super().__init__(f"{shard}: {reason} after {samples} samples{hint}")
        self.shard, self.samples, self.reason = shard, samples, reason


class TruncatedShardError(ShardReadError):
    def __init__(self, shard: str, samples: int, reason: str) -> None:
        super().__init__(shard, samples, reason, ": the shard is truncated (an interrupted copy?)")


class _EndNotingTarInfo(tarfile.TarInfo):
    """Records on the TarFile why reading stopped: only an all-zero block (EOFHeaderError) is a real end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.blip_end = exc  # type: ignore[attr-defined]
            raise


READ_ERRORS = {  # tarfile's messages, also for the header after an extended (pax / GNU) header
    "unexpected end of data": "ends mid-member",
    "truncated header": "ends mid-header",
    "empty header": "ends mid-header",
    "empty file": "an empty file",
}
END_REASONS = {
    tarfile.EmptyHeaderError: "no end-of-archive blocks",
    tarfile.TruncatedHeaderError: "ends mid-header",
    tarfile.InvalidHeaderError: "an invalid header (corrupt data)",
}


def _members(stream: BinaryIO, url: str, ending: list[str]) -> Iterator[dict]:
    """webdataset's member dicts of every file in the tar; why it ended early, if it did, goes into `ending`."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndNotingTarInfo) as tar:
            for info in tar:
                if info.isreg():
                    yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            end = getattr(tar, "blip_end", None)
            if not isinstance(end, tarfile.EOFHeaderError):
                ending.append(END_REASONS.get(type(end), f"unreadable ({end})"))
    except tarfile.ReadError as exc:
        ending.append(READ_ERRORS.get(str(exc), f"unreadable tar ({exc})"))


def shard_samples(url: str, as_records: bool = True) -> Iterator[dict]:
    """One shard's samples (members grouped by key, as webdataset does), img2dataset samples mapped to our record
    unless `as_records` is false; a tar that ends early raises `TruncatedShardError` once the samples before the
    cut are out, a missing one `ShardReadError`."""
    ending: list[str] = []
    samples = 0
    try:
        opened = open_shard(url)
    except FileNotFoundError as exc:
        raise ShardReadError(url, 0, "not found") from exc
    with opened:
        for sample in wds.tariterators.group_by_keys(_members(opened, url, ending)):
            samples += 1
            yield as_record(sample) if as_records else sample
    if ending:
        raise TruncatedShardError(url, samples, ending[0])


IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
RECORD_KEYS = ("captions", "question", "sentence")  # what our pairs, VQA and NLVR2 records hold


def as_record(sample: dict) -> dict:
    """Our layout (`jpg` + `json` record) of an img2dataset sample (an image member, the caption in `txt` or in
    the `json`'s "caption"), its caption cleaned as ingest cleans captions; our own samples pass unchanged."""
    record = _json(sample)
    if "txt" not in sample and any(key in record for key in RECORD_KEYS):
        return sample
    image = next((name for name in IMAGE_MEMBERS if name in sample), None)
    caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else record.get("caption")
    cleaned = pre_caption(caption, MAX_WORDS) if isinstance(caption, str) else ""
    # No caption left: the decoder skips and counts the sample.
    mapped = {"image_id": sample["__key__"], "origin": "web", "captions": [cleaned] if cleaned else []}
    if isinstance(record.get("url"), str):
        mapped["url"] = record["url"]
    out = {key: sample[key] for key in ("__key__", "__url__") if key in sample} | {"json": json.dumps(mapped).encode()}
    if image is not None:  # without one the decoder skips and counts the sample
        out["jpg"] = sample[image]
    return out


def _json(sample: dict) -> dict:
    try:
        record = json.loads(sample["json"]) if "json" in sample else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def read_shards(src: Iterable[dict], on_error: Callable[[ShardReadError], Iterator[dict]] | None = None
                ) -> Iterator[dict]:  # fmt: skip
    """Pipeline stage, {"url"} -> samples (webdataset's `tarfile_to_samples`, truncation noticed): a shard cut
    short or missing raises, or is passed to `on_error`, whose output joins the stream."""
    for source in src:
        try:
            yield from shard_samples(source["url"])
        except ShardReadError as exc:
            if on_error is None:
                raise
            yield from on_error(exc)


def read_records(urls: list[str]) -> list[dict]:
    """The json record of every sample of these shards, in order, without decoding images."""
    return [json.loads(sample["json"]) for url in urls for sample in shard_samples(url)]
