"""Atomic webdataset shard writing: a shard is visible under its final name only once it is complete."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

import webdataset as wds


class ShardWriter:
    """Writes `<folder>/shard-NNNNNN.tar`, `samples_per_shard` samples each, via `.partial` + `os.replace`."""

    def __init__(self, folder: Path, samples_per_shard: int) -> None:
        self.folder = folder
        self.samples_per_shard = samples_per_shard
        self.shards: dict[str, str] = {}  # shard file name -> sha256 of its bytes
        self.samples = 0
        self._file: BinaryIO | None = None
        self._tar: wds.TarWriter | None = None
        self._in_shard = 0
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._tar is None:
            self._file = open(self._partial_path(), "wb")  # noqa: SIM115 - closed in _finish_shard
            # mtime fixed so the same samples always give the same bytes (stable content hash).
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self._tar.write({"__key__": key, **members})
        self.samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def _name(self) -> str:
        return f"shard-{len(self.shards):06d}.tar"

    def _partial_path(self) -> Path:
        return self.folder / f"{self._name()}.partial"

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()  # writes the tar end blocks; the file object stays ours to close
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        partial, final = self._partial_path(), self.folder / self._name()
        digest = hashlib.sha256(partial.read_bytes()).hexdigest()
        os.replace(partial, final)
        self.shards[final.name] = digest
        self._tar, self._file, self._in_shard = None, None, 0

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()


def shard_urls(folder: Path) -> list[str]:
    """The complete shards of one split, in order (a `.partial` file is never listed)."""
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    if not urls:
        raise FileNotFoundError(f"no shards in {folder}: run `blip ingest` first")
    return urls


def read_records(folder: Path) -> list[dict]:
    """The json member (annotation record) of every sample of a split, in order, without decoding images."""
    records = []
    for url in shard_urls(folder):
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            records.append(json.loads(sample["json"]))
    return records
