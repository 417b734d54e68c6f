"""Load `params.yaml`, apply environment and command-line overrides, validate everything up front.

Precedence, highest first: `--set section.key=value`, `BLIP__<SECTION>__<KEY>` environment variables, the file.
Any problem (unknown key, wrong type, impossible value, missing file) raises `ConfigError` naming the key,
before a stage does any work.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from blip.config.schema import (
    DataConfig,
    IngestConfig,
    ModelConfig,
    PretrainConfig,
    TokenizerConfig,
    VocabConfig,
    WorldConfig,
)
from blip.config.tasks import (
    CapfiltConfig,
    CaptionFinetuneConfig,
    NlvrFinetuneConfig,
    PromotionConfig,
    RetrievalFinetuneConfig,
    VqaFinetuneConfig,
    ZeroShotConfig,
)
from blip.files import not_found

ENV_PREFIX = "BLIP__"
DEFAULT_PARAMS = Path("params.yaml")

# The file the next `Params` construction reads; a context variable so loading stays re-entrant.
_params_file: ContextVar[Path] = ContextVar("_params_file", default=DEFAULT_PARAMS)


class ConfigError(ValueError):
    """Invalid configuration; the message names every offending key."""


class Params(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True)

    world: WorldConfig = WorldConfig()
    ingest: IngestConfig
    data: DataConfig = DataConfig()
    vocab: VocabConfig = VocabConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    repretrain: PretrainConfig = PretrainConfig(output=Path("models/repretrain.safetensors"),
                                                checkpoint_dir=Path("checkpoints/repretrain"))  # fmt: skip
    caption: CaptionFinetuneConfig = CaptionFinetuneConfig()
    retrieval: RetrievalFinetuneConfig = RetrievalFinetuneConfig()
    retrieval_zeroshot: ZeroShotConfig = ZeroShotConfig()
    vqa: VqaFinetuneConfig = VqaFinetuneConfig()
    nlvr: NlvrFinetuneConfig = NlvrFinetuneConfig()
    capfilt: CapfiltConfig = CapfiltConfig()
    promotion: PromotionConfig = PromotionConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the --set overrides; they win over the environment, which wins over the file.
        yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=_params_file.get())
        return init_settings, env_settings, yaml_source


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`["pretrain.lr=1e-4", "world.seed=3"]` -> `{"pretrain": {"lr": 1e-4}, "world": {"seed": 3}}`."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. pretrain.lr=1e-4)")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _check_env_sections() -> None:
    # pydantic-settings silently ignores BLIP__<UNKNOWN> variables; a typo there must not pass unnoticed.
    known = set(Params.model_fields)
    for name in os.environ:
        if name.upper().startswith(ENV_PREFIX):
            section = name[len(ENV_PREFIX) :].split("__")[0].lower()
            if section not in known:
                raise ConfigError(f"environment variable {name}: unknown section {section!r}")


def _format(error: ValidationError, path: Path) -> str:
    lines = [f"invalid configuration ({path} + {ENV_PREFIX}* environment + --set overrides):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        shown = item.get("input")
        got = "" if isinstance(shown, dict) else f" (got {shown!r})"
        if item["type"] in ("path_not_file", "path_not_directory"):  # pydantic's FilePath / DirectoryPath
            message, got = f"{message}: {not_found(Path(str(shown)))}", ""
        lines.append(f"  {key}: {message}{got}")
    return "\n".join(lines)


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(not_found(path, "params file"))
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    _check_env_sections()
    token = _params_file.set(path)
    try:
        return Params(**parse_overrides(overrides))
    except ValidationError as exc:
        raise ConfigError(_format(exc, path)) from None
    finally:
        _params_file.reset(token)


def flatten(params: Params) -> dict[str, Any]:
    """`{"pretrain.lr": 3e-4, ...}`: the shape MLflow params and DVC `-S` overrides use."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = value

    walk("", params.model_dump(mode="json"))
    return flat
