"""Reading weights safely, and loading official-BLIP-layout state dicts into our models.

Files are read with `torch.load(weights_only=True)` or safetensors: a file that needs arbitrary unpickling
(and so could run code) is refused. Official files (`{'model': state_dict, ...}` or a bare state dict) load by
name: our models use BLIP's parameter names. Position embeddings are resized bicubically to the model's image
size; keys of parts the model does not have (a pretraining checkpoint's decoder in a retrieval model, say) are
dropped and reported; a missing or mis-shaped key of a part the model has is an error.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from blip.config.schema import ModelConfig
from blip.models.vit import resize_pos_embed

POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
CONFIG_METADATA = "blip.model_config"
TOKENIZER_METADATA = "blip.tokenizer"
TIED_METADATA = "blip.tied"  # stored name -> the other names of the same tensor


class UnsafeCheckpointError(RuntimeError):
    """The file holds pickled Python objects beyond tensors; loading it could execute code."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            tied = json.loads((handle.metadata() or {}).get(TIED_METADATA, "{}"))
        # A tied tensor is stored once: every other name it has comes back, so any task model finds its keys.
        return state | {alias: state[kept] for kept, aliases in tied.items() for alias in aliases}
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
    return data


@dataclass
class LoadReport:
    dropped: list[str] = field(default_factory=list)  # in the file, not in this model (other parts)
    initialised: list[str] = field(default_factory=list)  # not in the file, left as built (momentum copies, queues)
    resized: list[str] = field(default_factory=list)  # position embeddings interpolated


def _component(key: str) -> str:
    return key.split(".")[0]


def load_official(model: nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """Load an official-layout state dict by name; see the module docstring for what is dropped or refused."""
    own = model.state_dict()
    report = LoadReport()
    adapt = getattr(model, "adapt_official", None)  # e.g. NLVR2: one pretrained cross-attention -> two
    state = adapt(state) if adapt else dict(state)
    for key in POS_EMBED_KEYS:
        if key in state and key in own and state[key].shape != own[key].shape:
            state[key] = resize_pos_embed(state[key], own[key].shape[1] - 1)
            report.resized.append(key)
    own_components = {_component(k) for k in own}
    unexpected = [k for k in state if k not in own and _component(k) in own_components]
    if unexpected:
        raise KeyError(f"keys of this model's parts that it does not have (another architecture?): {unexpected[:5]}")
    report.dropped = sorted(k for k in state if _component(k) not in own_components)
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(own[key].shape)} in the model")
    # A tied weight (the LM head, the decoder's shared layers) is satisfied by any one of its names.
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(t) for k, t in tensors.items() if k in state}
    missing = [k for k, t in tensors.items() if k not in state and id(t) not in loaded]
    # Momentum copies are rebuilt from the online weights and queues start fresh when a file lacks them (a
    # fine-tuned file), as do the task heads a model declares in FRESH_PARAMETERS (a pretrained file).
    fresh = re.compile("|".join(getattr(model, "FRESH_PARAMETERS", ())) or "$^")  # task heads a file may lack
    optional = [k for k in missing if _component(k).endswith("_m") or "queue" in k or k == "temp" or fresh.search(k)]
    required = [k for k in missing if k not in optional]
    if required:
        raise KeyError(f"the file lacks {len(required)} of this model's weights, e.g. {required[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report.initialised = optional
    if any(_component(k).endswith("_m") for k in optional) and hasattr(model, "momentum_pairs"):
        from blip.models.contrastive import copy_to_momentum

        copy_to_momentum(model.momentum_pairs)
    return report


def save_weights(model: nn.Module, path: Path, tokenizer: str) -> Path:
    """Weights as safetensors, atomically, with the model's config and the tokenizer it was trained with in the
    metadata. A tied tensor (the decoder's layers shared with the encoder, the LM head) is stored once under its
    first name, its other names listed in the metadata. `model.model_config` is set by `build_model`."""
    path.parent.mkdir(parents=True, exist_ok=True)
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
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def stored_config(path: Path) -> tuple[ModelConfig, str] | None:
    """(model config, tokenizer name) saved with our weights; None for files from elsewhere."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if CONFIG_METADATA not in metadata:
        return None
    return ModelConfig.model_validate_json(metadata[CONFIG_METADATA]), metadata[TOKENIZER_METADATA]
