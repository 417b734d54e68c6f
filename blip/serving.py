"""Trained weights as an MLflow pyfunc model: what the registry holds and `mlflow models serve` answers with.

Input: a table with a base64-encoded image per row (`image`, any format PIL reads) and, by task, `text` (retrieval:
the caption to score; NLVR2: the statement), `question` (VQA) or a second image `image2` (NLVR2). Output, one row
per input row (`OUTPUTS`):
- caption: `caption` (beam search, BLIP's settings: 3 beams, 5 to 20 tokens);
- retrieval: `itm_probability` (the filter's match probability) and `itc_similarity`;
- vqa: `answer` (generated);
- nlvr: `probability_true` (that the statement is true of the image pair) and `label` (above 0.5).
A request's rows run through the model BATCH at a time (one forward pass per batch, never one per row); a bad row
(not base64, not an image, a text that is not a string) is answered with HTTP 400 naming the row and its problem.
The model is logged as code (this file, run by MLflow at load time; no pickled object) with the weights (config
inside), the tokenizer's vocabulary, the `blip` package itself, its signature and a one-row input example.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image

TASKS = ("caption", "retrieval", "vqa", "nlvr")
INPUTS = {"caption": ["image"], "retrieval": ["image", "text"], "vqa": ["image", "question"],
          "nlvr": ["image", "image2", "text"]}  # fmt: skip
OUTPUTS = {"caption": {"caption": "string"}, "retrieval": {"itm_probability": "double", "itc_similarity": "double"},
           "vqa": {"answer": "string"}, "nlvr": {"probability_true": "double", "label": "boolean"}}  # fmt: skip
SUMMARY = {
    "caption": "BLIP captioner: a caption for each image (beam search: 3 beams, 5 to 20 tokens).",
    "retrieval": "BLIP image-text retrieval, pair by pair: how well each text matches its image (CapFilt's filter).",
    "vqa": "BLIP visual question answering: a generated answer to each question about its image.",
    "nlvr": "BLIP NLVR2: whether each statement is true of its pair of images.",
}
COLUMNS = {
    "image": "a base64-encoded image (any format PIL reads)",
    "image2": "the second image, base64-encoded",
    "text": "the text to score (retrieval) or the statement about the two images (NLVR2)",
    "question": "the question about the image",
    "caption": "the generated caption",
    "itm_probability": "the image-text matching head's probability that text and image match",
    "itc_similarity": "the cosine similarity of the image and text embeddings",
    "answer": "the generated answer",
    "probability_true": "the probability that the statement is true of the image pair",
    "label": "probability_true > 0.5",
}
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


class BadInput(MlflowException, ValueError):
    """A bad request row, which a served model answers with HTTP 400 and this message alone.

    MLflow's scoring server answers any other exception from `predict` with a generic "unexpected error" message
    and the stack trace, and an MlflowException with its message, no trace, but prefixed with a dump of the whole
    request ("Failed to predict data '<table>'. Error: ..."): this one ignores that rewrite.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return str(self.args[0])

    @message.setter
    def message(self, _: str) -> None:
        pass  # set by MlflowException.__init__ and by the scoring server; the message stays args[0]


