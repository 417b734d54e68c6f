"""`blip config`: validate params.yaml with env and --set overrides, and print the result as YAML."""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from blip.stages.common import parse_stage_args, stage_parser


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("config", __doc__ or ""), argv)
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), end="")
    return 0
