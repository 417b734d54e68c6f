"""What every stage's `main(argv)` shares: the `--params` / `--set` arguments and the metrics file."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from blip.config import Params, load_params
from blip.config.params import DEFAULT_PARAMS
from blip.files import atomic_write_text


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"blip {stage}", description=description)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter (repeatable); wins over BLIP__SECTION__KEY environment variables",
    )
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace, Params]:
    args = parser.parse_args(argv)
    return args, load_params(args.params, args.overrides)


def write_metrics(stage: str, metrics: dict, folder: Path = Path("metrics")) -> Path:
    """`metrics/<stage>.json`, written atomically (DVC reads it as a metrics file)."""
    return atomic_write_text(folder / f"{stage}.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
