"""Webdataset shards: atomic writing (a shard is visible under its final name only once it is complete), and
reading that notices a tar cut short.

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

from blip.files import atomic_path, not_found


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


class TruncatedShardError(ValueError):
    def __init__(self, shard: str, samples: int, reason: str) -> None:
        super().__init__(f"{shard}: {reason} after {samples} samples: the shard is truncated (an interrupted copy?)")
        self.shard, self.samples, self.reason = shard, samples, reason


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


def shard_samples(url: str) -> Iterator[dict]:
    """One shard's samples (members grouped by key, as webdataset does); a tar that ends early raises
    `TruncatedShardError` once the samples before the cut are out."""
    ending: list[str] = []
    samples = 0
    with wds.gopen(url) as opened:  # local paths, and the URLs and pipe: commands webdataset opens
        for sample in wds.tariterators.group_by_keys(_members(opened, url, ending)):
            samples += 1
            yield sample
    if ending:
        raise TruncatedShardError(url, samples, ending[0])


def read_shards(src: Iterable[dict], on_truncated: Callable[[TruncatedShardError], Iterator[dict]] | None = None
                ) -> Iterator[dict]:  # fmt: skip
    """Pipeline stage, {"url"} -> samples (webdataset's `tarfile_to_samples`, truncation noticed): a truncated
    shard raises, or is passed to `on_truncated`, whose output joins the stream."""
    for source in src:
        try:
            yield from shard_samples(source["url"])
        except TruncatedShardError as exc:
            if on_truncated is None:
                raise
            yield from on_truncated(exc)


def shard_urls(folder: Path) -> list[str]:
    """The complete shards of one split, in order (a `.partial` file is never listed)."""
    if not folder.is_dir():
        raise FileNotFoundError(not_found(folder, "shard folder") + ": run `blip ingest` first?")
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    if not urls:
        raise FileNotFoundError(f"no shards in {folder}: run `blip ingest` first")
    return urls


def read_records(folder: Path) -> list[dict]:
    """The json member (annotation record) of every sample of a split, in order, without decoding images."""
    return [json.loads(sample["json"]) for url in shard_urls(folder) for sample in shard_samples(url)]
