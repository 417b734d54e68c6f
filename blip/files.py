"""Atomic file writes: a file appears under its name only complete, so a killed run never leaves half of one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A `.partial` path beside `path` to write; renamed onto `path` when the block completes, removed if not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        with open(partial, "rb") as written:  # on disk before it is named: a crash never leaves a named half-file
            os.fsync(written.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as partial:
        partial.write_text(text)
    return path


def not_found(path: Path, what: str = "") -> str:
    """The message for a path that does not resolve: relative paths are read from the working directory."""
    where = "" if path.is_absolute() else f" (resolved from {Path.cwd()})"
    return f"{what + ' ' if what else ''}not found: {path}{where}"


def swap_in(staging: Path, out_dir: Path) -> None:
    """Replace the folder `out_dir` by the finished `staging` folder (the old output is removed only afterwards)."""
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
