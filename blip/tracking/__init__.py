"""MLflow run history for every stage (rank 0 only)."""

from blip.tracking.runs import stage_run, tracking_uri

__all__ = ["stage_run", "tracking_uri"]
