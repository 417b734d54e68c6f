"""Where shards live, and reading them where they are.

A split in the config is either a name (a folder of `shard-NNNNNN.tar` under `data.shard_root`: what `blip ingest`
and CapFilt write) or a location: a local folder or tar, a brace pattern (`s3://bucket/laion/{00000..00999}.tar`),
a glob, a URL of any fsspec filesystem (`s3://` through s3fs, `gs://`, ...) or a `pipe:` command. Shards are
streamed from there: nothing is copied first. Credentials and endpoints come from the filesystem's own settings
(for S3: the AWS environment variables or files, `AWS_ENDPOINT_URL` for MinIO and other S3 servers).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import fsspec
import webdataset as wds
from braceexpand import braceexpand
from fsspec.core import url_to_fs

from blip.config.schema import NAME
from blip.files import not_found


def is_name(split: str) -> bool:
    """A split name (a folder under data.shard_root), as opposed to a location."""
    return bool(re.match(NAME, split))


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def split_urls(root: Path, split: str) -> list[str]:
    """The shard URLs of a split: a name's complete shards under `root`, or a location expanded."""
    return shard_urls(root / split) if is_name(split) else expand(split)


def shard_urls(folder: Path) -> list[str]:
    """The complete shards of one named split, in order (a `.partial` file is never listed)."""
    if not folder.is_dir():
        raise FileNotFoundError(not_found(folder, "shard folder") + ": run `blip ingest` first?")
    urls = sorted(str(p) for p in folder.glob("shard-*.tar"))
    if not urls:
        raise FileNotFoundError(f"no shards in {folder}: run `blip ingest` first")
    return urls


def expand(location: str) -> list[str]:
    """A location's shard URLs, in order: braces expanded; a glob or a folder (prefix) listed for its `*.tar`;
    a name ending in `.tar` taken as it is (a missing one is reported when it is read, or by `blip sources`)."""
    if location.startswith("pipe:"):
        return list(braceexpand(location))
    urls: list[str] = []
    for part in braceexpand(location):
        if part.endswith(".tar") and not glob.has_magic(part):
            urls.append(part)  # no request per shard: a pattern of 100,000 shards expands at once
            continue
        fs, path = url_to_fs(part)
        pattern = path if glob.has_magic(path) else path.rstrip("/") + "/*.tar"
        found = sorted(p for p in fs.glob(pattern) if p.endswith(".tar"))
        if not found:
            raise FileNotFoundError(f"no shards (*.tar) at {part}")
        urls += [p if is_local(part) else fs.unstrip_protocol(p) for p in found]
    return urls


def open_shard(url: str) -> BinaryIO:
    """A binary stream of one shard; a missing or forbidden one raises an error naming it."""
    try:
        if url.startswith("pipe:"):
            return wds.gopen(url)
        if is_local(url):
            return open(url, "rb")
        return fsspec.open(url, "rb").open()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"shard not found: {url}") from exc
    except PermissionError as exc:
        raise PermissionError(f"access denied to shard {url} (credentials or bucket policy): {exc}") from exc


def remote_versions(urls: Iterable[str]) -> bytes:
    """The sizes and versions of the shards among `urls` that are not local files, for a fingerprint's digest
    (local files are hashed by their callers, from their bytes)."""
    return str(describe(url for url in urls if not is_local(url))).encode()


def describe(urls: Iterable[str]) -> list[dict]:
    """Size and version (S3's ETag or version id; a local file's modification time) of each shard, listing each
    parent folder once rather than asking per shard. A missing shard is an error naming the missing ones."""
    urls = list(urls)
    by_parent: dict[str, dict[str, dict]] = {}
    missing, out = [], []
    for url in urls:
        if url.startswith("pipe:"):
            out.append({"url": url, "size": None, "version": None})  # a command: its output has no version
            continue
        fs, path = url_to_fs(url)
        parent = str(PurePosixPath(path).parent)
        key = f"{fs.protocol}:{parent}"
        if key not in by_parent:
            try:
                by_parent[key] = {info["name"].rstrip("/"): info for info in fs.ls(parent, detail=True)}
            except FileNotFoundError:
                by_parent[key] = {}
        info = by_parent[key].get(path.rstrip("/"))
        if info is None:
            missing.append(url)
            continue
        version = info.get("VersionId") or info.get("ETag") or info.get("etag") or info.get("mtime")
        out.append({"url": url, "size": info.get("size"), "version": str(version) if version is not None else None})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards not found: {shown}")
    return out
