"""Loading shards: rank and worker splitting, corrupt samples, training streams, BLIP's transforms."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from blip.config.schema import AugmentConfig
from blip.data.loader import eval_pipeline, make_loader, train_pipeline
from blip.data.locations import shard_urls
from blip.data.shards import ShardWriter
from blip.data.transforms import CLIP_MEAN, CLIP_STD, RandomAugment, eval_transform, train_transform

EVAL = eval_transform(32)


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def write_pairs(folder: Path, count: int, per_shard: int, corrupt: frozenset[int] = frozenset()) -> list[str]:
    writer = ShardWriter(folder, per_shard)
    for i in range(count):
        image = b"\xff\xd8 not really a jpeg" if i in corrupt else jpeg((i % 256, 0, 0))
        record = {"image_id": f"img{i}", "captions": [f"caption {i} a", f"caption {i} b"]}
        writer.write(f"{i:09d}", {"jpg": image, "json": json.dumps(record).encode()})
    writer.close()
    return shard_urls(folder)


def collect(urls: list[str], rank: int, world_size: int, workers: int) -> tuple[list[str], int]:
    loader = make_loader(eval_pipeline(urls, "pairs", EVAL, 4, rank=rank, world_size=world_size), workers)
    ids, skipped = [], 0
    for batch in loader:
        ids += [r["image_id"] for r in batch["record"]]
        skipped += batch["skipped"]
        if batch["key"]:
            assert batch["image"].shape == (len(batch["key"]), 3, 32, 32)
    return ids, skipped


def test_eval_split_over_two_ranks_and_two_workers(tmp_path: Path) -> None:
    urls = write_pairs(tmp_path, 70, 10)  # 7 shards: uneven over 2 ranks x 2 workers on purpose
    seen: list[str] = []
    per_rank = []
    for rank in (0, 1):
        ids, skipped = collect(urls, rank, 2, workers=2)
        assert skipped == 0
        per_rank.append(set(ids))
        seen += ids
    assert Counter(seen) == Counter(f"img{i}" for i in range(70))  # nothing lost, nothing twice
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_eval_keeps_all_captions_and_order_in_one_process(tmp_path: Path) -> None:
    urls = write_pairs(tmp_path, 9, 4)
    batch = next(iter(make_loader(eval_pipeline(urls, "pairs", EVAL, 9), 0)))
    assert [r["image_id"] for r in batch["record"]] == [f"img{i}" for i in range(9)]
    assert batch["text"][3] == ["caption 3 a", "caption 3 b"]
    assert batch["image"][5, 0].mean() == pytest.approx((5 / 255 - CLIP_MEAN[0]) / CLIP_STD[0], abs=0.05)


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    urls = write_pairs(tmp_path / "a", 20, 5, corrupt=frozenset({0, 7, 19}))  # last sample of the stream too
    total_ids, total_skipped = [], 0
    for workers in (0, 2):
        ids, skipped = collect(urls, 0, 1, workers)
        total_ids.append(sorted(ids))
        total_skipped += skipped
        assert skipped == 3  # corrupt images (a cut shard: test_a_truncated_shard_is_noted_...)
        assert "img7" not in ids and "img19" not in ids and "img1" in ids and len(ids) == 17
    assert total_ids[0] == total_ids[1]


def test_train_stream_resamples_with_full_batches(tmp_path: Path) -> None:
    urls = write_pairs(tmp_path, 24, 6, corrupt=frozenset({3}))
    transform = train_transform(32, AugmentConfig(crop_scale=(0.5, 1.0), hflip=True, randaugment_n=2))
    pipeline = train_pipeline(urls, "pairs", transform, 8, seed=1, shuffle_buffer=20)
    batches = [b for _, b in zip(range(12), make_loader(pipeline, 2), strict=False)]
    assert all(b["image"].shape == (8, 3, 32, 32) and len(b["text"]) == 8 for b in batches)
    assert all(isinstance(t, str) and t.startswith("caption") for b in batches for t in b["text"])
    ids = Counter(r["image_id"] for b in batches for r in b["record"])
    assert "img3" not in ids and sum(b["skipped"] for b in batches) >= 1
    assert len(ids) > 12  # the stream goes around the shards, not stuck on one


def test_train_stream_of_undecodable_samples_fails_instead_of_spinning(tmp_path: Path) -> None:
    urls = write_pairs(tmp_path, 12, 6)
    pipeline = train_pipeline(urls, "vqa", EVAL, 4, shuffle_buffer=0)  # caption shards read as VQA: no question
    with pytest.raises(RuntimeError, match=r"1000 samples in a row failed to decode as 'vqa'.*KeyError\('question'"):
        next(iter(make_loader(pipeline, 0)))


def test_train_stream_is_deterministic_per_seed(tmp_path: Path) -> None:
    urls = write_pairs(tmp_path, 24, 6)

    def first_ids(seed: int, rank: int) -> list[str]:
        pipeline = train_pipeline(urls, "pairs", EVAL, 6, seed=seed, rank=rank, shuffle_buffer=10)
        return [r["image_id"] for r in next(iter(pipeline))["record"]]

    assert first_ids(3, 0) == first_ids(3, 0)
    assert first_ids(3, 0) != first_ids(3, 1)


def test_nlvr_and_vqa_samples(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "n", 10)
    record = {"sentence": "the left image is red", "label": True}
    writer.write("000000000", {"left.jpg": jpeg((255, 0, 0)), "right.jpg": jpeg((0, 0, 255)),
                               "json": json.dumps(record).encode()})  # fmt: skip
    writer.close()
    batch = next(iter(eval_pipeline(shard_urls(tmp_path / "n"), "nlvr", EVAL, 4)))
    assert batch["image"][0, 0].mean() > batch["image2"][0, 0].mean()
    assert batch["text"] == ["the left image is red"]
    writer = ShardWriter(tmp_path / "q", 10)
    record = {"question": "what color is it?", "answers": ["red"] * 10}
    writer.write("000000000", {"jpg": jpeg((255, 0, 0)), "json": json.dumps(record).encode()})
    writer.close()
    batch = next(iter(eval_pipeline(shard_urls(tmp_path / "q"), "vqa", EVAL, 4)))
    assert batch["text"] == ["what color is it?"] and batch["record"][0]["answers"][0] == "red"


def test_shard_writer_is_atomic(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, 3)
    for i in range(4):
        writer.write(f"{i:09d}", {"json": b"{}"})
    # One full shard is visible; the second is still being written under a name no reader lists.
    assert [Path(u).name for u in shard_urls(tmp_path)] == ["shard-000000.tar"]
    assert (tmp_path / "shard-000001.tar.partial").exists()
    writer.close()
    assert [Path(u).name for u in shard_urls(tmp_path)] == ["shard-000000.tar", "shard-000001.tar"]
    assert len(list(wds.WebDataset(shard_urls(tmp_path), shardshuffle=False))) == 4
    with pytest.raises(FileNotFoundError, match="run `blip ingest` first"):
        shard_urls(tmp_path / "nothing")


def test_transforms_follow_blip() -> None:
    image = Image.new("RGB", (50, 40), (255, 255, 255))
    out = eval_transform(24)(image)
    assert out.shape == (3, 24, 24)
    assert torch.allclose(out[:, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD), atol=1e-4)
    train = train_transform(32, AugmentConfig(crop_scale=(0.2, 1.0), hflip=True, randaugment_n=2, randaugment_m=5))
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomAugment", "ToTensor", "Normalize"]
    crop = train.transforms[0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation.value == "bicubic"
    assert train(image).shape == (3, 32, 32)


def test_random_augment_ops() -> None:
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    image.paste((250, 250, 250), (8, 8, 24, 24))
    augment = RandomAugment(2, 5, generator=torch.Generator().manual_seed(0))
    assert len(augment.OPS) == 10
    for name in augment.OPS:
        out = augment.apply(name, image)
        assert out.size == image.size and out.mode == "RGB"
    # M=5 gives BLIP's enhance factor 1.0 (a no-op); geometric ops move pixels and fill with grey 128.
    assert augment.apply("Brightness", image).tobytes() == image.tobytes()
    rotated = augment.apply("Rotate", image)
    assert rotated.getpixel((0, 0)) == (128, 128, 128)
    assert augment.apply("TranslateX", image).tobytes() != image.tobytes()


def test_a_truncated_shard_is_noted_in_training_and_an_error_in_evaluation(tmp_path: Path) -> None:
    from blip.data.shards import TruncatedShardError

    urls = write_pairs(tmp_path, 20, 10)
    cut = Path(urls[1])
    with tarfile.open(cut) as tar:
        last_image = tar.getmember("000000019.jpg")
    cut.write_bytes(cut.read_bytes()[: last_image.offset_data + 100])  # an interrupted copy, inside an image
    pipeline = train_pipeline(urls, "pairs", EVAL, 4, shuffle_buffer=1)
    notes = [t for batch in itertools.islice(iter(pipeline), 12) for t in batch["truncated"]]
    assert notes and set(notes) == {(str(cut), 9, "ends mid-member")}  # the 9 samples before it are trained on
    with pytest.raises(TruncatedShardError, match=r"shard-000001\.tar: ends mid-member after 9 samples"):
        collect(urls, 0, 1, workers=0)
