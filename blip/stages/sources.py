"""`blip sources`: the shard locations the config reads (s3:// prefixes, brace patterns, folders outside the
project), each shard with its size and version, in `data/sources.json`. Nothing is copied.

DVC runs this stage on every `dvc repro` (`always_changed`) and the stages that read shards depend on its output:
when a source changes (a shard added, replaced or removed: a new ETag, version or size), the file changes and they
rerun; when nothing changed they do not. Split names (folders under data.shard_root, what ingest writes) are
tracked by DVC itself and are not listed here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from blip.config import Params
from blip.data.locations import describe, expand, is_name
from blip.files import atomic_write_text
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.tracking import stage_run

OUT = Path("data/sources.json")
SPLIT_KEYS = ("splits", "split", "eval_split", "source_splits", "human_splits", "calibration_split")


def locations(params: Params) -> list[str]:
    """Every split the config reads that is a location rather than a name, once, sorted."""

    def found(node: object, key: str = "") -> Iterator[str]:
        if isinstance(node, dict):
            for child_key, child in node.items():
                yield from found(child, child_key)
        elif isinstance(node, list) and key in SPLIT_KEYS:
            yield from (item for item in node if isinstance(item, str))
        elif isinstance(node, str) and key in SPLIT_KEYS:
            yield node

    return sorted({split for split in found(params.model_dump(mode="json")) if not is_name(split)})


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("sources", __doc__ or ""), argv)
    listed = {location: describe(expand(location)) for location in locations(params)}
    atomic_write_text(OUT, json.dumps(listed, indent=1, sort_keys=True) + "\n")
    shards = [shard for found in listed.values() for shard in found]
    metrics = {"locations": len(listed), "shards": len(shards), "bytes": sum(s["size"] or 0 for s in shards)}
    path = write_metrics("sources", metrics)
    if listed:  # the stage runs on every `dvc repro`: an MLflow run only when there is something to record
        with stage_run("sources", params, (), f"shard sources: {len(listed)} locations, {len(shards)} shards") as run:
            run.log_metrics(metrics)
            run.log_artifact(OUT)
            run.log_artifact(path, "metrics.json")
    print(f"sources: {metrics['locations']} locations, {metrics['shards']} shards, {metrics['bytes']} bytes")
    return 0
