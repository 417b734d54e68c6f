"""The fine-tune stages' sections: captioning, retrieval, VQA, NLVR2, and zero-shot retrieval evaluation.

Each fine-tune starts from `init` (the pretrained weights) and names everything it writes after its `output`
file's stem: models/retrieval.safetensors -> metrics/retrieval.json, plots/retrieval.csv, reports/retrieval/,
the MLflow run "retrieval". A second variant of a stage (e.g. on the CapFilt model) only changes `init`,
`output` and `checkpoint_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from blip.config.schema import Section, ShardSplit, TrainConfig


class FinetuneConfig(TrainConfig):
    init: Path = Path("models/pretrain.safetensors")


class CaptionFinetuneConfig(FinetuneConfig):
    """Captioning fine-tune (LM after the prompt "a picture of ") and its evaluation (BLIP: beam 3, max 20, min 5)."""

    splits: list[ShardSplit] = Field(["clean_train"], min_length=1)
    eval_split: ShardSplit = "clean_test"
    eval_images: int = Field(500, ge=1)
    num_beams: int = Field(3, ge=1)
    max_length: int = Field(20, ge=2, description="tokens, prompt included, as in BLIP")
    min_length: int = Field(5, ge=1)
    gallery_images: int = Field(16, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    checkpoint_dir: Path = Path("checkpoints/caption")
    output: Path = Path("models/caption.safetensors")


class RetrievalEvalConfig(Section):
    """BLIP's two-step retrieval evaluation: ITC over all pairs in chunks, then ITM re-ranking of the top k."""

    split: ShardSplit = "clean_test"
    images: int = Field(500, ge=2, description="the first this many images of the split, with all their captions")
    k_test: int = Field(256, ge=1, description="candidates re-ranked by ITM per query (BLIP: 256 COCO, 128 Flickr)")
    itc_chunk: int = Field(256, ge=1, description="query rows of the similarity matrix computed at once")
    itm_batch: int = Field(128, ge=1, description="pairs per ITM forward pass")


class RetrievalFinetuneConfig(FinetuneConfig):
    """ITC (momentum distillation, image-id queue) + ITM (hard negatives) on the human-annotated pairs."""

    splits: list[ShardSplit] = Field(["clean_train"], min_length=1)
    queue_size: int = Field(57600, ge=0, description="ITC feature and image-id queue; 0 = in-batch only")
    momentum: float = Field(0.995, ge=0, le=1)
    alpha: float = Field(0.4, ge=0, le=1)
    alpha_ramp_epochs: float = Field(1.0, ge=0, description="alpha rises linearly over these first epochs")
    itm_hard_negatives: float = Field(1.0, ge=0, le=1, description="share of ITM negatives drawn by ITC "
                                      "similarity (BLIP: 1); the rest uniformly from the batch")  # fmt: skip
    eval: RetrievalEvalConfig = RetrievalEvalConfig()
    checkpoint_dir: Path = Path("checkpoints/retrieval")
    output: Path = Path("models/retrieval.safetensors")

    @model_validator(mode="after")
    def _queue_divides(self) -> RetrievalFinetuneConfig:
        if self.queue_size % self.batch_size:  # filled one global batch at a time, as in pretraining
            raise ValueError(f"queue_size {self.queue_size} is not a multiple of the batch_size {self.batch_size}")
        return self


class ZeroShotConfig(Section):
    """Retrieval straight after pretraining, no fine-tune (the `retrieval-zeroshot` stage)."""

    weights: Path = Path("models/pretrain.safetensors")
    name: str = Field("retrieval_zeroshot", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="metrics file name")
    eval: RetrievalEvalConfig = RetrievalEvalConfig()


class VqaFinetuneConfig(FinetuneConfig):
    """Answer generation loss, each question's answers weighted by annotator share; evaluation by ranking over
    the answer list (the eval split's answer_list.json, else the training answers) and by generation."""

    splits: list[ShardSplit] = Field(["vqa_train"], min_length=1)
    eval_split: ShardSplit = "vqa_test"
    eval_questions: int = Field(1_000_000, ge=1)
    k_test: int = Field(128, ge=1, description="answers re-scored per question in ranking mode (BLIP: 128)")
    inference: list[Literal["rank", "generate"]] = Field(["rank", "generate"], min_length=1)
    answer_max_length: int = Field(10, ge=2, description="tokens of a generated answer (BLIP: 10)")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    checkpoint_dir: Path = Path("checkpoints/vqa")
    output: Path = Path("models/vqa.safetensors")