class BlipPyfunc(mlflow.pyfunc.PythonModel):
    """Configured at load time by the model's `model_config`: `task` and `max_length` (the text tokens a row keeps,
    the model's `tokenizer.max_length`)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from blip.data.transforms import eval_transform
        from blip.models.factory import load_trained

        self.task, self.max_length = context.model_config["task"], context.model_config["max_length"]
        vocab = context.artifacts.get("vocab")
        self.model, self.tokenizer = load_trained(self.task, Path(context.artifacts["weights"]), None, None,
                                                  tokenizer=vocab)  # fmt: skip
        self.model.eval()
        self.transform = eval_transform(self.model.model_config.image_size)

    def _images(self, column: pd.Series, offset: int) -> torch.Tensor:
        decoded = []
        for row, data in enumerate(column, start=offset):
            problem = f"row {row}: `{column.name}` is not a base64-encoded image"
            if not isinstance(data, str):
                raise BadInput(f"{problem} (it is {type(data).__name__})")
            try:  # line breaks allowed (`base64` wraps its output), any other non-base64 character refused
                raw = base64.b64decode("".join(data.split()), validate=True)
            except binascii.Error as exc:
                raise BadInput(f"{problem} (not base64: {exc})") from exc
            try:
                decoded.append(Image.open(io.BytesIO(raw)).convert("RGB"))
            except Exception as exc:  # PIL's own message names a BytesIO object, not the row
                raise BadInput(f"{problem} (base64, but not an image format PIL reads)") from exc
        return torch.stack([self.transform(image) for image in decoded])

    def _texts(self, column: pd.Series, offset: int) -> list[str]:
        for row, value in enumerate(column, start=offset):
            if not isinstance(value, str):
                missing = value is None or (isinstance(value, float) and math.isnan(value))
                kind = "null" if missing else type(value).__name__
                raise BadInput(f"row {row}: `{column.name}` is not a string (it is {kind})")
        return column.tolist()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        parts = [self._predict(model_input.iloc[i : i + BATCH], i) for i in range(0, len(model_input), BATCH)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(OUTPUTS[self.task]))

    @torch.no_grad()
    def _predict(self, rows: pd.DataFrame, offset: int) -> pd.DataFrame:
        from blip.models.generation import GenerationConfig

        images = self._images(rows["image"], offset)
        decode = lambda ids: [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]  # noqa: E731
        if self.task == "caption":
            config = GenerationConfig("beam", num_beams=3, max_length=20, min_length=5)
            return pd.DataFrame({"caption": decode(self.model.generate(images, config))})
        texts = self._texts(rows["question" if self.task == "vqa" else "text"], offset)
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        if self.task == "retrieval":
            probability, similarity = self.model.score_pairs(images, tokens.input_ids, tokens.attention_mask)
            return pd.DataFrame({"itm_probability": probability.tolist(), "itc_similarity": similarity.tolist()})
        if self.task == "nlvr":
            right = self._images(rows["image2"], offset)
            logits = self.model.logits(images, right, tokens.input_ids, tokens.attention_mask)
            probability = logits.softmax(-1)[:, 1]  # class 1: the statement is true
            return pd.DataFrame({"probability_true": probability.tolist(), "label": (probability > 0.5).tolist()})
        return pd.DataFrame({"answer": decode(self.model.generate(images, tokens.input_ids, tokens.attention_mask))})


def signature(task: str) -> ModelSignature:
    """Every input a required string (a served request missing one is refused before the model runs)."""
    return ModelSignature(Schema([ColSpec("string", column) for column in INPUTS[task]]),
                          Schema([ColSpec(kind, column) for column, kind in OUTPUTS[task].items()]))  # fmt: skip


def input_example(task: str) -> pd.DataFrame:
    """One row: a real (tiny) PNG, and the texts the task takes."""
    images = []
    for colour in ((200, 30, 30), (30, 30, 200)):
        png = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(png, format="PNG")
        images.append(base64.b64encode(png.getvalue()).decode())
    values = {"image": images[0], "image2": images[1], "question": "what colour is the square?",
              "text": "a red square" if task == "retrieval" else "the left image is red"}  # fmt: skip
    return pd.DataFrame({column: [values[column]] for column in INPUTS[task]})


def describe(task: str) -> str:
    """The registered model's description: what it does, its inputs and outputs."""
    inputs = "\n".join(f"- `{column}` (string): {COLUMNS[column]}" for column in INPUTS[task])
    outputs = "\n".join(f"- `{column}` ({kind}): {COLUMNS[column]}" for column, kind in OUTPUTS[task].items())
    return f"{SUMMARY[task]}\n\nInput, one row per request item:\n{inputs}\n\nOutput, one row per input row:\n{outputs}"


def log_pyfunc(task: str, weights: Path, max_length: int, name: str = "model", model_id: str | None = None
               ) -> mlflow.models.model.ModelInfo:  # fmt: skip
    """Log `weights` as a pyfunc model, into the logged model `model_id` when given (the vocabulary file and
    `blip` itself travel along). MLflow runs the model once on the input example to check it serves."""
    from blip.models.checkpoint import stored_config

    if task not in TASKS:
        raise ValueError(f"no pyfunc for task {task!r} (one of {', '.join(TASKS)})")
    stored = stored_config(weights)
    if stored is None:
        raise ValueError(f"{weights} holds no model config (only our .safetensors can be registered)")
    artifacts = {"weights": str(weights)}
    if Path(stored[1]).is_file():  # a fitted vocabulary (the tiny default) rather than a hub tokenizer name
        artifacts["vocab"] = stored[1]
    # Declared, not inferred: inference loads the model in a subprocess (about 10 s per version).
    requirements = [f"{name}=={version(name)}" for name in RUNTIME]
    return mlflow.pyfunc.log_model(
        name=name, python_model=__file__, model_config={"task": task, "max_length": max_length},
        artifacts=artifacts, pip_requirements=requirements, code_paths=[str(Path(__file__).parent)],
        signature=signature(task), input_example=input_example(task), model_id=model_id,
    )  # fmt: skip


if __name__ != "blip.serving":  # run by MLflow as the logged model's code, not imported as part of `blip`
    from blip.serving import BlipPyfunc as _Model  # the package's class (the copy logged alongside in code/)

    mlflow.models.set_model(_Model())
