"""Trained weights as an MLflow pyfunc model: what the registry holds and `mlflow models serve` answers with.

Input: a table with a base64-encoded image per row (`image`, any format PIL reads) and, by task, `text` (retrieval:
the caption to score; NLVR2: the statement), `question` (VQA) or a second image `image2` (NLVR2). Output, one row
per input row:
- caption: `caption` (beam search, BLIP's settings: 3 beams, 5 to 20 tokens);
- retrieval: `itm_probability` (the filter's match probability) and `itc_similarity`;
- vqa: `answer` (generated);
- nlvr: `probability_true` (that the statement is true of the image pair) and `label` (above 0.5).
The model folder carries the weights (config inside), the tokenizer's vocabulary and the `blip` package itself.
"""

from __future__ import annotations

import base64
import io
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from PIL import Image

from blip.config.schema import TokenizerConfig

TASKS = ("caption", "retrieval", "vqa", "nlvr")
INPUTS = {"caption": ["image"], "retrieval": ["image", "text"], "vqa": ["image", "question"],
          "nlvr": ["image", "image2", "text"]}  # fmt: skip
BATCH = 32
RUNTIME = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "safetensors",
    "tokenizers",
    "pillow",
    "pandas",
    "pydantic",
    "pydantic-settings",
    "pyyaml",
    "mlflow",
)  # what the pyfunc imports, pinned to this environment's versions


class BlipPyfunc(mlflow.pyfunc.PythonModel):
    def __init__(self, task: str, max_length: int = TokenizerConfig().max_length) -> None:
        """`max_length`: the text tokens a row keeps (the model's `tokenizer.max_length`)."""
        if task not in TASKS:
            raise ValueError(f"no pyfunc for task {task!r} (one of {', '.join(TASKS)})")
        self.task, self.max_length = task, max_length

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from blip.data.transforms import eval_transform
        from blip.models.factory import load_trained

        vocab = context.artifacts.get("vocab")
        self.model, self.tokenizer = load_trained(self.task, Path(context.artifacts["weights"]), None, None,
                                                  tokenizer=vocab)  # fmt: skip
        self.model.eval()
        self.transform = eval_transform(self.model.model_config.image_size)

    def _images(self, column: pd.Series) -> torch.Tensor:
        decoded = []
        for row, data in enumerate(column):
            try:
                decoded.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            except Exception as exc:  # a clear error naming the row, not a stack trace from PIL
                raise ValueError(f"row {row}: `{column.name}` is not a base64-encoded image ({exc})") from exc
        return torch.stack([self.transform(image) for image in decoded])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        parts = [self._predict(model_input.iloc[i : i + BATCH]) for i in range(0, len(model_input), BATCH)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    @torch.no_grad()
    def _predict(self, rows: pd.DataFrame) -> pd.DataFrame:
        from blip.models.generation import GenerationConfig

        images = self._images(rows["image"])
        decode = lambda ids: [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]  # noqa: E731
        if self.task == "caption":
            config = GenerationConfig("beam", num_beams=3, max_length=20, min_length=5)
            return pd.DataFrame({"caption": decode(self.model.generate(images, config))})
        texts = rows["question" if self.task == "vqa" else "text"].astype(str).tolist()
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        if self.task == "retrieval":
            probability, similarity = self.model.score_pairs(images, tokens.input_ids, tokens.attention_mask)
            return pd.DataFrame({"itm_probability": probability.tolist(), "itc_similarity": similarity.tolist()})
        if self.task == "nlvr":
            logits = self.model.logits(images, self._images(rows["image2"]), tokens.input_ids, tokens.attention_mask)
            probability = logits.softmax(-1)[:, 1]  # class 1: the statement is true
            return pd.DataFrame({"probability_true": probability.tolist(), "label": (probability > 0.5).tolist()})
        return pd.DataFrame({"answer": decode(self.model.generate(images, tokens.input_ids, tokens.attention_mask))})


def log_pyfunc(task: str, weights: Path, max_length: int, name: str = "model", model_id: str | None = None
               ) -> mlflow.models.model.ModelInfo:  # fmt: skip
    """Log `weights` as a pyfunc model, into the logged model `model_id` when given (the vocabulary file and
    `blip` itself travel along)."""
    from blip.models.checkpoint import stored_config

    stored = stored_config(weights)
    if stored is None:
        raise ValueError(f"{weights} holds no model config (only our .safetensors can be registered)")
    artifacts = {"weights": str(weights)}
    if Path(stored[1]).is_file():  # a fitted vocabulary (the tiny default) rather than a hub tokenizer name
        artifacts["vocab"] = stored[1]
    example = pd.DataFrame({column: ["<base64 image>" if column.startswith("image") else "a red circle"]
                            for column in INPUTS[task]})  # fmt: skip
    # Declared, not inferred: inference loads the model in a subprocess (about 10 s per version).
    requirements = [f"{name}=={version(name)}" for name in RUNTIME]
    return mlflow.pyfunc.log_model(
        name=name, python_model=BlipPyfunc(task, max_length), artifacts=artifacts, pip_requirements=requirements,
        code_paths=[str(Path(__file__).parent)], signature=mlflow.models.infer_signature(example), model_id=model_id,
    )  # fmt: skip
