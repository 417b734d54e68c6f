"""Resumable training checkpoints: atomic, checksummed, the last K kept, the newest valid one found on resume.

A checkpoint is `step-NNNNNNNNN.pt` (torch.save of tensors and plain Python values, read back with
`weights_only=True`) plus `step-NNNNNNNNN.pt.sha256`. Both are written to temporary names and renamed, the
checksum first, so a checkpoint is visible only when complete; a truncated or altered file fails its checksum
and the previous checkpoint is used instead.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from blip.files import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:09d}.pt"
    with atomic_path(path) as partial:  # the checksum goes first: a checkpoint never appears without one
        torch.save(payload, partial)
        atomic_write_text(Path(f"{path}.sha256"), _sha256(partial))
    for old in checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
        Path(f"{old}.sha256").unlink(missing_ok=True)
    return path


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def load_latest(folder: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that passes its checksum and loads; invalid newer ones are reported and skipped."""
    for path in reversed(checkpoints(folder)):
        checksum = Path(f"{path}.sha256")
        if not checksum.is_file() or checksum.read_text().strip() != _sha256(path):
            log.warning("checkpoint %s is truncated or corrupt (checksum mismatch): trying the previous one", path)
            continue
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as exc:  # a file that passed its checksum yet fails to load: same treatment
            log.warning("checkpoint %s does not load (%s): trying the previous one", path, exc)
    return None
