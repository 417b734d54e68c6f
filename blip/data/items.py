"""What every ingest source yields: one sample on its way into a shard."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

Kind = Literal["pairs", "vqa", "nlvr"]
ImageSource = bytes | Path | Image.Image


@dataclass
class Item:
    split: str
    kind: Kind
    ref: str  # where it came from, for the manifest's skip report
    images: dict[str, ImageSource]  # shard member extension ("jpg", "left.jpg") -> image
    record: dict  # the sample's json member


def image_id_numbers(records: list[dict]) -> list[int]:
    """Stable integers from the records' image ids (captions of one image share one): ITC's positives."""
    return [zlib.crc32(r["image_id"].encode()) & 0x7FFFFFFF for r in records]
