"""Weight files, read and written safely; which weights go where in a model is `blip.models.factory`'s business.

Files are read with `torch.load(weights_only=True)` or safetensors: a file that needs arbitrary unpickling
(and so could run code) is refused. Official BLIP files (`{'model': state_dict, ...}` or a bare state dict) and
our safetensors read the same way; ours also carry the model config and tokenizer name in their metadata.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from blip.config.schema import ModelConfig
from blip.files import atomic_path, not_found

CONFIG_METADATA = "blip.model_config"
TOKENIZER_METADATA = "blip.tokenizer"
TIED_METADATA = "blip.tied"  # stored name -> the other names of the same tensor


class UnsafeCheckpointError(RuntimeError):
    """The file holds pickled Python objects beyond tensors; loading it could execute code."""


@dataclass(frozen=True)
class WeightsFile:
    state: dict[str, torch.Tensor]
    config: ModelConfig | None  # ours carry it; official files do not
    tokenizer: str | None


def read_file(path: Path) -> WeightsFile:
    """A weights file's tensors (and, ours, its config and tokenizer), in one read."""
    if not path.is_file():
        raise FileNotFoundError(not_found(path, "weights file"))
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
        # A tied tensor is stored once: every other name it has comes back, so any task model finds its keys.
        tied = json.loads(metadata.get(TIED_METADATA, "{}"))
        state |= {alias: state[kept] for kept, aliases in tied.items() for alias in aliases}
        config = ModelConfig.model_validate_json(metadata[CONFIG_METADATA]) if CONFIG_METADATA in metadata else None
        return WeightsFile(state, config, metadata.get(TOKENIZER_METADATA) if config else None)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it contains pickled Python objects that are not tensors, and unpickling "
            f"them could run code. Convert it where you trust it (e.g. save only the state dict, or safetensors). "
            f"Detail: {str(exc).splitlines()[0]}"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path}: expected a state dict (or {{'model': state_dict}}) of tensors")
    return WeightsFile(data, None, None)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return read_file(Path(path)).state


def stored_config(path: Path) -> tuple[ModelConfig, str] | None:
    """(model config, tokenizer name) saved with our weights, from the metadata alone; None for other files."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if CONFIG_METADATA not in metadata:
        return None
    return ModelConfig.model_validate_json(metadata[CONFIG_METADATA]), metadata[TOKENIZER_METADATA]


def save_weights(model: nn.Module, path: Path, tokenizer: str) -> Path:
    """Weights as safetensors, atomically, with the model's config and the tokenizer it was trained with in the
    metadata. A tied tensor (the decoder's layers shared with the encoder, the LM head) is stored once under its
    first name, its other names listed in the metadata. `model.model_config` is set by `build_model`."""
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, list[str]] = {}
    first_name: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        kept = first_name.setdefault(id(tensor), name)
        if kept == name:
            state[name] = tensor.detach().contiguous()
        else:
            tied.setdefault(kept, []).append(name)
    metadata = {CONFIG_METADATA: model.model_config.model_dump_json(), TOKENIZER_METADATA: tokenizer,
                TIED_METADATA: json.dumps(tied)}  # fmt: skip
    with atomic_path(path) as partial:
        save_file(state, str(partial), metadata=metadata)
    return path
