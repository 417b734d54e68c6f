"""`blip ingest`: the configured sources -> webdataset shards per split + manifest + metrics/ingest.json."""

from __future__ import annotations

from collections.abc import Sequence

from blip.data.ingest import MANIFEST, ingest
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.tracking import stage_run


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("ingest", __doc__ or "")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args, params = parse_stage_args(parser, argv)
    sources = ", ".join(sorted({source.format for source in params.ingest.sources}))
    description = f"ingest: {sources} sources -> webdataset shards in {params.ingest.out_dir}"
    with stage_run("ingest", params, ("world", "ingest"), description) as run:
        manifest = ingest(params, show_progress=not args.no_progress)
        metrics = {
            "samples": {split: info["samples"] for split, info in manifest["splits"].items()},
            "skipped": manifest["skipped"]["total"],
        }
        path = write_metrics("ingest", metrics)
        run.log_metrics({f"samples.{k}": v for k, v in metrics["samples"].items()} | {"skipped": metrics["skipped"]})
        run.log_artifact(params.ingest.out_dir / MANIFEST)
        run.log_artifact(path, "metrics.json")
    skipped = manifest["skipped"]
    print(
        f"ingest: {sum(metrics['samples'].values())} samples in {len(manifest['splits'])} splits, "
        f"{skipped['total']} skipped {skipped['by_reason'] or ''}".rstrip()
    )
    return 0
