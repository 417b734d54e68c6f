"""Run `blip export-onnx` graphs with onnxruntime: captions (greedy, beam, nucleus) and pair scores.

The decoding loop is the torch one (blip.models.generation) over onnxruntime's logits: the runner supplies the
step (prefill, then one token at a time with the cache as numpy arrays) and the beam reordering, so the same
weights give the same captions. Preprocessing is the project's eval transform (resize, normalise).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from blip.data.tokenizer import SpecialTokens, load_tokenizer
from blip.data.transforms import eval_transform
from blip.models.generation import GenerationConfig, beam_search, greedy_or_sample
from blip.onnx.export import META, kv_names


class OnnxModel:
    """The graphs of one exported folder, its tokenizer, transform and metadata."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        self.meta = json.loads((folder / META).read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        # Idle threads sleep instead of spinning: spinning ones took the cores from torch in the same process
        # (torch's captions/s fell 60x beside a session) and cost a search loop's Python between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {path.stem: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                         for path in sorted(folder.glob("*.onnx"))}  # fmt: skip
        self.tokenizer = load_tokenizer(str(folder / "vocab.txt"))
        self.tokens = SpecialTokens(**self.meta["special_tokens"])
        if SpecialTokens.of(self.tokenizer) != self.tokens:
            raise ValueError(f"{folder}: vocab.txt does not give the exported model's special token ids")
        self.transform = eval_transform(self.meta["image_size"])
        self.layers = self.meta["layers"]

    def run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.sessions[graph].run(None, inputs)


class OnnxCaptioner(OnnxModel):
    def generate(self, images: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None = None
                 ) -> list[list[int]]:  # fmt: skip
        """Caption token ids per image (prompt and end token removed), as BlipCaptioner.generate."""
        (embeds,) = self.run("vision", images=images.numpy())
        rows = embeds.shape[0]
        state: dict[str, list[np.ndarray]] = {}
        names = kv_names("past", self.layers) + kv_names("cross", self.layers)

        def step(ids: torch.Tensor) -> torch.Tensor:
            if not state:
                logits, *kv = self.run("decoder_prefill", input_ids=ids.numpy(), image_embeds=embeds)
                state["past"], state["cross"] = kv[: 2 * self.layers], kv[2 * self.layers :]
            else:
                feed = dict(zip(names, state["past"] + state["cross"], strict=True))
                logits, *state["past"] = self.run("decoder_step", input_ids=ids.numpy(), **feed)
            return torch.from_numpy(logits)

        def reorder(index: torch.Tensor) -> None:
            rows = index.numpy()
            state["past"] = [kv[rows] for kv in state["past"]]
            if len(rows) != len(state["cross"][0]):  # beams branch off their image (see KVCache.select)
                state["cross"] = [kv[rows] for kv in state["cross"]]

        prompt = torch.tensor(self.meta["prompt_ids"])[None].expand(rows, -1)
        if config.method == "beam":
            return beam_search(step, reorder, prompt, config, self.tokens.sep, self.tokens.pad)
        return greedy_or_sample(step, prompt, config, self.tokens.sep, self.tokens.pad, generator)


class OnnxRetrieval(OnnxModel):
    def image_features(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(image tokens, L2-normalised ITC feature)."""
        embeds, feat = self.run("image", images=images.numpy())
        return embeds, feat

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        return self.run("text", input_ids=ids.numpy(), attention_mask=mask.numpy())[0]

    def score_pairs(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """For each (image, text) row: ITM match probability and ITC cosine similarity."""
        embeds, image_feat = self.image_features(images)
        (logits,) = self.run("itm", image_embeds=embeds, input_ids=ids.numpy(), attention_mask=mask.numpy())
        probability = torch.from_numpy(logits).softmax(-1)[:, 1].numpy()
        return probability, (image_feat * self.text_features(ids, mask)).sum(-1)


def load_onnx(folder: Path, threads: int = 0) -> OnnxCaptioner | OnnxRetrieval:
    task = json.loads((folder / META).read_text())["task"]
    return (OnnxCaptioner if task == "caption" else OnnxRetrieval)(folder, threads)
