"""Typed configuration: `params.yaml` + `BLIP__*` environment + `--set` overrides."""

from blip.config.params import ConfigError, Params, flatten, load_params, parse_overrides

__all__ = ["ConfigError", "Params", "flatten", "load_params", "parse_overrides"]
