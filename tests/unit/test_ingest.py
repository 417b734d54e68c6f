"""Ingest from every source format, with every kind of bad input, into atomic shards and a manifest."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from blip.config import load_params
from blip.data.ingest import MANIFEST, ingest
from blip.data.sources import SourceError
from blip.data.text import pre_caption, pre_question
from blip.stages.ingest import main as ingest_main
from tests.conftest import SMALL_WORLD, write_params

MEMBER = re.compile(r"^\d{9}\.(jpg|json|left\.jpg|right\.jpg)$")


def read_split(out_dir: Path, split: str) -> list[dict]:
    samples = []
    for shard in sorted((out_dir / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            assert all(MEMBER.match(n) for n in names), names  # no source name ever becomes a member name
            members = {n: tar.extractfile(n).read() for n in names}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name.removesuffix(".json")
            sample = {"json": json.loads(members[name])}
            for ext in ("jpg", "left.jpg", "right.jpg"):
                if f"{key}.{ext}" in members:
                    sample[ext] = Image.open(io.BytesIO(members[f"{key}.{ext}"]))
            samples.append(sample)
    return samples


def save(image: Image.Image, path: Path, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def run_ingest(folder: Path, sources: list[dict], **extra: object) -> dict:
    ingest_section = {"out_dir": str(folder / "out"), "samples_per_shard": 2, "sources": sources, **extra}
    path = write_params(folder, ingest=ingest_section)
    return ingest(load_params(path), show_progress=False)


# ------------------------------------------------------------------ synthetic, through the stage entry point
def test_synthetic_stage_writes_shards_manifest_and_metrics(small_params: Path) -> None:
    assert ingest_main(["--params", str(small_params), "--no-progress"]) == 0
    out = Path("data/shards")
    manifest = json.loads((out / MANIFEST).read_text())
    counts = {s: v["samples"] for s, v in manifest["splits"].items()}
    assert counts == {
        "web": 200, "clean_train": 40, "clean_val": 10, "clean_test": 20,
        "vqa_train": 120, "vqa_test": 60, "nlvr_train": 30, "nlvr_test": 10,
    }  # fmt: skip
    assert manifest["skipped"]["total"] == 0
    assert len(manifest["splits"]["web"]["shards"]) == 4  # 200 samples, 50 per shard
    assert not list(out.rglob("*.partial")) and not list(Path("data").glob(".shards.*"))
    assert json.loads(Path("metrics/ingest.json").read_text())["samples"] == counts
    web = read_split(out, "web")
    assert web[0]["json"]["origin"] == "web" and "noisy" in web[0]["json"]["world"]
    assert web[0]["jpg"].size == (64, 64) and web[0]["jpg"].mode == "RGB"
    answers = json.loads((out / "vqa_train/answer_list.json").read_text())
    assert all(s["json"]["answers"][0] in answers for s in read_split(out, "vqa_train"))
    nlvr = read_split(out, "nlvr_test")
    assert {"left.jpg", "right.jpg"} <= set(nlvr[0]) and isinstance(nlvr[0]["json"]["label"], bool)

    # Same params, same bytes: the content hash is stable; a different seed changes it.
    first = manifest["content_hash"]
    assert ingest_main(["--params", str(small_params), "--no-progress"]) == 0
    assert json.loads((out / MANIFEST).read_text())["content_hash"] == first
    assert ingest_main(["--params", str(small_params), "--no-progress", "--set", "world.seed=8"]) == 0
    assert json.loads((out / MANIFEST).read_text())["content_hash"] != first


# ------------------------------------------------------------------ annotation formats and bad input
@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "images"
    rgb = Image.new("RGB", (40, 30), (200, 10, 10))
    save(rgb, root / "rgb.jpg", "JPEG")
    save(Image.new("L", (20, 20), 128), root / "grey.png")
    save(Image.new("RGB", (20, 20), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE), root / "palette.png")
    rgba = Image.new("RGBA", (20, 20), (0, 255, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half fully transparent
    save(rgba, root / "rgba.png")
    save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), root / "cmyk.jpg", "JPEG")
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(b"this is not an image at all")
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, "JPEG")
    (root / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    save(rgb, tmp_path / "outside.jpg", "JPEG")
    annotations = [
        {"image": "rgb.jpg", "caption": "A RED Square!!  on (white)   paper.", "image_id": 1},
        {"image": "rgb.jpg", "caption": "second caption: same image", "image_id": 1},
        {"image": "grey.png", "caption": ["grey one", "grey two"]},
        {"image": "palette.png", "caption": "palette"},
        {"image": "rgba.png", "caption": "rgba"},
        {"image": "cmyk.jpg", "caption": "cmyk"},
        {"image": "missing.jpg", "caption": "missing file"},
        {"image": "empty.jpg", "caption": "zero bytes"},
        {"image": "garbage.jpg", "caption": "garbage"},
        {"image": "truncated.jpg", "caption": "truncated"},
        {"image": "rgb.jpg", "caption": " ... !!! "},  # merges into rgb.jpg; cleaned away to nothing
        {"image": "grey.png", "caption": ""},
        {"image": "../outside.jpg", "caption": "escapes the image root"},
        {"caption": "no image key"},
        "not an object",
    ]
    path = tmp_path / "coco_train.json"
    path.write_text(json.dumps(annotations))
    # An image whose only caption is empty
    save(rgb, root / "nocap.jpg", "JPEG")
    extra = tmp_path / "coco_val.json"
    extra.write_text(json.dumps([{"image": "nocap.jpg", "caption": ["", "  "]}]))
    return path, extra


def test_coco_karpathy_converts_and_skips_with_reasons(tmp_path: Path, coco: tuple[Path, Path]) -> None:
    train, val = coco
    root = str(tmp_path / "images")
    manifest = run_ingest(
        tmp_path,
        [
            {"format": "coco_karpathy", "split": "coco_train", "annotations": str(train), "image_root": root},
            {"format": "coco_karpathy", "split": "coco_val", "annotations": str(val), "image_root": root},
        ],
    )
    assert manifest["skipped"]["by_reason"] == {
        "empty caption": 1,
        "image path outside image_root": 1,
        "malformed annotation: no image path": 1,
        "malformed annotation: not an object": 1,
        "missing file": 1,
        "truncated image": 1,
        "unreadable image": 1,
        "zero-size file": 1,
    }
    assert manifest["skipped"]["total"] == 8 and "coco_val" not in manifest["splits"]
    samples = {s["json"]["image_id"]: s for s in read_split(tmp_path / "out", "coco_train")}
    assert set(samples) == {"1", "grey", "palette", "rgba", "cmyk"}
    assert samples["1"]["json"]["captions"] == ["a red square on white paper", "second caption same image"]
    assert samples["grey"]["json"]["captions"] == ["grey one", "grey two"]
    for sample in samples.values():
        assert sample["jpg"].format == "JPEG" and sample["jpg"].mode == "RGB"
    original = (tmp_path / "images/rgb.jpg").read_bytes()
    with tarfile.open(tmp_path / "out/coco_train/shard-000000.tar") as tar:
        assert tar.extractfile("000000000.jpg").read() == original  # an RGB JPEG is kept byte for byte
    rgba = np.asarray(samples["rgba"]["jpg"]).astype(int)
    assert (rgba[:, :8] > 240).all() and abs(rgba[:, 14:] - [0, 255, 0]).max() < 12  # transparent -> white
    cmyk = np.asarray(samples["cmyk"]["jpg"]).astype(int)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 40  # C=0 M=Y=255 is red
    palette = np.asarray(samples["palette"]["jpg"]).astype(int)
    assert abs(palette - [0, 0, 255]).max() < 12


def test_vqa_and_nlvr2_formats(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name, colour in (("a.jpg", (255, 0, 0)), ("b.jpg", (0, 255, 0))):
        save(Image.new("RGB", (16, 16), colour), root / name, "JPEG")
    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps([
        {"question_id": 11, "question": "What COLOR is it?", "answer": ["red", "red", "dark red"], "image": "a.jpg"},
        {"question_id": 12, "question": "...", "answer": ["x"], "image": "a.jpg"},
        {"question_id": 13, "question": "Is it green?", "image": "b.jpg"},  # test split: no answers
    ]))  # fmt: skip
    answer_list = tmp_path / "answer_list.json"
    answer_list.write_text(json.dumps(["red", "green", "yes", "no"]))
    nlvr = tmp_path / "nlvr.json"
    nlvr.write_text(json.dumps([
        {"images": ["a.jpg", "b.jpg"], "sentence": "The left image is red.", "label": "True"},
        {"images": ["b.jpg", "a.jpg"], "sentence": "The left image is red.", "label": "False"},
        {"images": ["a.jpg"], "sentence": "one image only", "label": "True"},
        {"images": ["a.jpg", "b.jpg"], "sentence": "odd label", "label": "maybe"},
    ]))  # fmt: skip
    manifest = run_ingest(
        tmp_path,
        [
            {"format": "vqa", "split": "vqa_x", "annotations": str(vqa), "image_root": str(root),
             "answer_list": str(answer_list)},
            {"format": "nlvr2", "split": "nlvr_x", "annotations": str(nlvr), "image_root": str(root)},
        ],
    )  # fmt: skip
    assert manifest["skipped"]["by_reason"] == {
        "empty question": 1,
        "malformed annotation: label 'maybe' is not true/false": 1,
        "malformed annotation: needs exactly two images": 1,
    }
    questions = read_split(tmp_path / "out", "vqa_x")
    assert [q["json"]["question"] for q in questions] == ["what color is it?", "is it green?"]
    assert questions[0]["json"]["answers"] == ["red", "red", "dark red"] and questions[1]["json"]["answers"] == []
    assert json.loads((tmp_path / "out/vqa_x/answer_list.json").read_text()) == ["red", "green", "yes", "no"]
    pairs = read_split(tmp_path / "out", "nlvr_x")
    assert [p["json"]["label"] for p in pairs] == [True, False]
    assert pairs[0]["json"]["sentence"] == "the left image is red"
    assert np.asarray(pairs[0]["left.jpg"])[8, 8, 0] > 200 and np.asarray(pairs[0]["right.jpg"])[8, 8, 1] > 200


def test_folder_with_caption_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    save(Image.new("RGB", (16, 16), (1, 2, 3)), root / "x" / "one.png")
    (root / "x/one.txt").write_text("First caption.\n\nSecond caption\n")
    save(Image.new("RGB", (16, 16)), root / "two.jpg", "JPEG")  # no sidecar
    save(Image.new("RGB", (16, 16)), root / "three.jpg", "JPEG")
    (root / "three.txt").write_text("   \n")
    manifest = run_ingest(tmp_path, [{"format": "folder", "split": "mine", "root": str(root)}])
    assert manifest["skipped"]["by_reason"] == {"empty caption": 1, "missing caption file": 1}
    (sample,) = read_split(tmp_path / "out", "mine")
    assert sample["json"]["captions"] == ["first caption", "second caption"]
    assert sample["json"]["image_id"] == "x/one.png" and sample["json"]["origin"] == "web"


def test_workers_write_the_shards_of_one_worker_byte_for_byte(tmp_path: Path, coco: tuple[Path, Path]) -> None:
    train, _ = coco
    shards = []
    for shard in range(3):  # img2dataset-style shards: each one a task a worker reads itself
        shards.append(str(tmp_path / f"web-{shard}.tar"))
        with wds.TarWriter(shards[-1]) as sink:
            for i in range(5):
                image = io.BytesIO()
                Image.new("RGB", (16, 16), (shard * 40, i * 40, 9)).save(image, "PNG" if i % 2 else "JPEG")
                sink.write({"__key__": f"{i}", "png" if i % 2 else "jpg": image.getvalue(), "txt": f"Web {shard} {i}"})
    sources = [{"format": "coco_karpathy", "split": "coco_train", "annotations": str(train),
                "image_root": str(tmp_path / "images")}, {"format": "synthetic"},
               {"format": "webdataset", "split": "web_x", "shards": shards}]  # fmt: skip

    def run(name: str, workers: int) -> dict:
        (tmp_path / name).mkdir()
        ingest_section = {"out_dir": str(tmp_path / name / "out"), "samples_per_shard": 7, "sources": sources,
                          "workers": workers}  # fmt: skip
        return ingest(load_params(write_params(tmp_path / name, ingest=ingest_section, world=SMALL_WORLD)), False)

    one, two = run("one", 1), run("two", 2)
    assert one == two and one["skipped"]["total"] == 7  # the same manifest: content hash, counts, skip reasons
    assert one["splits"]["web_x"]["samples"] == 15
    files = sorted(p.relative_to(tmp_path / "one/out") for p in (tmp_path / "one/out").rglob("*.tar"))
    assert len(files) > 10 and files == sorted(p.relative_to(tmp_path / "two/out")
                                               for p in (tmp_path / "two/out").rglob("*.tar"))  # fmt: skip
    assert all((tmp_path / "one/out" / f).read_bytes() == (tmp_path / "two/out" / f).read_bytes() for f in files)


def test_existing_webdataset_shards(tmp_path: Path) -> None:
    shard = tmp_path / "in-000.tar"
    jpg = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(jpg, "JPEG")
    png = io.BytesIO()
    Image.new("LA", (16, 16)).save(png, "PNG")
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "a", "jpg": jpg.getvalue(), "txt": "Caption A."})
        sink.write({"__key__": "../../b", "png": png.getvalue(), "json": {"caption": "Caption B"}})
        sink.write({"__key__": "c", "txt": "no image here"})
        sink.write({"__key__": "d", "jpg": b"\xff\xd8 broken", "txt": "broken jpeg"})
    manifest = run_ingest(tmp_path, [{"format": "webdataset", "split": "web_x", "shards": [str(shard)]}])
    assert manifest["skipped"]["by_reason"] == {"missing file: no image member": 1, "unreadable image": 1}
    samples = read_split(tmp_path / "out", "web_x")
    assert [s["json"]["captions"] for s in samples] == [["caption a"], ["caption b"]]
    assert samples[1]["jpg"].mode == "RGB"
    assert not (tmp_path / "b").exists() and not (tmp_path.parent / "b").exists()


def test_failed_ingest_keeps_the_previous_output(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    save(Image.new("RGB", (16, 16)), root / "one.png")
    (root / "one.txt").write_text("a caption")
    first = run_ingest(tmp_path, [{"format": "folder", "split": "mine", "root": str(root)}])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    sources = [
        {"format": "folder", "split": "mine", "root": str(root)},
        {"format": "coco_karpathy", "split": "coco", "annotations": str(broken), "image_root": str(root)},
    ]
    with pytest.raises(SourceError, match=r"broken\.json: cannot read annotation JSON"):
        run_ingest(tmp_path, sources)
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == first
    assert not list(tmp_path.glob(".out.*"))


def test_pre_caption_and_pre_question() -> None:
    assert pre_caption('  A "Dog"   (running)!\n on:the;beach~#* ', 30) == "a dog running on the beach"
    assert pre_caption("one two three four", 3) == "one two three"
    assert pre_caption("it's a dog's life, isn't it?", 30) == "it's a dog's life, isn't it?"
    assert pre_question("What is ON the table?!.", 30) == "what is on the table?"
    assert pre_question("Mr.Smith's dog", 30) == "mrsmith's dog"


def test_ingest_logs_one_mlflow_run(small_params: Path) -> None:
    from mlflow.tracking import MlflowClient

    assert ingest_main(["--params", str(small_params), "--no-progress"]) == 0
    client = MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == "blip-pipeline"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["blip.stage"] == "ingest"
    assert run.data.params["world.seed"] == "7" and run.data.params["ingest.samples_per_shard"] == "50"
    assert run.data.metrics["samples.web"] == 200 and run.data.metrics["skipped"] == 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"manifest.json", "metrics.json", "config.yaml"} <= artifacts
    assert {k.split(".")[0] for k in run.data.params} == {"world", "ingest"}


@pytest.mark.parametrize(
    ("cut", "reason", "kept"),
    [
        ("end", "no end-of-archive blocks", 4),  # stops between members: nothing of them is lost
        ("data", "ends mid-member", 3),  # inside the last image's bytes
        ("header", "ends mid-header", 3),  # inside the last caption's header: that sample has no caption
    ],
)
def test_a_truncated_shard_is_recorded_with_its_samples_read(tmp_path: Path, cut: str, reason: str, kept: int) -> None:
    whole = tmp_path / "whole.tar"
    jpg = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(jpg, "JPEG")
    with wds.TarWriter(str(whole)) as sink:
        for key in "abcd":
            sink.write({"__key__": key, "jpg": jpg.getvalue(), "txt": f"caption {key}"})
    with tarfile.open(whole) as tar:
        members = {m.name: m for m in tar.getmembers()}
    offsets = {"end": tar.offset, "data": members["d.jpg"].offset_data + 100, "header": members["d.txt"].offset + 100}
    shard = tmp_path / "cut.tar"
    shard.write_bytes(whole.read_bytes()[: offsets[cut]])
    manifest = run_ingest(tmp_path, [{"format": "webdataset", "split": "web_x", "shards": [str(shard)]}])
    read = 3 if cut == "data" else 4  # a sample the cut went through is read only if a member of it was
    assert manifest["skipped"]["shards"] == [
        {"split": "web_x", "shard": str(shard), "samples": read, "reason": f"truncated shard: {reason}"}
    ]
    assert manifest["skipped"]["by_reason"]["truncated shard: " + reason] == 1
    assert manifest["splits"]["web_x"]["samples"] == kept  # the samples before the cut are kept