class NlvrFinetuneConfig(FinetuneConfig):
    """NLVR2: is the statement true of the image pair? Cross-entropy on the [ENC] output."""

    splits: list[ShardSplit] = Field(["nlvr_train"], min_length=1)
    eval_split: ShardSplit = "nlvr_test"
    checkpoint_dir: Path = Path("checkpoints/nlvr")
    output: Path = Path("models/nlvr.safetensors")


class CapfiltConfig(Section):
    """`blip capfilt`: bootstrap the web pairs with the captioner (nucleus sampling) and the filter (ITM)."""

    captioner: Path = Path("models/caption.safetensors")
    filter: Path = Path("models/retrieval.safetensors")
    source_splits: list[ShardSplit] = Field(["web"], min_length=1, description="noisy pairs to bootstrap")
    human_splits: list[ShardSplit] = Field(["clean_train"], description="human-annotated pairs, copied as they are")
    out_dir: Path = Path("data/capfilt")
    out_url: str | None = Field(
        None,
        description="object storage for the bootstrapped shards (s3://bucket/prefix): "
        "each unit's shard is uploaded there, out_dir keeps the manifest; null = out_dir",
    )
    work_dir: Path = Path("checkpoints/capfilt")
    use_captioner: bool = Field(True, description="add synthetic captions (ablation: false = filter only)")
    use_filter: bool = Field(True, description="drop pairs scored below the threshold (ablation: false = keep all)")
    synthetic_per_image: int = Field(1, ge=1, description="nucleus-sampled captions per web image (BLIP: 1)")
    top_p: float = Field(0.9, gt=0, le=1)
    max_length: int = Field(30, ge=2, description="tokens, prompt included (BLIP: 30)")
    min_length: int = Field(10, ge=1, description="BLIP: 10")
    repetition_penalty: float = Field(1.0, ge=1.0)
    score: Literal["itm", "itc"] = Field("itm", description="itm: match probability (paper); itc: cosine similarity")
    threshold_rule: Literal["fixed", "calibrated", "top_fraction"] = Field(
        "fixed", description="calibrated: from held-out pairs; top_fraction: a share of the web pairs (DataComp)"
    )
    threshold: float = Field(0.5, description="fixed rule: keep pairs scoring at or above this (paper: ITM 0.5)")
    calibration_split: ShardSplit = Field("clean_val", description="held-out human pairs for the calibrated rule")
    calibration_keep: float = Field(0.9, gt=0, lt=1, description="calibrated: keep this share of held-out pairs")
    keep_fraction: float = Field(0.3, gt=0, le=1, description="top_fraction: keep this share of the web pairs, "
                                 "best scores first (DataComp's CLIP-score filter: 0.3)")  # fmt: skip
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(1, ge=0, description="data-loader workers decoding a unit's images")
    gallery_images: int = Field(12, ge=0)
    seed: int = 0


class RegisteredModel(Section):
    """One registered model: its task (the pyfunc's behaviour), the stage outputs that may become its versions
    (stems: models/<stem>.safetensors with metrics/<stem>.json) and the metric that decides the champion."""

    task: Literal["caption", "retrieval", "vqa", "nlvr"]
    candidates: list[str] = Field(min_length=1)
    metric: str
    higher_is_better: bool = True


class PromotionConfig(Section):
    """`blip promote`: register new versions and move `alias` to a better one (run by the Prefect pipeline)."""

    alias: str = "champion"
    models: dict[str, RegisteredModel] = Field(default_factory=lambda: {
        "blip-captioner": RegisteredModel(task="caption", candidates=["caption", "caption_capfilt"], metric="CIDEr"),
        "blip-retrieval": RegisteredModel(task="retrieval", candidates=["retrieval", "retrieval_capfilt"],
                                          metric="r_mean"),
        "blip-vqa": RegisteredModel(task="vqa", candidates=["vqa", "vqa_capfilt"], metric="rank_accuracy"),
        "blip-nlvr": RegisteredModel(task="nlvr", candidates=["nlvr", "nlvr_capfilt"], metric="accuracy"),
    })  # fmt: skip
