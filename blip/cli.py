"""The `blip` command: `blip <stage> [--params FILE] [--set section.key=value ...]`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from blip.config import ConfigError

# command -> module with `main(argv) -> int`; imported lazily so `blip ingest` never loads torch it does not need.
COMMANDS = {
    "ingest": ("blip.stages.ingest", "synthetic world / annotation files -> webdataset shards"),
    "config": ("blip.stages.show_config", "print the validated configuration"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: blip <command> [options]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return module.main(argv[1:])
    except ConfigError as exc:
        print(f"blip {argv[0]}: {exc}", file=sys.stderr)
        return 2
